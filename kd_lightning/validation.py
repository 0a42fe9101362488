"""Checks of the config's values, run before anything is built or trained.

Each failure is one line naming the key, the value and what is accepted. Misspelled keys never get here:
Hydra's struct mode rejects an override of a key that does not exist.
"""

import logging
import math
from numbers import Real
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from pytorch_lightning.accelerators import AcceleratorRegistry

from kd_lightning.config import is_distillation
from kd_lightning.errors import ConfigError, exit_on_error
from kd_lightning.launch import check_launch
from kd_lightning.losses import LOSS_GROUPS

# The temperatures at which the soft loss T^2 KL(softmax(t/T) || softmax(s/T)) teaches something in float32.
# Its gradient w.r.t. the student's logits is T (softmax(s/T) - softmax(t/T)): below 0.05 it is under 1/20 of
# its size at T=1 and the targets are one-hot (T=1e-30: a zero gradient, the student stays at chance). Above 100
# the loss is the logit-matching limit, and float32 rounding grows (relative error 2e-6 at T=100, 3e-4 at 1000,
# 4e-2 at 10,000; docs/reliability.md).
T_RANGE = (0.05, 100.0)
SEED_MAX = 2**32 - 1  # numpy's seed range, which seed_everything enforces


def _require(ok: bool, key: str, value: object, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not accepted: {accepted}")


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_config(cfg: DictConfig) -> None:
    if is_distillation(cfg):  # a teacher run does not read distill.*
        distill = cfg.distill
        _require(distill.group in LOSS_GROUPS, "distill.group", distill.group, f"one of {', '.join(LOSS_GROUPS)}")
        _require(_is_number(distill.T) and T_RANGE[0] <= distill.T <= T_RANGE[1], "distill.T", distill.T,
                 f"a temperature in [{T_RANGE[0]}, {T_RANGE[1]:g}] (outside it the soft loss teaches nothing in float32)")
        _require(_is_number(distill.alpha) and 0 <= distill.alpha <= 1, "distill.alpha", distill.alpha,
                 "a weight in [0, 1]")

    seed = cfg.get("seed")
    _require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX, "seed", seed,
             f"an integer in [0, {SEED_MAX}]")

    data = cfg.data
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            _require(_is_positive_int(data[key]), f"data.{key}", data[key], "a positive integer")
    if "train_val_split" in data:
        split = list(data.train_val_split)
        _require(
            len(split) == 2 and all(_is_number(f) and 0 < f < 1 for f in split) and math.isclose(sum(split), 1.0),
            "data.train_val_split", split, "two fractions in (0, 1) that sum to 1, e.g. [0.8, 0.2]",
        )

    trainer = cfg.trainer
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    _require(
        _is_positive_int(max_epochs) or (max_epochs == -1 and _is_positive_int(max_steps)),
        "trainer.max_epochs", max_epochs, "a positive integer (or -1 with a positive trainer.max_steps)",
    )
    check_launch(trainer)
    check_accelerator(trainer)


def usable_accelerators() -> list[str]:
    """The accelerators Lightning can use on this machine (its registry's `is_available()`), "gpu" among them
    when CUDA or MPS is."""
    names = sorted(n for n in AcceleratorRegistry.available_accelerators()
                   if AcceleratorRegistry[n]["accelerator"].is_available())
    return names + (["gpu"] if {"cuda", "mps"} & set(names) else [])


def check_accelerator(trainer: DictConfig) -> None:
    """`trainer.accelerator` must be usable here: checked first, so that trainer=gpu on a machine without a GPU
    fails in one line before any data is read, any teacher trained or any cache entry made."""
    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str) or accelerator == "auto":
        return  # "auto" picks what is there; an Accelerator object is the user's business
    usable = usable_accelerators()
    _require(accelerator in usable, "trainer.accelerator", accelerator,
             f"this machine can use only {', '.join(usable)} (no {accelerator} that torch can see); "
             f"use trainer=default for the CPU")


class CheckAccelerator(Callback):
    """Hydra callback: `trainer.accelerator` is checked before Hydra creates the run dir, so that trainer=gpu on a
    machine without a GPU prints one line and writes nothing. (A resumed run's trainer is its saved one: checked
    by validate_config; a sweep's jobs are checked each, and their failure recorded.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        trainer = config.get("trainer")  # card.py and tracin.py configs have none
        if trainer is not None and not config.get("resume"):
            with exit_on_error(logging.getLogger(__name__)):
                check_accelerator(trainer)


def check_num_classes(what: str, model_cfg: DictConfig, datamodule: Any) -> None:
    """The model's `num_classes` must be the data's: checked on configs, before any net is built or trained."""
    n_model, n_data = model_cfg.get("num_classes"), getattr(datamodule, "num_classes", None)
    if n_model is not None and n_data is not None and n_model != n_data:
        raise ConfigError(
            f"{what} has num_classes={n_model}, but the data ({datamodule.source}) has {n_data} classes: "
            f"use a model with num_classes={n_data}"
        )


def check_splits(datamodule: Any) -> None:
    """Every split of the set-up datamodule holds at least one batch: an empty validation split would otherwise
    fail after a whole training (Lightning's error), an empty training split would train nothing."""
    split_of = getattr(datamodule, "train_val_split", None)
    for split, loader in (("train", datamodule.train_dataloader), ("val", datamodule.val_dataloader),
                          ("test", datamodule.test_dataloader)):
        batches = len(loader())
        if batches == 0:
            where = f"data.train_val_split={list(split_of)}" if split_of and split != "test" else "the data"
            raise ConfigError(
                f"{where} leaves the {split} split without a single batch ({datamodule.source}): every split "
                f"needs at least one batch; give {split} a larger share, e.g. data.train_val_split=[0.8, 0.2]"
            )

