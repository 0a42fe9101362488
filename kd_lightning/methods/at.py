"""at: attention transfer (Zagoruyko & Komodakis 2017), activation-based. For a feature map A (C x H x W) the
attention map is Q = mean_c |A_c|^p flattened over H x W, then normalized to unit L2 norm; per stage pair the
loss is the mean squared difference of the student's and the teacher's maps, and
    loss = ce_weight * CE + beta * sum over pairs
with beta = 1000 and p = 2 applied as the authors' code (attention-transfer/cifar.py, `opt.beta * sum(loss_groups)`;
utils.py, at_loss), mdistiller (AT.py, FEAT_WEIGHT 1000) and RepDistiller (distiller_zoo/AT.py, `-b 1000`) apply
it: without the paper's 1/2. When the two maps of a pair differ in height or width, the larger is average-pooled
to the smaller's size first (F.adaptive_avg_pool2d), as mdistiller's and RepDistiller's at_loss do (no parameters).

Layers: null pairs each of the student's declared feature maps (`feature_layers`) with the teacher's at the
same position (CIFAR 2-stage student: layer1/layer1, layer2/layer2; MNIST conv student: features.1, features.3).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.methods.base import (
    LossTerms,
    Method,
    StepInputs,
    default_feature_layers,
    find_module,
    layer_specs,
    non_negative,
    positive,
    register,
)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Unit-norm spatial attention map of (N, C, H, W) features: (N, H*W)."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def pool_to_common_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The larger of two (N, C, H, W) maps average-pooled to the smaller's height and width (each dimension to
    the smaller of the two); maps of the same size are returned as they are."""
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    return tuple(f if tuple(f.shape[2:]) == size else F.adaptive_avg_pool2d(f, size) for f in (student, teacher))


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    student, teacher = pool_to_common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register
class AT(Method):
    name = "at"
    defaults = {"student_layers": None, "teacher_layers": None, "beta": 1000.0, "p": 2.0, "ce_weight": 1.0}
    hparams = {"student_layers": layer_specs, "teacher_layers": layer_specs, "beta": non_negative, "p": positive,
               "ce_weight": non_negative}

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.beta, self.p, self.ce_weight = self.hp["beta"], self.hp["p"], self.hp["ce_weight"]

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s = list(self.hp["student_layers"] or default_feature_layers(student, "student", "distill.at.student_layers"))
        for spec in s:
            find_module(student, spec, "distill.at.student_layers")
        self.student_layers = s
        if teacher is not None:
            t = list(self.hp["teacher_layers"] or default_feature_layers(teacher, "teacher", "distill.at.teacher_layers"))
            if len(t) < len(s) or (self.hp["teacher_layers"] and len(t) != len(s)):
                raise ConfigError(f"distill.at.teacher_layers={t} is not accepted: one teacher layer per student "
                                  f"layer {s} is needed")
            for spec in t:
                find_module(teacher, spec, "distill.at.teacher_layers")
            self.teacher_layers = t[: len(s)]

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        for s, t in zip(self.student_layers, self.teacher_layers):
            fs, ft = features[s], teacher_features[t]
            if fs.dim() != 4 or ft.dim() != 4:
                raise ConfigError(f"distill.at: student layer {s} {tuple(fs.shape[1:])} and teacher layer {t} "
                                  f"{tuple(ft.shape[1:])} are not accepted: feature maps (C, H, W)")

    def forward(self, step: StepInputs) -> LossTerms:
        ce = F.cross_entropy(step.logits, step.labels)
        at = torch.stack([at_loss(step.features[s], step.teacher_features[t], self.p)
                          for s, t in zip(self.student_layers, self.teacher_layers)]).sum()
        return {"loss": self.ce_weight * ce + self.beta * at, "hard_loss": ce, "at_loss": at}
