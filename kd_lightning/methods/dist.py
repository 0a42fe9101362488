"""dist: DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022). The student's
class probabilities are made to correlate with the teacher's, per example (inter-class relation) and per class
across the batch (intra-class relation), with Pearson's correlation rho instead of KL's exact match:
    Y = softmax(Z / tau) (B x C, student S and teacher T)
    inter = 1 - (1/B) sum_i rho(Y^S_i,:, Y^T_i,:)        intra = 1 - (1/C) sum_j rho(Y^S_:,j, Y^T_:,j)
    rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| ||b - mean b|| + 1e-8)
    loss = ce_weight * CE + beta * tau^2 * inter + gamma * tau^2 * intra
as the authors' code (hunto/image_classification_sota, lib/models/losses/dist_kd.py: DIST.forward,
inter_class_relation, intra_class_relation, pearson_correlation). Defaults: their CIFAR-100 setting
(configs/strategies/distill/dist_cifar.yaml: `kd: dist_t4`, kd_loss_weight 2, ori_loss_weight 1 with
DIST(beta=1, gamma=1) in lib/models/losses/kd_loss.py): beta = gamma = 2 (the weight 2 folded in), tau = 4,
ce_weight 1. Their ImageNet setting is tau = 1 (`kd: dist`), beta = gamma = 2.

The relations are on probabilities: rho is unchanged by a positive affine map of either side's rows (inter) or
columns (intra), so the loss is 0 when the student's logits equal the teacher's up to a constant per row.

The intra-class term correlates a class's probabilities across the batch: a training batch of one example has
none (Pearson over one value), so its intra term is 0 and the batch is counted (`train/small_batches_skipped`).
"""

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.methods.base import LossTerms, Method, StepInputs, non_negative, positive, register


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson's correlation of each row of a with the same row of b."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """1 - mean over examples of the correlation of their class probabilities."""
    return 1 - pearson(y_s, y_t).mean()


def intra_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """1 - mean over classes of the correlation of their probabilities across the batch."""
    return inter_class_relation(y_s.T, y_t.T)


@register
class DIST(Method):
    name = "dist"
    defaults = {"beta": 2.0, "gamma": 2.0, "tau": 4.0, "ce_weight": 1.0}
    hparams = {"beta": non_negative, "gamma": non_negative, "tau": positive, "ce_weight": non_negative}
    min_batch = 2  # for the intra-class relation

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.T = self.hp["tau"]  # the temperature of its softmax (and of val/test soft_loss)
        self.beta, self.gamma, self.ce_weight = self.hp["beta"], self.hp["gamma"], self.hp["ce_weight"]
        self.needs_teacher_targets = True  # step.teacher_logits

    def forward(self, step: StepInputs) -> LossTerms:
        ce = F.cross_entropy(step.logits, step.labels)
        tau = self.T
        y_s = F.softmax(step.logits / tau, dim=1)
        y_t = F.softmax(step.teacher_logits.detach() / tau, dim=1)
        inter = tau**2 * inter_class_relation(y_s, y_t)
        intra = y_s.new_zeros(()) if self.skip_small_batch(len(y_s)) else tau**2 * intra_class_relation(y_s, y_t)
        loss = self.ce_weight * ce + self.beta * inter + self.gamma * intra
        return {"loss": loss, "hard_loss": ce, "inter_loss": inter, "intra_loss": intra}
