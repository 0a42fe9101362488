"""crd: Contrastive Representation Distillation (Tian et al., ICLR 2020), with the memory-bank NCE of the
authors' code (RepDistiller crd/criterion.py CRDLoss, crd/memory.py ContrastMemory; mdistiller's CRD is a copy).

Each net's penultimate embedding f is projected by the method's own linear head and L2-normalized:
v_s = unit(W_s f_s + b_s), v_t = unit(W_t f_t + b_t) (feat_dim 128). Two memory banks hold one unit vector per
training example, M_s (students') and M_t (teachers'), N x feat_dim each. For anchor i of a batch of B, with
K negatives j_1..j_K (other classes' examples, as RepDistiller's CIFAR100InstanceSample draws them) and j_0 = i:
    P_s[i, k] = exp(<M_t[j_k], v_s_i> / tau) / Z_s        P_t[i, k] = exp(<M_s[j_k], v_t_i> / tau) / Z_t
where Z_s, Z_t are fixed on the first training batch to N * mean(exp(<., .> / tau)) of that batch (the NCE
normalization constant, saved with the bank). With the noise rate m Pn = K / N and eps = 1e-7 (ContrastLoss):
    L_nce(P) = -(1/B) sum_i [ log(P[i,0] / (P[i,0] + K/N + eps)) + sum_{k>=1} log((K/N) / (P[i,k] + K/N + eps)) ]
    loss = ce_weight * CE + weight * (L_nce(P_s) + L_nce(P_t)) [+ kd_weight * T^2 KL at distill.T]
After the scores, both banks move towards the batch's embeddings (no gradient):
    M_s[i] <- unit(momentum * M_s[i] + (1 - momentum) * v_s_i),   M_t[i] likewise with v_t_i.
Defaults (RepDistiller train_student.py / mdistiller cfg.CRD): feat_dim 128, nce_k 16384, nce_t 0.07,
momentum 0.5, weight 0.8 (-b 0.8), ce_weight 1, kd_weight 0 (-a 0: CRD alone).

The banks are buffers of the method (`method.memory_s`, `method.memory_t`, `method.z`): saved in every checkpoint
and restored on resume. Batches carry their examples' positions in the train split (the KDDataModule
contract), which index the banks. Under DDP every rank updates its bank with the whole global batch.
"""

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import kd_term
from kd_lightning.methods.base import (
    CHECKS,
    LossTerms,
    Method,
    StepInputs,
    bind_embedding_layers,
    layer_spec,
    non_negative,
    one_of,
    positive,
    register,
)

log = logging.getLogger(__name__)

NEGATIVES = ("other_classes", "uniform")  # RepDistiller's 'exact' dataset sampling; ContrastMemory's own draw
EPS = 1e-7  # ContrastLoss's


def positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def momentum_value(v: object) -> bool:
    return non_negative(v) and v < 1


negative_sampling = one_of(*NEGATIVES)
CHECKS.update({positive_int: "an integer > 0", momentum_value: "a number in [0, 1)"})


# ---- the pieces, as functions of tensors (hand-checked in tests/test_crd.py) ------------------------------------
def nce_loss(p: Tensor, n_data: int) -> Tensor:
    """ContrastLoss: p (B, K+1) normalized scores, column 0 the positive; noise distribution Pn = 1/n_data."""
    k = p.shape[1] - 1
    noise = k / n_data
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def contrast_scores(bank: Tensor, anchors: Tensor, contrast_idx: Tensor, tau: float) -> Tensor:
    """exp(<bank[contrast_idx[i, k]], anchors[i]> / tau), (B, K+1); the bank rows carry no gradient. In the
    bank's precision (float32) even under mixed precision: exp(1 / 0.07) = 1.6e6 overflows float16."""
    rows = bank.index_select(0, contrast_idx.flatten()).view(*contrast_idx.shape, -1).detach()
    with torch.autocast(anchors.device.type, enabled=False):
        return torch.exp(torch.bmm(rows, anchors.to(rows.dtype).unsqueeze(2)).squeeze(2) / tau)


