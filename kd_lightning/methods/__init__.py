"""The registry of distillation methods, selected by `distill.method`: one file per method in this folder, a
`Method` subclass decorated with `@register` (both from `kd_lightning.methods.base`). Every module of the
package is imported here, so a new file is all a new method takes (docs/methods.md, "Add your own method")."""

import importlib
import pkgutil
from typing import Any

from hydra.utils import instantiate

from kd_lightning.errors import ConfigError
from kd_lightning.methods.base import METHODS, Method, StepInputs, register

# The built-in methods in the order they are listed (error messages, docs); then any other file here.
BUILT_IN = ("kd", "fitnet", "at", "dkd", "rkd", "multi_teacher", "label_smoothing", "tf_kd", "dist", "crd", "reviewkd")


def discover() -> None:
    """Import every module of this package (each registers its methods); a module already imported is skipped."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if info.name != "base" and not info.name.startswith("_")]
    for name in sorted(names, key=lambda n: (BUILT_IN.index(n) if n in BUILT_IN else len(BUILT_IN), n)):
        importlib.import_module(f"{__name__}.{name}")


discover()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        discover()  # a file added since the package was imported
    if name not in METHODS:
        raise ConfigError(f"distill.method={name!r} is not accepted: one of {', '.join(METHODS)}")
    return METHODS[name]


def check_method(cfg: Any) -> None:
    """Before anything is built or trained: the method exists, its hyper-parameters are valid, and the student
    layers it reads exist in the configured student (built here from its config: cheap)."""
    method_cls = get_method(cfg.distill.method)
    method_cls.check(cfg.distill)
    method = method_cls(cfg.distill)
    if type(method).bind is not Method.bind:
        method.bind(instantiate(cfg.model), None)


__all__ = ["METHODS", "Method", "StepInputs", "check_method", "discover", "get_method", "register"]
