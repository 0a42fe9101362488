"""Which jobs of a sweep train together: those whose configs differ only in keys the stacked loop varies per
student, and only for setups the stacked loop reproduces exactly (otherwise: the ordinary way, one by one)."""

import copy
from typing import Any

from hydra.utils import get_class, get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.batched.stacked import DTYPES
from kd_lightning.data.mnist import MNISTDataModule
from kd_lightning.models import MLP
from kd_lightning.modules import DistillModule

BATCHED_KEYS = ("seed", "distill.T", "distill.alpha", "distill.group")
# Trainer keys the stacked loop implements, with the values it accepts (None: any value).
TRAINER_KEYS: dict[str, Any] = {
    "_target_": None, "default_root_dir": None, "min_epochs": None, "max_epochs": None, "log_every_n_steps": None,
    "deterministic": None, "enable_progress_bar": None, "enable_model_summary": None, "benchmark": None,
    "num_sanity_val_steps": None, "limit_train_batches": None, "accelerator": ("cpu", "gpu", "cuda"),
    "devices": (1,), "num_nodes": (1,), "check_val_every_n_epoch": (1,), "max_steps": (-1, None),
    "limit_val_batches": (1.0, None), "precision": tuple(DTYPES),
    "plugins": ([{"_target_": "kd_lightning.checkpoints.AtomicCheckpointIO"}],),  # it writes atomically too
}
CALLBACKS = {"channels_last",  # trainer=gpu's; an MLP has no 4-D weights to convert
             "model_checkpoint", "last_checkpoint", "periodic_checkpoint", "early_stopping", "lr_monitor", "timer",
             "progress_bar", "interrupt_checkpoint", "tensorboard_figures"}
ELEMENTWISE_OPTIMIZERS = {"torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD", "torch.optim.Adadelta",
                          "torch.optim.RMSprop", "torch.optim.Adagrad"}


def group_key(cfg: DictConfig) -> str:
    """The job's config without the batched keys (interpolations unresolved: `module.T: ${distill.T}` is
    the same in every job, an explicit `module.T=3` is not)."""
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    for dotted in (*BATCHED_KEYS, "paths.output_dir"):  # the job dir differs by definition
        *parents, last = dotted.split(".")
        node = c
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return repr(c)


def not_batchable(cfg: DictConfig) -> str | None:
    """Why the stacked loop cannot run this job exactly as train.py would; None when it can."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.paths.output_dir = "/job"  # ${hydra:...} resolves inside a job only; the value does not matter here
    if not issubclass(get_class(cfg.module._target_), DistillModule):
        return "not a distillation run"
    if get_object(cfg.model._target_) is not MLP or cfg.model.get("dropout", 0) != 0:
        return "the model is not an MLP without dropout"
    if not issubclass(get_class(cfg.data._target_), MNISTDataModule):
        return "the data is not an MNIST-style DataModule (no random augmentation)"
    if cfg.distill.get("method", "kd") != "kd":
        return f"distill.method={cfg.distill.method} (the stacked loop trains kd's loss groups)"
    if cfg.distill.get("logit_standardization"):
        return "distill.logit_standardization=true (the stacked loop trains kd's loss groups on raw logits)"
    if cfg.module.get("scheduler") is not None or cfg.module.get("compile") or cfg.module.get("label_smoothing"):
        return "a scheduler, compile or label smoothing"
    if cfg.module.optimizer._target_ not in ELEMENTWISE_OPTIMIZERS:
        return f"optimizer {cfg.module.optimizer._target_} is not one of {sorted(ELEMENTWISE_OPTIMIZERS)}"
    if cfg.get("ckpt_path") or cfg.get("resume"):
        return "ckpt_path/resume"
    if cfg.get("test_last"):
        return "test_last=true (the stacked loop tests the best epoch only; train.py also tests the last)"
    for key, value in OmegaConf.to_container(cfg.trainer, resolve=True).items():
        if key not in TRAINER_KEYS or (TRAINER_KEYS[key] is not None and value not in TRAINER_KEYS[key]):
            return f"trainer.{key}={value}"
    callbacks = {name for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    if extra := callbacks - CALLBACKS:
        return f"callbacks {sorted(extra)}"
    if missing := {"model_checkpoint", "last_checkpoint"} - callbacks:
        return f"without callbacks {sorted(missing)}"
    return None
