"""The registry of distillation methods, selected by `distill.method` (one file per method, a `Method`
subclass: its loss and what it needs). Add your own with `register` (docs/methods.md)."""

from typing import Any

from hydra.utils import instantiate

from kd_lightning.errors import ConfigError
from kd_lightning.methods.at import AT
from kd_lightning.methods.base import Method, StepInputs
from kd_lightning.methods.crd import CRD
from kd_lightning.methods.dkd import DKD
from kd_lightning.methods.fitnet import FitNet
from kd_lightning.methods.kd import KD
from kd_lightning.methods.label_smoothing import LabelSmoothing
from kd_lightning.methods.multi_teacher import MultiTeacher
from kd_lightning.methods.reviewkd import ReviewKD
from kd_lightning.methods.rkd import RKD
from kd_lightning.methods.tf_kd import TfKD

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make `distill.method=<method.name>` select `method` (usable as a class decorator)."""
    METHODS[method.name] = method
    return method


for _method in (KD, FitNet, AT, DKD, RKD, MultiTeacher, LabelSmoothing, TfKD, CRD, ReviewKD):
    register(_method)


def get_method(name: str) -> type[Method]:
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


__all__ = ["METHODS", "Method", "StepInputs", "check_method", "get_method", "register"]
