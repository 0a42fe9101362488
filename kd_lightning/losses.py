"""Distillation losses: the KD term and the registry of loss groups selected by `distill.group`.

Every metric and loss a run trains on is computed here; modules only call `LOSS_GROUPS[group]`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError


def soft_targets(teacher_logits: Tensor, T: float) -> Tensor:
    """The teacher's log-probabilities at temperature T, log softmax(teacher/T): the KD term's targets.

    Detached: gradients flow into the student only. Computed once per dataset when the teacher's logits are
    cached, so a training step pays only for the student's side of the KD term.
    """
    return F.log_softmax(teacher_logits.detach() / T, dim=-1)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row z-scored, (z - mean(z)) / (eps + std(z)), std with Bessel's correction as `torch.std`: logit
    standardization (Sun et al., CVPR 2024), exactly the reference code's `normalize` (logit-standardization-KD,
    mdistiller/distillers/KD.py). Unchanged, up to eps, by adding a constant to a row or scaling it by a > 0."""
    return (logits - logits.mean(-1, keepdim=True)) / (eps + logits.std(-1, keepdim=True))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al. 2015)."""
    return kd_term(student_logits, soft_targets(teacher_logits, T), T)


def kd_term(student_logits: Tensor, teacher_log_probs: Tensor, T: float) -> Tensor:
    """kd_loss with the teacher's side already computed (`soft_targets`).

    `batchmean` divides the summed KL by the batch size only; PyTorch's default `mean` would also divide by
    the number of classes. The T^2 factor keeps the soft term's gradient about the same size as T changes.
    """
    log_p_student = F.log_softmax(student_logits / T, dim=-1)
    return F.kl_div(log_p_student, teacher_log_probs, reduction="batchmean", log_target=True) * (T * T)


def stacked_log_softmax(logits: Tensor) -> Tensor:
    """log_softmax over the last dim, written out for the batched launcher's [S, B, C] logits.

    ATen's kernel costs ~150 ns a row when a row holds 10 classes: 0.25 ms, forward alone, for the 1,600 rows
    of 25 students' batches of 64, a tenth of the whole stacked step on a 2-core CPU; these four ops take a
    quarter of that (forward and backward). The max is a constant shift (detached: log-softmax does not change
    with it). It may round differently from F.log_softmax in the last bit. Computed in float32 at least, as
    autocast runs F.log_softmax (bf16-mixed).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted = logits - logits.detach().amax(-1, keepdim=True)
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def stacked_kd_term(student_logits: Tensor, teacher_log_probs: Tensor, T: Tensor) -> Tensor:
    """kd_term of S students at once (the batched launcher): logits and targets [S, B, C], T [S]; returns [S].

    kd_term's formula written out, because `kl_div` has no vmap rule: sum p_t (log p_t - log p_s) / B * T^2.
    """
    log_p_student = stacked_log_softmax(student_logits / T[:, None, None])
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_p_student)).sum((1, 2)) / student_logits.shape[1]
    return kl * (T * T)


def stacked_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Each of S students' mean cross-entropy: logits [S, B, C], labels [S, B]; returns [S]."""
    return -stacked_log_softmax(student_logits).gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(1)


LossTerms = dict[str, Tensor]
LossGroup = Callable[..., LossTerms]


# A group takes the student's logits, the teacher's `soft_targets` at T (None for `hard`), the labels, T, alpha;
# `soft_logits`, when given, are the student logits the soft term reads instead (logit standardization: the
# z-scored logits), the hard term reading the raw ones.
def hard_group(student_logits: Tensor, teacher_log_probs: Tensor | None, labels: Tensor, T: float, alpha: float,
               soft_logits: Tensor | None = None) -> LossTerms:
    """Cross-entropy on the labels only; the teacher is not needed."""
    hard = F.cross_entropy(student_logits, labels)
    return {"loss": hard, "hard_loss": hard}


def soft_group(student_logits: Tensor, teacher_log_probs: Tensor | None, labels: Tensor, T: float, alpha: float,
               soft_logits: Tensor | None = None) -> LossTerms:
    """The KD term only: the student never sees a label."""
    soft = kd_term(student_logits if soft_logits is None else soft_logits, teacher_log_probs, T)
    return {"loss": soft, "soft_loss": soft}


def hard_soft_group(
    student_logits: Tensor, teacher_log_probs: Tensor | None, labels: Tensor, T: float, alpha: float,
    soft_logits: Tensor | None = None,
) -> LossTerms:
    """alpha * soft + (1 - alpha) * hard: alpha weights the soft (teacher) term."""
    hard = F.cross_entropy(student_logits, labels)
    soft = kd_term(student_logits if soft_logits is None else soft_logits, teacher_log_probs, T)
    # lerp(hard, soft, alpha) = hard + alpha * (soft - hard): the weighted sum in one op instead of three.
    return {"loss": torch.lerp(hard, soft, alpha), "hard_loss": hard, "soft_loss": soft}


# name -> (loss function, needs the teacher's soft targets during training)
LOSS_GROUPS: dict[str, tuple[LossGroup, bool]] = {
    "hard": (hard_group, False),
    "soft": (soft_group, True),
    "hard_soft": (hard_soft_group, True),
}


def get_loss_group(name: str) -> tuple[LossGroup, bool]:
    if name not in LOSS_GROUPS:
        raise ConfigError(f"distill.group={name!r} is not a loss group; expected one of {sorted(LOSS_GROUPS)}")
    return LOSS_GROUPS[name]
