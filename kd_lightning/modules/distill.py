"""DistillModule: a student trained against a frozen teacher with the loss group named by `distill.group`."""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.losses import get_loss_group, kd_loss, soft_targets
from kd_lightning.modules.classifier import ClassifierModule

TEACHER_PREFIX = "teacher."

# The frozen teacher is in eval mode on purpose; Lightning warns about eval-mode submodules at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class DistillModule(ClassifierModule):
    """Student `net` plus a frozen `teacher`.

    The teacher never trains: its parameters have requires_grad=False, the optimizer gets the student's
    parameters only, and `train()` keeps it in eval mode whatever Lightning switches (dropout in a teacher
    would otherwise make its targets noisy). It is left out of checkpoints: a student checkpoint holds the
    student alone and loads into a plain ClassifierModule.

    Logs `train/loss` and the group's terms (`train/hard_loss`, `train/soft_loss`); on val/test, besides loss
    (cross-entropy on the labels) and acc, `soft_loss` (the KD term), `agreement` (top-1 match with the
    teacher) and `teacher_acc`.
    """

    def __init__(
        self,
        net: nn.Module,
        teacher: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        group: str = "hard_soft",
        T: float = 2.0,
        alpha: float = 0.8,
        compile: bool = False,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.group, self.T, self.alpha = group, T, alpha
        self.loss_fn, self.needs_teacher = get_loss_group(group)
        self.teacher = teacher.eval().requires_grad_(False)
        self.cached_splits: set[str] = set()
        for metrics in self.eval_metrics.values():
            metrics.add_metrics(
                {
                    "soft_loss": MeanMetric(),
                    "agreement": MulticlassAccuracy(self.num_classes, average="micro"),
                    "teacher_acc": MulticlassAccuracy(self.num_classes, average="micro"),
                }
            )

    def configure_model(self) -> None:
        super().configure_model()
        if self.compile_net and self.needs_teacher and "train" not in self.cached_splits:
            self.teacher.compile()  # it runs every training step

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        self.teacher.eval()
        return self

    def use_cached_teacher_logits(self, logits: dict[str, Tensor]) -> None:
        """Look the teacher's outputs up by dataset index, for the splits in `logits`, instead of running it.

        Training needs the teacher's `soft_targets` at this run's T only: they are computed once here. Val/test
        keep the logits (agreement, teacher accuracy). Non-persistent buffers: they move to the module's
        device and are never written to checkpoints.
        """
        for split, split_logits in logits.items():
            if split == "train":
                self.register_buffer("cached_soft_targets_train", soft_targets(split_logits, self.T), persistent=False)
            else:
                self.register_buffer(f"cached_teacher_logits_{split}", split_logits, persistent=False)
        self.cached_splits = set(logits)

    def teacher_logits(self, x: Tensor, idx: Tensor, split: str) -> Tensor:
        if split in self.cached_splits:
            return getattr(self, f"cached_teacher_logits_{split}").index_select(0, idx)
        with torch.no_grad():
            return self.teacher(x)

    def teacher_soft_targets(self, x: Tensor, idx: Tensor) -> Tensor:
        """The teacher's log-probabilities at T for a training batch: a cache lookup, or the teacher run now."""
        if "train" in self.cached_splits:
            return self.cached_soft_targets_train.index_select(0, idx)  # faster than [idx] for a 1-D index
        return soft_targets(self.teacher_logits(x, idx, "train"), self.T)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, idx = batch
        student_logits = self.net(x)
        teacher_log_probs = self.teacher_soft_targets(x, idx) if self.needs_teacher else None
        terms = self.loss_fn(student_logits, teacher_log_probs, y, self.T, self.alpha)
        self.log_train_terms(terms, len(y))
        return terms["loss"]

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        student_logits = super()._eval_step(stage, batch)
        teacher_logits = self.teacher_logits(batch[0], batch[2], stage)
        metrics = self.eval_metrics[stage]
        metrics["soft_loss"].update(kd_loss(student_logits, teacher_logits, self.T), weight=len(teacher_logits))
        metrics["agreement"].update(student_logits, teacher_logits.argmax(-1))
        metrics["teacher_acc"].update(teacher_logits, batch[1])
        return student_logits

    # ---- checkpoints hold the student only -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Put the current teacher's weights back so strict loading passes and the teacher stays as it is.
        state = checkpoint["state_dict"]
        state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
