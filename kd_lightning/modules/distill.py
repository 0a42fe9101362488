"""DistillModule: a student trained against a frozen teacher with the method named by `distill.method` (kd:
the loss group named by `distill.group`)."""

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.methods import Method, StepInputs, get_method
from kd_lightning.methods.base import capture
from kd_lightning.modules.classifier import ClassifierModule

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."

# The frozen teacher is in eval mode on purpose; Lightning warns about eval-mode submodules at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class DistillModule(ClassifierModule):
    """Student `net` plus a frozen `teacher` (None for a method without one) and the distillation `method`.

    The teacher never trains: its parameters have requires_grad=False, the optimizer gets the student's
    parameters (and the method's own parts) only, and `train()` keeps it in eval mode whatever Lightning switches (dropout in a teacher
    would otherwise make its targets noisy). It is left out of checkpoints: a student checkpoint holds the
    student alone and loads into a plain ClassifierModule.

    The method (kd_lightning/methods) computes the training loss; its own trainable parts (e.g. FitNet's
    regressor) are `method.*` parameters, trained with the student and saved in its checkpoint, never needed
    at inference. Logs `train/loss` and the method's terms (kd: `train/hard_loss`, `train/soft_loss`); on
    val/test, besides loss (cross-entropy on the labels) and acc, with a teacher: `soft_loss` (the KD term
    T^2 KL at the method's own temperature `method.T`: distill.T for kd, multi_teacher and the feature methods,
    distill.dkd.T, distill.dist.tau, distill.base_T with logit standardization, the logits z-scored then),
    `agreement` (top-1 match with the teacher) and `teacher_acc`.
    """

    def __init__(
        self,
        net: nn.Module,
        teacher: nn.Module | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        group: str = "hard_soft",
        T: float = 2.0,
        alpha: float = 0.8,
        compile: bool = False,
        method: str = "kd",
        method_hparams: Mapping[str, Any] | None = None,
        logit_standardization: bool = False,
        base_T: float = 2.0,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.group, self.T, self.alpha = group, T, alpha
        method_cls = get_method(method)
        distill = {"group": group, "T": T, "alpha": alpha, method: method_hparams,
                   "logit_standardization": logit_standardization, "base_T": base_T}
        method_cls.check(distill)
        self.method: Method = method_cls(distill)
        self.loss_fn = getattr(self.method, "loss_fn", None)  # kd's loss group, as before the registry
        if method_cls.uses_teacher and teacher is None:
            raise ValueError(f"distill.method={method} needs a teacher")
        self.teacher = teacher.eval().requires_grad_(False) if method_cls.uses_teacher else None
        self.method.bind(net, self.teacher)
        self.needs_teacher = self.method.needs_teacher_targets or bool(self.method.teacher_layers)
        self.method_built = False
        self.skipped_reported = 0  # the method's small_batches_skipped already reported (on_train_epoch_end)
        self.cached_splits: set[str] = set()
        if self.teacher is None:
            return
        for metrics in self.eval_metrics.values():
            metrics.add_metrics(
                {
                    "soft_loss": MeanMetric(),
                    "agreement": MulticlassAccuracy(self.num_classes, average="micro"),
                    "teacher_acc": MulticlassAccuracy(self.num_classes, average="micro"),
                }
            )

    def setup(self, stage: str) -> None:
        if not self.method_built and self.trainer.datamodule is not None:
            self.method.bind_data(self.trainer.datamodule)
        self.build_method(getattr(self.trainer.datamodule, "input_shape", None))

    def build_method(self, input_shape: tuple[int, ...] | None) -> None:
        """Let the method make its feature-shaped parts from one probe batch (zeros; eval mode, no grad, so
        no BatchNorm statistics move), once, before the optimizer is made and before a checkpoint is loaded."""
        if self.method_built:
            return
        self.method_built = True
        if self.method.teacher_layers:
            log.info("distill.method=%s reads teacher features: the teacher runs online on every training batch",
                     self.method.name)
        if not (self.method.student_layers or self.method.teacher_layers):
            return
        if input_shape is None:
            raise ValueError(f"distill.method={self.method.name} reads features: the datamodule must declare input_shape")
        x = torch.zeros(2, *input_shape)
        was_training = self.net.training
        with torch.no_grad(), capture(self.net.eval(), self.method.student_layers) as features:
            self.net(x)
            teacher_features = {}
            if self.method.teacher_layers:
                with capture(self.teacher, self.method.teacher_layers) as teacher_features:
                    self.teacher(x)
        self.net.train(was_training)
        self.method.build(features, teacher_features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.net.parameters(), *self.method.parameters()]

    def configure_model(self) -> None:
        super().configure_model()
        if self.compile_net and self.needs_teacher and "train" not in self.cached_splits:
            self.teacher.compile()  # it runs every training step

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def use_cached_teacher_logits(self, logits: dict[str, Tensor]) -> None:
        """Look the teacher's outputs up by dataset index, for the splits in `logits`, instead of running it.

        Training reads the teacher's logits and its targets at the method's T (`method.teacher_targets`), computed
        once here; val/test the logits (soft_loss, agreement, teacher accuracy). Non-persistent buffers: they move
        to the module's device and are never written to checkpoints. A method reading teacher features runs the
        teacher on training batches anyway, so it takes its targets from that run.
        """
        if self.method.teacher_layers:
            logits = {split: v for split, v in logits.items() if split != "train"}
        for split, split_logits in logits.items():
            if split == "train":
                self.register_buffer("cached_soft_targets_train", self.method.teacher_targets(split_logits),
                                     persistent=False)
            self.register_buffer(f"cached_teacher_logits_{split}", split_logits, persistent=False)
        self.cached_splits = set(logits)

    def teacher_logits(self, x: Tensor, idx: Tensor, split: str) -> Tensor:
        if split in self.cached_splits:
            return getattr(self, f"cached_teacher_logits_{split}").index_select(0, idx)
        with torch.no_grad():
            return self.teacher(x)

    def teacher_soft_targets(self, x: Tensor, idx: Tensor) -> Tensor:
        """The teacher's log-probabilities at T for a training batch: a cache lookup, or the teacher run now."""
        return self.teacher_train_outputs(x, idx)[1]

    def teacher_train_outputs(self, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's logits and `method.teacher_targets` for a training batch: cache lookups, or the teacher
        run now."""
        if "train" in self.cached_splits:  # index_select: faster than [idx] for a 1-D index
            return (self.cached_teacher_logits_train.index_select(0, idx),
                    self.cached_soft_targets_train.index_select(0, idx))
        logits = self.teacher_logits(x, idx, "train")
        return logits, self.method.teacher_targets(logits)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, idx = batch
        method = self.method
        with capture(self.net, method.student_layers) as features:
            student_logits = self.net(x)
        step = StepInputs(student_logits, y, features=features, indices=idx)
        if method.teacher_layers:  # the teacher runs now, features and all
            with torch.no_grad(), capture(self.teacher, method.teacher_layers) as step.teacher_features:
                step.teacher_logits = self.teacher(x)
                step.teacher_log_probs = method.teacher_targets(step.teacher_logits)
        elif method.needs_teacher_targets:
            step.teacher_logits, step.teacher_log_probs = self.teacher_train_outputs(x, idx)
        if self._trainer is not None:  # fractional epochs so far, for warm-ups
            step.progress = self.current_epoch + batch_idx / max(self.trainer.num_training_batches, 1)
        terms = method(step)
        self.log_train_terms(terms, len(y))
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Relational terms left out on batches too small for them (a ragged last batch of one): said per epoch.
        skipped, self.skipped_reported = self.method.small_batches_skipped - self.skipped_reported, \
            self.method.small_batches_skipped
        if skipped:
            log.warning("distill.method=%s: %d training batch(es) of fewer than %d examples had no relational term "
                        "this epoch", self.method.name, skipped, self.method.min_batch)
            self.log("train/small_batches_skipped", float(skipped))

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        student_logits = super()._eval_step(stage, batch)
        if self.teacher is None:
            return student_logits
        teacher_logits = self.teacher_logits(batch[0], batch[2], stage)
        metrics = self.eval_metrics[stage]
        metrics["soft_loss"].update(self.method.soft_term(student_logits, teacher_logits), weight=len(teacher_logits))
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
        if self.teacher is not None:
            state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
