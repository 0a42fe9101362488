"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". The template's original method:
`distill.group` picks hard (labels only), soft (the KD term only) or hard_soft (alpha * soft + (1-alpha) * hard)
at temperature `distill.T`; see kd_lightning/losses.py for the math."""

from collections.abc import Mapping
from typing import Any

from kd_lightning.losses import get_loss_group
from kd_lightning.methods.base import LossTerms, Method, StepInputs


class KD(Method):
    name = "kd"

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.group, self.alpha = distill["group"], distill["alpha"]
        self.loss_fn, self.needs_teacher_targets = get_loss_group(self.group)

    def forward(self, step: StepInputs) -> LossTerms:
        return self.loss_fn(step.logits, step.teacher_log_probs, step.labels, self.T, self.alpha)
