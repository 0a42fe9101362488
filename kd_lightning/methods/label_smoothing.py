"""label_smoothing: cross-entropy against labels smoothed by epsilon (Szegedy et al. 2016, "Rethinking the
Inception Architecture"), the target being (1 - epsilon) * one_hot + epsilon / K. A no-teacher baseline: no
teacher is built or trained."""

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from kd_lightning.methods.base import LossTerms, Method, StepInputs, register, unit_interval


@register
class LabelSmoothing(Method):
    name = "label_smoothing"
    defaults = {"epsilon": 0.1}
    hparams = {"epsilon": unit_interval}
    uses_teacher = False

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.epsilon = self.hp["epsilon"]

    def forward(self, step: StepInputs) -> LossTerms:
        loss = F.cross_entropy(step.logits, step.labels, label_smoothing=self.epsilon)
        return {"loss": loss, "smoothed_ce": loss}
