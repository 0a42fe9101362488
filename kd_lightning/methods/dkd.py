"""dkd: Decoupled Knowledge Distillation (Zhao et al. 2022). Hyper-parameters from the paper / mdistiller's
CIFAR-100 setting (alpha 1, beta 8, T 4, warm-up 20 of 240 epochs); the warm-up here is 1 epoch by default,
20/240 of the schedule scaled to this template's ~10-epoch runs (W = max_epochs / 12, at least 1; docs/methods.md).

With p = softmax(z / T), t the label: the binary distributions b = (p_t, 1 - p_t) and the distributions over
the non-target classes p^ = p_{i != t} / (1 - p_t). Per example, the KD term decomposes exactly (DKD eq. 3):
    KL(p^T || p^S) = KL(b^T || b^S) + (1 - p_t^T) * KL(p^T^ || p^S^)          (TCKD + (1 - p_t^T) NCKD)
DKD reweighs the two parts: loss = ce_weight * CE + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD),
batch-averaged, with mdistiller's warm-up w = min(epoch / W, 1), the epoch counted from 1 and constant through
an epoch (mdistiller/distillers/DKD.py, DKD.forward_train; mdistiller/engine/trainer.py starts at epoch 1):
1/W through the first epoch, and 1 from the first step when W <= 1.

With `distill.logit_standardization=true` both sides are z-scored before the softmax and T is `distill.base_T`
(logit-standardization-KD, mdistiller/distillers/DKD.py, dkd_loss).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.methods.base import LossTerms, Method, StepInputs, non_negative, positive, register


def dkd_parts(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor, T: float
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Per example: TCKD, NCKD (both unscaled KLs) and the teacher's target probability p_t^T."""
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = teacher_log_probs
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    n, k = student_logits.shape

    def binary(log_p: Tensor) -> Tensor:  # log (p_t, 1 - p_t); 1 - p_t as a sum over the others: no cancellation
        others = log_p[~target].view(n, k - 1)
        return torch.stack([log_p[target], torch.logsumexp(others, dim=1)], dim=1)

    def non_target(log_p: Tensor) -> Tensor:  # log p_i / (1 - p_t) over the k - 1 classes i != t
        return F.log_softmax(log_p[~target].view(n, k - 1), dim=1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(p || q) per row
        return (log_p.exp() * (log_p - log_q)).sum(1)

    b_t, b_s = binary(log_pt), binary(log_ps)
    tckd = kl(b_t, b_s)
    nckd = kl(non_target(log_pt), non_target(log_ps))
    return tckd, nckd, log_pt[target].exp()


def warmup_factor(progress: float, warmup_epochs: float) -> float:
    """mdistiller's min(epoch / W, 1), epoch = 1 + the epochs completed (`progress` is fractional epochs)."""
    return min((int(progress) + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


@register
class DKD(Method):
    name = "dkd"
    defaults = {"alpha": 1.0, "beta": 8.0, "T": 4.0, "ce_weight": 1.0, "warmup_epochs": 1.0}
    hparams = {"alpha": non_negative, "beta": non_negative, "T": positive, "ce_weight": non_negative,
               "warmup_epochs": non_negative}

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        if not self.standardize:  # with logit standardization: distill.base_T
            self.T = self.hp["T"]
        self.alpha, self.beta, self.ce_weight = self.hp["alpha"], self.hp["beta"], self.hp["ce_weight"]
        self.warmup_epochs = self.hp["warmup_epochs"]
        self.needs_teacher_targets = True

    def forward(self, step: StepInputs) -> LossTerms:
        ce = F.cross_entropy(step.logits, step.labels)
        tckd, nckd, _ = dkd_parts(self.prepare_logits(step.logits), step.teacher_log_probs, step.labels, self.T)
        tckd, nckd = tckd.mean() * self.T**2, nckd.mean() * self.T**2
        warmup = warmup_factor(step.progress, self.warmup_epochs)
        loss = self.ce_weight * ce + warmup * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "hard_loss": ce, "tckd": tckd, "nckd": nckd}
