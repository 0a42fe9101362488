"""tf_kd: teacher-free KD with a virtual teacher, Tf-KD_reg (Yuan et al., CVPR 2020, "Revisiting Knowledge
Distillation via Label Smoothing Regularization"). No teacher is built or trained.

The virtual teacher u puts `correct_prob` a on the label and (1 - a) / (K - 1) on every other class, and is
softened by T: p^d_T = softmax(u / T). Two forms (`distill.tf_kd.form`):
- `paper` (default), the paper's Eq. 9 as the authors quote it (their repository's issues #3, #19, #24), with
  the T^2 factor they say it needs (#14): the student is softened at T too,
      loss = (1 - alpha) * CE + alpha * multiplier * T^2 * KL(p^d_T || softmax(s / T))
- `authors_code`, the authors' released code (Teacher-free-Knowledge-Distillation, my_loss_function.py,
  loss_kd_regularization): the student at temperature 1, no T^2,
      loss = (1 - alpha) * CE + alpha * multiplier * KL(p^d_T || softmax(s))
KL is averaged over the batch (`batchmean`); the authors' `KLDivLoss()` also divided by K, which their
multiplier (100 on CIFAR-100) undid: multiplier=1 here is their ResNet18 setting.

At the defaults (T = 20, a = 0.99) and K = 10 the softened virtual teacher is nearly uniform: 0.1045 on the
label and 0.0995 on every other class (`virtual_teacher_target`).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import kd_term
from kd_lightning.methods.base import (
    LossTerms,
    Method,
    StepInputs,
    non_negative,
    one_of,
    positive,
    register,
    unit_interval,
)

FORMS = ("paper", "authors_code")


def virtual_teacher(labels: Tensor, num_classes: int, correct_prob: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """u: correct_prob on the label, (1 - correct_prob) / (K - 1) on every other class."""
    u = torch.full((len(labels), num_classes), (1 - correct_prob) / (num_classes - 1), dtype=dtype)
    return u.scatter_(1, labels[:, None].cpu(), correct_prob).to(labels.device)


def virtual_teacher_target(labels: Tensor, num_classes: int, correct_prob: float, T: float) -> Tensor:
    """The student's target, softmax(u / T)."""
    return F.softmax(virtual_teacher(labels, num_classes, correct_prob) / T, dim=1)


@register
class TfKD(Method):
    name = "tf_kd"
    defaults = {"alpha": 0.1, "T": 20.0, "correct_prob": 0.99, "multiplier": 1.0, "form": "paper"}
    hparams = {"alpha": unit_interval, "T": positive, "correct_prob": unit_interval, "multiplier": non_negative,
               "form": one_of(*FORMS)}
    uses_teacher = False

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.T = self.hp["T"]
        self.alpha, self.correct_prob, self.multiplier = self.hp["alpha"], self.hp["correct_prob"], self.hp["multiplier"]
        self.form = self.hp["form"]

    def forward(self, step: StepInputs) -> LossTerms:
        hard = F.cross_entropy(step.logits, step.labels)
        u = virtual_teacher(step.labels, step.logits.shape[1], self.correct_prob,
                            torch.promote_types(step.logits.dtype, torch.float32))
        target_log_probs = F.log_softmax(u / self.T, dim=1)
        if self.form == "paper":  # T^2 KL(p^d_T || softmax(s / T))
            reg = kd_term(step.logits, target_log_probs, self.T)
        else:  # KL(p^d_T || softmax(s))
            reg = F.kl_div(F.log_softmax(step.logits, dim=1), target_log_probs, reduction="batchmean", log_target=True)
        reg = reg * self.multiplier
        return {"loss": torch.lerp(hard, reg, self.alpha), "hard_loss": hard, "virtual_teacher_loss": reg}
