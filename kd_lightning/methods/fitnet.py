"""fitnet: FitNets hints (Romero et al. 2015), trained jointly with the task loss as in mdistiller / RepDistiller
(the paper's separate hint stage is left out). A regressor maps the student's hint layer to the teacher's
guided layer's shape; loss = ce_weight * CE + beta * MSE(regressor(student feature), teacher feature).
beta=100 is mdistiller's CIFAR-100 setting.

Layers: null pairs the student's last declared feature map (its `feature_layers`) with the teacher's map at
the same position (CIFAR: layer2 / layer2; MNIST conv student: features.3 / features.3).

The regressor is RepDistiller's / mdistiller's ConvReg (RepDistiller models/util.py, mdistiller
distillers/_common.py, ConvReg): a conv + BatchNorm + ReLU whose conv maps the student's (C_s, H_s, W_s) to the
teacher's (C_t, H_t, W_t):
    H_s = 2 H_t (and W):  3x3 conv, stride 2, padding 1
    2 H_s = H_t (and W):  4x4 transposed conv, stride 2, padding 1
    H_s >= H_t, W_s >= W_t: a (1 + H_s - H_t) x (1 + W_s - W_t) conv, no padding: 1x1 for maps of the same size
A student map smaller than the teacher's (other than half its size) is refused, as there. Flat features get a
linear layer (RepDistiller's Regress). It is trained with the student, saved as `method.regressor.*`, and not
needed at inference.
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
    register,
)


def conv_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module | None:
    """ConvReg for (C, H, W) maps: conv (see the module docstring) + BatchNorm + ReLU; None when the student's
    map is smaller than the teacher's other than by exactly half."""
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    if hs == 2 * ht and ws == 2 * wt:
        conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif 2 * hs == ht and 2 * ws == wt:
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register
class FitNet(Method):
    name = "fitnet"
    defaults = {"student_layer": None, "teacher_layer": None, "beta": 100.0, "ce_weight": 1.0}
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
        regressor = None
        if s.dim() == 4 and t.dim() == 4:
            regressor = conv_regressor(tuple(s.shape[1:]), tuple(t.shape[1:]))
        elif s.dim() == 2 and t.dim() == 2:
            regressor = nn.Linear(s.shape[1], t.shape[1])
        if regressor is None:
            raise ConfigError(
                f"distill.fitnet: student layer {self.student_layers[0]} {tuple(s.shape[1:])} and teacher layer "
                f"{self.teacher_layers[0]} {tuple(t.shape[1:])} cannot be matched: accepted are maps whose student "
                "side is at least the teacher's height and width, or exactly half of them, or flat features"
            )
        self.regressor = regressor

    def forward(self, step: StepInputs) -> LossTerms:
        assert self.regressor is not None, "build() makes the regressor before training"
        ce = F.cross_entropy(step.logits, step.labels)
        hint = F.mse_loss(self.regressor(step.features[self.student_layers[0]]),
                          step.teacher_features[self.teacher_layers[0]])
        return {"loss": self.ce_weight * ce + self.beta * hint, "hard_loss": ce, "hint_loss": hint}
