"""TracIn (Pruthi et al. 2020, TracInCP): influence(z, z') = Σᵢ ηᵢ ∇ℓ(wᵢ, z) · ∇ℓ(wᵢ, z') over a run's checkpoints.

ηᵢ is read from checkpoint i's own optimizer state (`param_groups[...]["lr"]`), never assumed. Lightning saves
a checkpoint after the epoch's scheduler step, so that is the rate in force for the steps that follow the
checkpoint (for the MNIST teacher's StepLR, epochNNN.ckpt holds 0.7^(NNN+1): the rate of epoch NNN+1). We use it
as stored: it is the rate at which the training continued from wᵢ, which is what TracInCP's first-order
argument (a step of size η from wᵢ) describes.

Memory. Per checkpoint the test (query) embeddings are computed once and held; the training examples stream
through in chunks of C, each chunk's embeddings computed once and multiplied with all test embeddings. With E
numbers per embedding (P_flat + Σ_Linear(out + in + 1), or the projection's dim) and P_flat the non-factored
selected parameters, the peak is about

    4 bytes × [N_train·N_test (the scores) + N_train (self-influence) + (N_test + C)·E + C·P_flat]

(float32; the last term is the chunk's per-example gradients before projection), plus the forward/backward
activations of C examples. Everything but the scores is bounded by C and N_test, whatever N_train is.
"""

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from kd_lightning.checkpoints import load_checkpoint, load_net
from kd_lightning.config import is_distillation
from kd_lightning.errors import CheckpointError, InputError
from kd_lightning.influence.gradients import (
    Embedding,
    ExampleLoss,
    GradientEmbedder,
    RandomProjection,
    dot,
    select_parameters,
    squared_norms,
)
from kd_lightning.losses import get_loss_group, soft_targets

PERIODIC_PREFIX = "epoch"  # conf/callbacks/default.yaml: periodic_checkpoint writes epochNNN.ckpt (0-based epoch)


# ---- checkpoints -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TracInCheckpoint:
    path: Path
    epoch: int
    lr: float  # η: the learning rate stored in the checkpoint's optimizer state


