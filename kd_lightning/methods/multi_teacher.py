"""multi_teacher: KD from several teachers whose softened outputs are averaged (optionally weighted), the
ensemble-averaged targets of Hinton et al. 2015 / You et al. 2017:
    target(T) = sum_i w_i softmax(z_i / T),   loss = kd's `distill.group` loss against target(T).
The ensemble is a TeacherEnsemble whose "logits" are T * log target(T), so that softmax(logits / T) is exactly
the averaged target and everything kd does (cached soft targets, val/test agreement and teacher accuracy,
the KD term) applies unchanged; with identical teachers it is kd.

Teachers: `distill.multi_teacher.teachers`, a list of specs shaped like the `teacher:` config (experiment,
overrides, ckpt_path). Each is ensured exactly as the single teacher is (train.py's ensure_teacher: its own
cache entry, trained once if needed) and each has its own logit cache; the ensemble's logits are combined
from those. `weights`: null (equal) or one non-negative weight per teacher (normalized to sum 1).

With `distill.logit_standardization=true` each teacher's logits are z-scored before its softmax (at
`distill.base_T`), and so are the student's: target = sum_i w_i softmax(std(z_i) / base_T).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import soft_targets, standardize
from kd_lightning.methods.base import TeacherLoader, TeacherLogits, config_value, register
from kd_lightning.methods.kd import KD


def ensemble_logits(logits: Sequence[Tensor], weights: Tensor, T: float, standardized: bool = False) -> Tensor:
    """T * log sum_i w_i softmax(z_i / T): logits whose softmax at T is the weighted mean of the teachers'
    (z_i z-scored first with `standardized`)."""
    prepare = standardize if standardized else (lambda z: z)
    log_probs = torch.stack([F.log_softmax(prepare(z) / T, dim=-1) for z in logits])  # (teachers, N, C)
    log_w = weights.to(log_probs).log().view(-1, *[1] * (log_probs.dim() - 1))
    return T * torch.logsumexp(log_probs + log_w, dim=0)


class TeacherEnsemble(nn.Module):
    def __init__(self, teachers: Sequence[nn.Module], weights: Tensor, T: float, standardized: bool = False) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.register_buffer("weights", weights, persistent=False)
        self.T, self.standardized = T, standardized
        self.num_classes = teachers[0].num_classes

    def forward(self, x: Tensor) -> Tensor:
        return ensemble_logits([t(x) for t in self.teachers], self.weights, self.T, self.standardized)


def normalized_weights(weights: Sequence[float] | None, n: int) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n)
    w = torch.tensor([float(v) for v in weights])
    return w / w.sum()


@register
class MultiTeacher(KD):
    name = "multi_teacher"
    defaults = {"teachers": [{"experiment": "teacher", "overrides": [], "ckpt_path": None},
                             {"experiment": "teacher", "overrides": ["seed=43"], "ckpt_path": None}],
                "weights": None}

    @classmethod
    def check(cls, distill: Mapping[str, Any]) -> None:
        super().check(distill)  # the logit-standardization switch
        section = cls.settings(distill)
        teachers, weights = section.get("teachers"), section.get("weights")
        if not teachers or not all(isinstance(t, Mapping) and t.get("experiment") for t in teachers):
            raise ConfigError(f"distill.multi_teacher.teachers={teachers!r} is not accepted: a non-empty list of "
                              "teacher specs, each with an experiment (and optional overrides, ckpt_path)")
        if weights is not None and (
            len(weights) != len(teachers) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                                 for w in weights) or sum(weights) <= 0
        ):
            raise ConfigError(f"distill.multi_teacher.weights={list(weights)!r} is not accepted: null (equal) or "
                              f"{len(teachers)} non-negative weights, not all 0")

    @classmethod
    def teacher_runs(cls, cfg: Any) -> list[Any]:
        """The run's config once per spec, `teacher:` replaced by it: each teacher has its own cache entry."""
        runs = []
        for spec in cls.settings(cfg.distill)["teachers"]:
            one = cfg.copy()
            one.teacher = OmegaConf.merge({"ckpt_path": None, "overrides": []}, spec)
            runs.append(one)
        return runs

    @classmethod
    def load_teacher(cls, cfg: Any, ckpts: list[Path], load: TeacherLoader) -> nn.Module | None:
        """The ensemble of the teachers of `teacher_runs`, each rebuilt from its checkpoint."""
        teachers = [load(run, ckpt) for run, ckpt in zip(cls.teacher_runs(cfg), ckpts)]
        weights = normalized_weights(cls.settings(cfg.distill).get("weights"), len(teachers))
        standardized = bool(cfg.distill.get("logit_standardization", False))
        return TeacherEnsemble(teachers, weights, cfg.distill.base_T if standardized else cfg.distill.T, standardized)

    @classmethod
    def cached_teacher_logits(cls, teacher: nn.Module, ckpts: list[Path], logits_of: TeacherLogits
                              ) -> dict[str, Tensor]:
        """Each teacher's logits from its own cache, combined into the ensemble's."""
        assert isinstance(teacher, TeacherEnsemble)
        per_teacher = [logits_of(c, t) for c, t in zip(ckpts, teacher.teachers)]
        return {split: ensemble_logits([p[split] for p in per_teacher], teacher.weights, teacher.T, teacher.standardized)
                for split in per_teacher[0]}

    @classmethod
    def describe(cls, distill: Mapping[str, Any]) -> str:
        hp = cls.settings(distill)
        return f"{super().describe(distill)}, {len(hp['teachers'])} teachers, weights={config_value(hp.get('weights'))}"

    def teacher_targets(self, teacher_logits: Tensor) -> Tensor:
        """log softmax(ensemble logits / T): the ensemble's logits are z-scored per teacher already."""
        return soft_targets(teacher_logits, self.T)
