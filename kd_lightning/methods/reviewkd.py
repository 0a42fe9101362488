"""reviewkd: knowledge review (Chen et al., CVPR 2021): attention-based fusion (ABF) of the student's stages,
deepest first, and the hierarchical context loss (HCL), as the authors' code (dvlab-research/ReviewKD
CIFAR-100/model/reviewkd.py ABF, ReviewKD, hcl) and mdistiller's copy (mdistiller/distillers/ReviewKD.py).

Stages: the student's maps X_1..X_n (shallow to deep; the last is the penultimate embedding as a 1x1 map) and
the teacher's T_1..T_n at the same positions. One ABF per stage, with mid = min(max_mid_channels, C(X_n)):
    ABF_n:  r_n = BN(conv1x1(X_n))                                   (the deepest: nothing to fuse)
    ABF_i:  x = BN(conv1x1(X_i)); r = nearest-resize(r_{i+1}, size of X_i);
            (a, b) = sigmoid(conv1x1([x, r]))   (two per-pixel weights);   r_i = a * x + b * r
    both:   r_i <- nearest-resize(r_i, size of T_i);   Y_i = BN(conv3x3(r_i))   (to T_i's channels)
The HCL of one pair compares the maps, then their 4x4, 2x2 and 1x1 average pools (each kept only when
smaller than the map's height h) with halving weights 1/2, 1/4, 1/8, normalized by the weights' sum:
    HCL(Y, T) = (MSE(Y, T) + sum_l w_l MSE(pool_l(Y), pool_l(T))) / (1 + sum_l w_l)
    loss = ce_weight * CE + weight * min(epoch / warmup_epochs, 1) * sum_i HCL(Y_i, T_i)
with `epoch` counted from 1 (mdistiller's trainer): 1/W through the first epoch, 1 from the start when W <= 1.

Layers: null takes each net's declared stages (`feature_layers`) and the input of its last nn.Linear (the
pooled embedding, as a 1x1 map); the teacher's stages are paired by position with the student's (a two-stage
student: the teacher's first two stages and its pooled embedding). The ABFs are the method's own trainable
parts (`method.abfs.*`), saved with the student and not needed at inference. A batch of one example cannot
normalize the 1x1 stage: its ReviewKD term is skipped (CE only) and counted (train/small_batches_skipped).
"""

from collections.abc import Mapping, Sequence
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
    last_linear_input,
    layer_specs,
    non_negative,
    register,
)
from kd_lightning.methods.crd import positive_int
from kd_lightning.methods.dkd import warmup_factor

HCL_LEVELS = (4, 2, 1)


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """The hierarchical context loss, summed over stage pairs of equal shape (N, C, H, W)."""
    total = student[0].new_zeros(())
    for fs, ft in zip(student, teacher, strict=True):
        h = fs.shape[2]
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        total = total + loss / weights
    return total


def as_map(features: Tensor) -> Tensor:
    """(N, C) embeddings as (N, C, 1, 1) maps; maps unchanged."""
    return features[:, :, None, None] if features.dim() == 2 else features


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the residual from the deeper stages (the reference's)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(the stage's output, at out_size with the teacher stage's channels; the residual for the next)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None, "every ABF but the deepest fuses the deeper stages' residual"
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


@register
class ReviewKD(Method):
    name = "reviewkd"
    defaults = {"student_layers": None, "teacher_layers": None, "weight": 1.0, "warmup_epochs": 1.0, "ce_weight": 1.0,
                "max_mid_channels": 512}
    min_batch = 2  # BatchNorm cannot normalize the 1x1 stage of one example
    hparams = {"student_layers": layer_specs, "teacher_layers": layer_specs, "weight": non_negative,
               "warmup_epochs": non_negative, "ce_weight": non_negative, "max_mid_channels": positive_int}

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        self.weight, self.warmup_epochs, self.ce_weight = self.hp["weight"], self.hp["warmup_epochs"], self.hp["ce_weight"]
        self.max_mid_channels = self.hp["max_mid_channels"]
        self.abfs = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        key = "distill.reviewkd.student_layers"
        s = list(self.hp["student_layers"] or [*default_feature_layers(student, "student", key), last_linear_input(student)])
        for spec in s:
            find_module(student, spec, key)
        self.student_layers = s
        if teacher is None:
            return
        key = "distill.reviewkd.teacher_layers"
        if self.hp["teacher_layers"]:
            t = list(self.hp["teacher_layers"])
        else:
            maps = default_feature_layers(teacher, "teacher", key)
            if len(maps) < len(s) - 1:
                raise ConfigError(f"{key}=null pairs the student's {len(s) - 1} stages with the teacher's first ones, "
                                  f"but {type(teacher).__name__} declares {len(maps)}: set {key}")
            t = [*maps[: len(s) - 1], last_linear_input(teacher)]
        if len(t) != len(s):
            raise ConfigError(f"{key}={t} is not accepted: one teacher layer per student layer {s} is needed")
        for spec in t:
            find_module(teacher, spec, key)
        self.teacher_layers = t

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        shapes = [as_map(features[s]).shape[1:] for s in self.student_layers]
        teacher_shapes = [as_map(teacher_features[t]).shape[1:] for t in self.teacher_layers]
        for spec, shape in zip([*self.student_layers, *self.teacher_layers], [*shapes, *teacher_shapes]):
            if len(shape) != 3:
                raise ConfigError(f"distill.reviewkd: layer {spec} gives features of shape {tuple(shape)}: accepted "
                                  "are feature maps (C, H, W) or flat embeddings (C)")
        mid = min(self.max_mid_channels, shapes[-1][0])
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < len(shapes) - 1) for i, (s, t) in enumerate(zip(shapes, teacher_shapes))
        )

    def fuse(self, features: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The ABF outputs per stage (shallow to deep), computed from the deepest stage up."""
        outputs: list[Tensor] = [features[0]] * len(features)
        residual = None
        for i in reversed(range(len(features))):
            outputs[i], residual = self.abfs[i](features[i], residual, out_sizes[i])
        return outputs

    def warmup(self, progress: float) -> float:
        """min(epoch / W, 1), epoch counted from 1 (mdistiller)."""
        return warmup_factor(progress, self.warmup_epochs)

    def forward(self, step: StepInputs) -> LossTerms:
        ce = F.cross_entropy(step.logits, step.labels)
        if self.skip_small_batch(len(step.labels)):  # counted, logged as train/small_batches_skipped
            review = ce.new_zeros(())
        else:
            teacher = [as_map(step.teacher_features[t]) for t in self.teacher_layers]
            student = self.fuse([as_map(step.features[s]) for s in self.student_layers], [t.shape[2:] for t in teacher])
            review = hcl_loss(student, teacher)
        loss = self.ce_weight * ce + self.weight * self.warmup(step.progress) * review
        return {"loss": loss, "hard_loss": ce, "reviewkd_loss": review}