@torch.no_grad()
def momentum_update(bank: Tensor, idx: Tensor, v: Tensor, momentum: float) -> None:
    """bank[idx] <- unit(momentum * bank[idx] + (1 - momentum) * v), in place."""
    rows = bank.index_select(0, idx).mul_(momentum).add_(v.detach().to(bank.dtype), alpha=1 - momentum)
    bank.index_copy_(0, idx, F.normalize(rows, dim=1))


def sample_contrast(idx: Tensor, labels: Tensor, k: int, negatives: str) -> Tensor:
    """(B, K+1) bank rows: column 0 the anchor's own index, then K negatives per anchor, drawn uniformly either
    among the other classes' examples without replacement (`other_classes`) or among all with replacement
    (`uniform`)."""
    n = len(labels)
    if negatives == "uniform":
        neg = torch.randint(n, (len(idx), k), device=idx.device)
    else:
        keys = torch.rand(len(idx), n, device=idx.device)
        keys.masked_fill_(labels.unsqueeze(0) == labels.index_select(0, idx).unsqueeze(1), 2.0)  # never drawn
        neg = keys.topk(k, dim=1, largest=False, sorted=False).indices
    return torch.cat([idx.unsqueeze(1), neg], dim=1)


def gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor's rows from every DDP rank, concatenated (batches may differ in size); as given without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    size = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]))
    return tuple(out)


def bank_mib(n_data: int, feat_dim: int) -> float:
    """The two banks: N x feat_dim float32 each."""
    return n_data * feat_dim * 4 * 2 / 2**20


def step_rows_mib(batch_size: int, nce_k: int, feat_dim: int) -> float:
    """The bank rows one step gathers: B x (K+1) x feat_dim float32 per bank."""
    return batch_size * (nce_k + 1) * feat_dim * 4 * 2 / 2**20


