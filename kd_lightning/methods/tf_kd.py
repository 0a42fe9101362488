"""tf_kd: teacher-free KD with a virtual teacher, Tf-KD_reg (Yuan et al. 2020, "Revisiting Knowledge
Distillation via Label Smoothing Regularization"). No teacher is built or trained.

The virtual teacher puts `correct_prob` on the label and spreads the rest evenly over the other K-1 classes;
its distribution u is softened as in the authors' code, softmax(u / T), and the student (at temperature 1,
as there) is pulled towards it:  loss = (1 - alpha) * CE + alpha * multiplier * KL(softmax(u/T) || softmax(s)).
KL is averaged over the batch (`batchmean`); the authors' `KLDivLoss()` also divided by K, which their
multiplier (100 on CIFAR-100) undid: multiplier=1 here is their ResNet18 setting.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.methods.base import LossTerms, Method, StepInputs, non_negative, positive, unit_interval


def virtual_teacher(labels: Tensor, num_classes: int, correct_prob: float) -> Tensor:
    """u: correct_prob on the label, (1 - correct_prob) / (K - 1) on every other class."""
    u = torch.full((len(labels), num_classes), (1 - correct_prob) / (num_classes - 1))
    return u.scatter_(1, labels[:, None].cpu(), correct_prob).to(labels.device)


class TfKD(Method):
    name = "tf_kd"
    hparams = {"alpha": unit_interval, "T": positive, "correct_prob": unit_interval, "multiplier": non_negative}
    uses_teacher = False

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.T = self.hp["T"]
        self.alpha, self.correct_prob, self.multiplier = self.hp["alpha"], self.hp["correct_prob"], self.hp["multiplier"]

    def forward(self, step: StepInputs) -> LossTerms:
        hard = F.cross_entropy(step.logits, step.labels)
        u = virtual_teacher(step.labels, step.logits.shape[1], self.correct_prob)
        target_log_probs = F.log_softmax(u / self.T, dim=1)
        reg = F.kl_div(F.log_softmax(step.logits, dim=1), target_log_probs, reduction="batchmean", log_target=True)
        reg = reg * self.multiplier
        return {"loss": torch.lerp(hard, reg, self.alpha), "hard_loss": hard, "virtual_teacher_loss": reg}