def checkpoint_lr(checkpoint: dict[str, Any], path: Path) -> float:
    """The learning rate in the checkpoint's optimizer state; one rate for all parameter groups."""
    try:
        rates = {float(g["lr"]) for opt in checkpoint["optimizer_states"] for g in opt["param_groups"]}
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} holds no optimizer state with a learning rate (needed for TracIn's η)") from None
    if len(rates) != 1:
        raise CheckpointError(f"{path} has {len(rates)} learning rates {sorted(rates)}; TracIn here needs exactly one")
    return rates.pop()


def periodic_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """{epoch: path} of a train.py run dir's `checkpoints/epochNNN.ckpt`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run dir {run_dir} does not exist: pass a train.py run dir (logs/train/runs/<time>)")
    found = {}
    for path in (run_dir / "checkpoints").glob(f"{PERIODIC_PREFIX}*.ckpt"):
        number = path.stem[len(PERIODIC_PREFIX):]
        if number.isdigit():
            found[int(number)] = path
    if not found:
        raise InputError(
            f"{run_dir} has no periodic checkpoints (checkpoints/epochNNN.ckpt, written every 2 epochs): "
            "pass a train.py run dir that trained at least 2 epochs"
        )
    return dict(sorted(found.items()))


def common_epochs(teacher_run: Path, student_run: Path) -> list[int]:
    """The epochs at which both runs saved a periodic checkpoint."""
    teacher, student = periodic_checkpoints(teacher_run), periodic_checkpoints(student_run)
    epochs = sorted(set(teacher) & set(student))
    if not epochs:
        raise InputError(
            f"teacher_run={teacher_run} (epochs {sorted(teacher)}) and student_run={student_run} "
            f"(epochs {sorted(student)}) have no periodic checkpoint epoch in common"
        )
    return epochs


def tracin_checkpoints(run_dir: Path, epochs: Iterable[int]) -> list[TracInCheckpoint]:
    """The checkpoints of `epochs`, each with its η. A checkpoint stored with η = 0 (the end of a cosine schedule:
    training did not continue from it) adds nothing to any score: when that is every one, all scores would be 0
    and every comparison meaningless, so it is refused in one line."""
    paths = periodic_checkpoints(run_dir)
    checkpoints = [TracInCheckpoint(paths[e], e, checkpoint_lr(load_checkpoint(paths[e]), paths[e])) for e in epochs]
    if checkpoints and all(c.lr == 0 for c in checkpoints):
        raise InputError(
            f"{run_dir}: the checkpoints of epochs {[c.epoch for c in checkpoints]} store learning rate 0 (the "
            "end of its schedule: training did not continue from them), so every TracIn score would be 0; use "
            "a run with a periodic checkpoint (every 2 epochs) before its rate reaches 0, e.g. train 4 epochs or more")
    return checkpoints


# ---- the loss traced ---------------------------------------------------------------------------------------
def cross_entropy_loss(logits: Tensor, labels: Tensor, *_: Tensor) -> Tensor:
    """Cross-entropy on the true labels: teacher and student traced on the same footing (the default)."""
    return F.cross_entropy(logits, labels)


def trained_loss(run_cfg: Any) -> tuple[ExampleLoss, bool]:
    """The loss the run was trained with, and whether it needs the teacher's logits (as second target).

    A distillation run: its `distill.group` with its T and alpha. A teacher (ClassifierModule): cross-entropy,
    with the run's label smoothing if it had any."""
    if is_distillation(run_cfg):
        group_fn, needs_teacher = get_loss_group(run_cfg.distill.group)
        T, alpha = float(run_cfg.distill.T), float(run_cfg.distill.alpha)

        def distill_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
            targets = soft_targets(teacher_logits, T) if teacher_logits is not None else None
            return group_fn(logits, targets, labels, T, alpha)["loss"]

        return distill_loss, needs_teacher
    smoothing = float(run_cfg.module.get("label_smoothing", 0.0) or 0.0)

    def smoothed_ce(logits: Tensor, labels: Tensor, *_: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    return smoothed_ce, False


# ---- the scores --------------------------------------------------------------------------------------------
# An example source yields (inputs, targets) batches of at most `chunk_size` examples, in a fixed order;
# targets are (labels,) or (labels, teacher logits).
Batches = Callable[[int], Iterator[tuple[Tensor, tuple[Tensor, ...]]]]


def tensor_batches(x: Tensor, *targets: Tensor) -> Batches:
    """An example source over tensors held in memory."""

    def batches(chunk_size: int) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        for start in range(0, len(x), chunk_size):
            yield x[start : start + chunk_size], tuple(t[start : start + chunk_size] for t in targets)

    return batches


@dataclass
class TracInResult:
    scores: Tensor  # [N_train, N_test]: influence of train example i on test example j (positive: proponent)
    self_influence: Tensor  # [N_train]: Σᵢ ηᵢ ‖∇ℓ(wᵢ, z)‖²
    seconds: float
    param_names: list[str] = field(default_factory=list)
    num_params: int = 0
    embedding_width: int = 0
    checkpoints: list[TracInCheckpoint] = field(default_factory=list)

    @property
    def ms_per_value(self) -> float:
        return 1000.0 * self.seconds / self.scores.numel()


def _embed_all(embedder: GradientEmbedder, batches: Iterable[tuple[Tensor, tuple[Tensor, ...]]], scale: float,
               advance: Callable[[int], None]) -> Embedding:
    parts = []
    for x, targets in batches:
        parts.append(embedder.embed(x, targets, scale))
        advance(len(x))
    return Embedding.cat(parts)


def tracin(
    checkpoints: Sequence[TracInCheckpoint],
    train: Batches,
    test: Batches,
    n_train: int,
    n_test: int,
    params: str | Sequence[str] = "all",
    loss: ExampleLoss = cross_entropy_loss,
    chunk_size: int = 256,
    projection: RandomProjection | None = None,
    factor_linear: bool = True,
    load: Callable[[Path], nn.Module] = load_net,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    label: str = "",
) -> TracInResult:
    """TracIn scores of `n_train` training examples on `n_test` test examples over `checkpoints`.

    `params`: "all", "last" or a list of layer names / prefixes (see gradients.select_parameters). `train` and
    `test` yield the examples in the same order on every call. Memory: see the module docstring.
    """
    started = time.perf_counter()
    scores = torch.zeros(n_train, n_test, dtype=dtype, device=device)
    self_influence = torch.zeros(n_train, dtype=dtype, device=device)
    result = TracInResult(scores, self_influence, 0.0, checkpoints=list(checkpoints))
    total = len(checkpoints) * (n_train + n_test)

    def on_device(batches: Iterable[tuple[Tensor, tuple[Tensor, ...]]]):
        for x, targets in batches:
            yield x.to(device, dtype), tuple(t.to(device) if not t.is_floating_point() else t.to(device, dtype)
                                             for t in targets)

    with Progress(TextColumn("[bold]TracIn {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("examples"), TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task(label, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        for ckpt in checkpoints:
            net = load(ckpt.path).to(device, dtype).eval()
            names = select_parameters(net, params)
            embedder = GradientEmbedder(net, names, loss, factor_linear=factor_linear, projection=projection)
            scale = ckpt.lr**0.5  # √η on both sides: each dot product carries η once
            test_emb = _embed_all(embedder, on_device(test(chunk_size)), scale, advance)
            start = 0
            for x, targets in on_device(train(chunk_size)):
                emb = embedder.embed(x, targets, scale)
                scores[start : start + len(x)] += dot(emb, test_emb)
                self_influence[start : start + len(x)] += squared_norms(emb)
                start += len(x)
                advance(len(x))
            if start != n_train or len(test_emb) != n_test:
                raise ValueError(f"expected {n_train} train / {n_test} test examples, got {start} / {len(test_emb)}")
            result.param_names, result.num_params, result.embedding_width = names, embedder.num_params, test_emb.width
    result.seconds = time.perf_counter() - started
    return result
