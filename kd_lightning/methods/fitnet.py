"""fitnet: FitNets hints (Romero et al. 2015), trained jointly with the task loss as in mdistiller / RepDistiller
(the paper's separate hint stage is left out). A regressor maps the student's hint layer to the teacher's
guided layer's shape; loss = ce_weight * CE + beta * MSE(regressor(student feature), teacher feature).
beta=100 is mdistiller's CIFAR-100 setting.

Layers: null pairs the student's last declared feature map (its `feature_layers`) with the teacher's map at
the same position (CIFAR: layer2 / layer2; MNIST conv student: features.3 / features.3). The regressor is a
3x3 conv + BatchNorm + ReLU for maps of the same spatial size (RepDistiller's ConvReg), a linear layer for
flat features. It is trained with the student, saved as `method.regressor.*`, and not needed at inference.
"""

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.methods.base import (
    LossTerms,
    Method,
    StepInputs,
    default_feature_layers,
    find_module,
    layer_spec,
    non_negative,
)


class FitNet(Method):
    name = "fitnet"
    hparams = {"student_layer": layer_spec, "teacher_layer": layer_spec, "beta": non_negative, "ce_weight": non_negative}

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.beta, self.ce_weight = self.hp["beta"], self.hp["ce_weight"]
        self.regressor: nn.Module | None = None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s = self.hp["student_layer"] or default_feature_layers(student, "student", "distill.fitnet.student_layer")[-1]
        find_module(student, s, "distill.fitnet.student_layer")
        self.student_layers = [s]
        if teacher is not None:
            t = self.hp["teacher_layer"]
            if t is None:  # the teacher's map at the student layer's position among its maps (else the last)
                student_maps = list(getattr(student, "feature_layers", ()))
                position = student_maps.index(s) if s in student_maps else -1
                t = default_feature_layers(teacher, "teacher", "distill.fitnet.teacher_layer")[position]
            find_module(teacher, t, "distill.fitnet.teacher_layer")
            self.teacher_layers = [t]

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        s, t = features[self.student_layers[0]], teacher_features[self.teacher_layers[0]]
        if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
            self.regressor = nn.Sequential(
                nn.Conv2d(s.shape[1], t.shape[1], 3, padding=1), nn.BatchNorm2d(t.shape[1]), nn.ReLU()
            )
        elif s.dim() == 2 and t.dim() == 2:
            self.regressor = nn.Linear(s.shape[1], t.shape[1])
        else:
            raise ConfigError(
                f"distill.fitnet: student layer {self.student_layers[0]} {tuple(s.shape[1:])} and teacher layer "
                f"{self.teacher_layers[0]} {tuple(t.shape[1:])} cannot be matched: accepted are maps of the same "
                "height and width, or flat features"
            )

    def forward(self, step: StepInputs) -> LossTerms:
        assert self.regressor is not None, "build() makes the regressor before training"
        ce = F.cross_entropy(step.logits, step.labels)
        hint = F.mse_loss(self.regressor(step.features[self.student_layers[0]]),
                          step.teacher_features[self.teacher_layers[0]])
        return {"loss": self.ce_weight * ce + self.beta * hint, "hard_loss": ce, "hint_loss": hint}
