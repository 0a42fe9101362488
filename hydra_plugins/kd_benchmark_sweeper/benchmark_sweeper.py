"""The sweeper of `python train.py sweep=benchmark_cifar100` (docs/benchmark.md): Hydra's basic sweeper over the
pairs x methods x seeds named by `pair=[...]`, `methods=[...]`, `seeds=N` (kd_lightning.benchmark.sweep_arguments).
Hydra only instantiates sweepers from the hydra_plugins package, hence this module."""

import logging
import sys
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from kd_lightning.benchmark import sweep_arguments
from kd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class BenchmarkSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        try:
            expanded = sweep_arguments(self.config, list(arguments))
        except ConfigError as err:
            log.error("%s", err)
            sys.exit(2)
        return super().sweep(expanded)
