"""rkd: relational KD (Park et al. 2019): the student's embeddings of a batch are made to relate to each other
as the teacher's do, by distance (pairwise distances, each divided by the batch's mean distance) and angle
(cosines of the angles every triplet forms), both compared with the Huber (smooth L1) loss:
    loss = ce_weight * CE + distance_weight * L_distance + angle_weight * L_angle
with the paper's weights 25 and 50. Both terms are unchanged when either side's embeddings are scaled, and
student and teacher embeddings may have different widths (no parameters). Matches mdistiller's RKD.py (rkd_loss,
_pdist) and RepDistiller's distiller_zoo/RKD.py.

A training batch of fewer than 2 examples (a ragged last batch) has no pairs: its relational terms are 0 (the
loss is ce_weight * CE) and the batch is counted (`train/small_batches_skipped`, a warning per epoch).

Layers: null takes the penultimate embedding of each net, the input of its last nn.Linear (`fc:input` on the
CIFAR ResNets, `classifier.3:input` on MnistCNN); a feature map given instead is flattened.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.methods.base import (
    LossTerms,
    Method,
    StepInputs,
    bind_embedding_layers,
    layer_spec,
    non_negative,
    register,
)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of e, with an exact 0 diagonal (and a finite gradient there)."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    def normalized(e: Tensor) -> Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean()

    with torch.no_grad():
        t = normalized(teacher)
    return F.smooth_l1_loss(normalized(student), t)


def angles(e: Tensor) -> Tensor:
    """cos of the angle at j of every triplet (i, j, k): <unit(e_i - e_j), unit(e_k - e_j)>."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    with torch.no_grad():
        t = angles(teacher)
    return F.smooth_l1_loss(angles(student), t)


@register
class RKD(Method):
    name = "rkd"
    defaults = {"student_layer": None, "teacher_layer": None, "distance_weight": 25.0, "angle_weight": 50.0,
                "ce_weight": 1.0}
    min_batch = 2
    hparams = {"student_layer": layer_spec, "teacher_layer": layer_spec, "distance_weight": non_negative,
               "angle_weight": non_negative, "ce_weight": non_negative}

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.distance_weight, self.angle_weight = self.hp["distance_weight"], self.hp["angle_weight"]
        self.ce_weight = self.hp["ce_weight"]

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        bind_embedding_layers(self, student, teacher)

    def forward(self, step: StepInputs) -> LossTerms:
        ce = F.cross_entropy(step.logits, step.labels)
        s = step.features[self.student_layers[0]].flatten(1)
        t = step.teacher_features[self.teacher_layers[0]].flatten(1)
        if self.skip_small_batch(len(s)):
            dist = angle = s.new_zeros(())
        else:
            dist, angle = distance_loss(s, t), angle_loss(s, t)
        loss = self.ce_weight * ce + self.distance_weight * dist + self.angle_weight * angle
        return {"loss": loss, "hard_loss": ce, "distance_loss": dist, "angle_loss": angle}