class Embed(nn.Module):
    """RepDistiller's Embed: flatten, linear, L2-normalize."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@register
class CRD(Method):
    name = "crd"
    defaults = {"student_layer": None, "teacher_layer": None, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                "momentum": 0.5, "negatives": "other_classes", "weight": 0.8, "ce_weight": 1.0, "kd_weight": 0.0,
                "max_memory_mib": 4096}
    hparams = {"student_layer": layer_spec, "teacher_layer": layer_spec, "feat_dim": positive_int,
               "nce_k": positive_int, "nce_t": positive, "momentum": momentum_value, "negatives": negative_sampling,
               "weight": non_negative, "ce_weight": non_negative, "kd_weight": non_negative,
               "max_memory_mib": positive}

    memory_s: Tensor
    memory_t: Tensor
    z: Tensor

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__(distill)
        hp = self.hp
        self.feat_dim, self.nce_k, self.nce_t, self.momentum = hp["feat_dim"], hp["nce_k"], hp["nce_t"], hp["momentum"]
        self.negatives, self.max_memory_mib = hp["negatives"], hp["max_memory_mib"]
        self.weight, self.ce_weight, self.kd_weight = hp["weight"], hp["ce_weight"], hp["kd_weight"]
        self.needs_teacher_targets = self.kd_weight > 0
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.n_data = 0

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        bind_embedding_layers(self, student, teacher)

    def bind_data(self, datamodule: Any) -> None:
        self.make_bank(datamodule.split_labels("train"), getattr(datamodule, "batch_size", None))

    def make_bank(self, labels: Tensor, batch_size: int | None = None) -> None:
        """The banks for a training split with these labels (dataset order), refused in one line when the
        split has too few negatives for nce_k or the banks and one step's rows would pass max_memory_mib."""
        n, k = len(labels), self.nce_k
        if self.negatives == "other_classes":
            available = n - int(torch.bincount(labels).max()) if n else 0
            if k > available:
                raise ConfigError(f"distill.crd.nce_k={k} is not accepted: the training split of {n} examples has "
                                  f"at most {available} of other classes per anchor; use nce_k <= {available} "
                                  "(or distill.crd.negatives=uniform with nce_k < N)")
        elif k >= n:
            raise ConfigError(f"distill.crd.nce_k={k} is not accepted: it must be below the training split's "
                              f"{n} examples")
        bank = bank_mib(n, self.feat_dim)
        rows = step_rows_mib(batch_size, k, self.feat_dim) if batch_size else 0.0
        if bank + rows > self.max_memory_mib:
            raise ConfigError(
                f"distill.crd.max_memory_mib={self.max_memory_mib} is exceeded: the memory banks (N {n} x feat_dim "
                f"{self.feat_dim} x 4 B x 2 = {bank:.1f} MiB) and one step's sampled rows (batch {batch_size} x "
                f"(nce_k {k} + 1) x {self.feat_dim} x 4 B x 2 = {rows:.1f} MiB) need {bank + rows:.1f} MiB; lower "
                "distill.crd.nce_k, distill.crd.feat_dim or data.batch_size, or raise the limit")
        log.info("distill.crd: memory banks N %d x feat_dim %d x 4 B x 2 = %.1f MiB (saved in checkpoints); "
                 "each step gathers %.1f MiB of bank rows (nce_k %d)", n, self.feat_dim, bank, rows, k)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)  # ContrastMemory's initialization
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; < 0: set on the first training batch
        self.register_buffer("labels", labels.long().clone(), persistent=False)
        self.n_data = n

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        self.embed_s = Embed(features[self.student_layers[0]].flatten(1).shape[1], self.feat_dim)
        self.embed_t = Embed(teacher_features[self.teacher_layers[0]].flatten(1).shape[1], self.feat_dim)

    def normalization(self, side: int, scores: Tensor) -> float:
        """Z for `side` (0 student anchors, 1 teacher anchors), set from the first batch's scores and kept."""
        if self.z[side] < 0:
            z = scores.detach().mean() * self.n_data
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.z[side] = z
            log.info("distill.crd: normalization constant Z_%s set to %.1f", "st"[side], z.item())
        return self.z[side].item()

    def forward(self, step: StepInputs) -> LossTerms:
        if self.embed_s is None or not self.n_data:
            raise RuntimeError("distill.method=crd: bind_data() (the training split) and build() come before training")
        if step.indices is None:
            raise ValueError("distill.method=crd needs the batch's dataset indices (KDDataModule training batches)")
        ce = F.cross_entropy(step.logits, step.labels)
        v_s = self.embed_s(step.features[self.student_layers[0]])
        v_t = self.embed_t(step.teacher_features[self.teacher_layers[0]])
        idx = step.indices.to(self.memory_s.device)
        contrast_idx = sample_contrast(idx, self.labels, self.nce_k, self.negatives)
        out_s = contrast_scores(self.memory_t, v_s, contrast_idx, self.nce_t)  # student anchors, teacher bank
        out_t = contrast_scores(self.memory_s, v_t, contrast_idx, self.nce_t)
        out_s = out_s / self.normalization(0, out_s)
        out_t = out_t / self.normalization(1, out_t)
        loss_s, loss_t = nce_loss(out_s, self.n_data), nce_loss(out_t, self.n_data)
        all_s, all_t, all_idx = gather_rows(v_s.detach(), v_t.detach(), idx)
        momentum_update(self.memory_s, all_idx, all_s, self.momentum)
        momentum_update(self.memory_t, all_idx, all_t, self.momentum)
        crd = loss_s + loss_t
        loss = self.ce_weight * ce + self.weight * crd
        terms = {"hard_loss": ce, "crd_loss": crd}
        if self.kd_weight > 0:
            kd = kd_term(step.logits, step.teacher_log_probs, self.T)
            loss = loss + self.kd_weight * kd
            terms["soft_loss"] = kd
        return {"loss": loss, **terms}
