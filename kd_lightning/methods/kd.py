"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". The template's original method:
`distill.group` picks hard (labels only), soft (the KD term only) or hard_soft (alpha * soft + (1-alpha) * hard)
at temperature `distill.T`; see kd_lightning/losses.py for the math.

With `distill.logit_standardization=true` (Sun et al., CVPR 2024) the soft term reads z-scored logits, the
student's and the teacher's, at `distill.base_T` (the paper's base temperature 2):
    soft = base_T^2 * KL(softmax(std(z_t) / base_T) || softmax(std(z_s) / base_T)),  std(z) = (z - mean) / (1e-7 + sd)
and the hard term the raw logits (logit-standardization-KD, mdistiller/distillers/KD.py, kd_loss)."""

from collections.abc import Mapping
from typing import Any

from kd_lightning.losses import get_loss_group
from kd_lightning.methods.base import LossTerms, Method, StepInputs, register


@register
class KD(Method):
    name = "kd"

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.group, self.alpha = distill["group"], distill["alpha"]
        self.loss_fn, self.needs_teacher_targets = get_loss_group(self.group)

    @classmethod
    def describe(cls, distill: Mapping[str, Any]) -> str:
        """kd: its group and only the settings the group uses (T for soft terms, alpha to weigh them)."""
        group = distill["group"]
        T = f"T={distill['base_T']} (base_T), logit standardization" if distill.get("logit_standardization") \
            else f"T={distill['T']}"
        settings = {"hard": "", "soft": f" ({T})"}.get(group, f" ({T}, alpha={distill['alpha']})")
        return f"{cls.name}: {group}{settings}"

    def forward(self, step: StepInputs) -> LossTerms:
        soft_logits = self.prepare_logits(step.logits) if self.standardize else None
        return self.loss_fn(step.logits, step.teacher_log_probs, step.labels, self.T, self.alpha, soft_logits=soft_logits)
