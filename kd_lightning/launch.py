"""Who started this process: which rank it is before any process group exists (docs/cluster.md).

Launch modes, and the trainer config each takes:
- one process (`trainer=default`/`gpu`): rank 0;
- ranks started by this job (`trainer=ddp_spawn`/`ddp_cpu`, Lightning's ddp_spawn): this process is rank 0, the
  ranks it spawns inside `trainer.fit` never run the rest of train.py;
- ranks started outside it (`trainer=ddp`/`ddp_cpu_external`, Lightning's ddp): torchrun (RANK), srun
  (SLURM_PROCID), or Lightning re-running the command once per further device (LOCAL_RANK, NODE_RANK). Each
  of these processes runs all of train.py, so work done before the fit (the teacher) must be done by one of them.
"""

import logging
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, open_dict
from pytorch_lightning.strategies import StrategyRegistry

from kd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def is_first_rank() -> bool:
    """False in the ranks > 0 of a job whose ranks were started outside it, True everywhere else. Read from the
    launcher's variables, in the order Lightning picks its cluster environment (accelerator_connector.py)."""
    if TorchElasticEnvironment.detect():  # torchrun (checked first, as Lightning does: it may run inside SLURM)
        return int(os.environ["RANK"]) == 0
    if SLURMEnvironment.detect():  # srun (not SLURM_JOB_NAME=bash/interactive)
        return int(os.environ["SLURM_PROCID"]) == 0
    # Lightning's own re-run of the command for devices 1.. (strategy=ddp without torchrun/srun); else 0, 0.
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def starts_ranks_outside(trainer_cfg: DictConfig) -> bool:
    """Whether a trainer config's strategy has its ranks started outside the fitting process: Lightning's `ddp`
    family (start method "popen": torchrun, srun or a re-run of the command), as opposed to ddp_spawn/fork."""
    strategy = trainer_cfg.get("strategy")
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return False
    return StrategyRegistry[strategy]["init_params"].get("start_method") == "popen"


def started_externally() -> bool:
    """Whether torchrun or srun started this process (Lightning's TorchElastic/SLURM environments)."""
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def check_launch(trainer_cfg: DictConfig) -> None:
    """A multi-device `ddp` trainer in a sweep job that neither torchrun nor srun started would have Lightning
    re-run this process's command line once per further device: the whole `-m` sweep (or submitit's worker)."""
    if not starts_ranks_outside(trainer_cfg) or started_externally():
        return
    if str(trainer_cfg.get("devices", 1)) == "1" and str(trainer_cfg.get("num_nodes", 1)) == "1":
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"trainer.strategy={trainer_cfg.strategy} is not accepted in a -m sweep whose jobs torchrun/srun did not "
            "start (Lightning would re-run the sweep command per device): use trainer=ddp_spawn (or ddp_cpu)"
        )


def train_in_one_process(trainer_cfg: DictConfig) -> None:
    """Make a trainer config fit in this process on one device (for the teacher of an externally launched run:
    its other ranks cannot join that fit, they are waiting for its result)."""
    if starts_ranks_outside(trainer_cfg):
        with open_dict(trainer_cfg):
            trainer_cfg.update(devices=1, num_nodes=1, strategy="auto", sync_batchnorm=False)


def wait_for_file(path: Path, what: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> Path:
    """Wait until `path` exists (written atomically by rank 0), for at most `timeout_s`."""
    started = time.monotonic()
    logged = -1
    while not path.is_file():
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise TimeoutError(f"rank 0 did not provide {what} ({path}) within {timeout_s:.0f} s: see its log")
        if int(waited // 300) > logged:  # every 5 minutes
            logged = int(waited // 300)
            log.info("Waiting for rank 0 to provide %s (%s)", what, path)
        time.sleep(poll_s)
    return path
