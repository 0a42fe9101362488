"""Many students trained as one: the jobs of a group (same model, data, optimizer, epochs; their own seed, T,
alpha and loss group) stacked (torch.func.stack_module_state) and trained in one loop, each written out as a
separate run. The students are MLPs (groups.py admits no other), so the stacked forward is written out with
batched matrix products (`stacked_mlp`): vmap over functional_call costs ~1.5x more a step on a CPU.

Each student gets what a run of train.py gives it, computed the same way:
- its initial weights: `seed_everything(seed)` and then the model is built, as `build()` does;
- its data order: the TensorLoader permutation of its own seed and the epoch;
- its loss: every group is `lerp(hard, soft, w)` with w = alpha (hard_soft), 1 (soft) or 0 (hard): exactly the
  group's loss, so one stacked computation serves a mix of groups. The teacher's cached logits are shared;
  without the cache the teacher runs once per training batch for all the students that share the batch;
- its optimizer: one optimizer over the stacked parameters. Adam (and every torch optimizer without
  cross-parameter terms) is elementwise, so the stacked step is each student's own step;
- its callbacks, per student: best/last/every-n-epoch checkpoints (Lightning's layout and callback states),
  early stopping (Lightning's own EarlyStopping decides), a non-finite loss fails that student alone. A stopped
  or failed student takes no more steps: after each optimizer step its weights are put back;
- its TensorBoard run (epoch metrics, test-time figures, HParams), metrics.json with the keys train.py writes,
  and its model card.
"""

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.func import stack_module_state

from kd_lightning.batched.checkpoint_layout import checkpoint, student_optimizer_state
from kd_lightning.card import test_logits, write_card
from kd_lightning.checkpoints import (
    atomic_torch_save,
    atomic_write_text,
    file_sha256,
    load_net,
    remove_dead_temporaries,
)
from kd_lightning.errors import disk_error_message
from kd_lightning.losses import soft_targets, stacked_cross_entropy, stacked_kd_term
from kd_lightning.models.stats import count_params
from kd_lightning.run_dir import run_record
from kd_lightning.summary import hp_metrics_of, hparams_of, run_identity
from kd_lightning.sweeps import record_outcome
from kd_lightning.teacher import cached_teacher_logits, compose_teacher_config
from kd_lightning.tensorboard_figures import N_EXAMPLES, log_test_figures
from kd_lightning.trackers import finish_run
from kd_lightning.train import data_facts, ensure_teacher, fit_facts, prepare_data, teacher_file_facts
from kd_lightning.validation import validate_config

log = logging.getLogger(__name__)

# distill.group -> weight of the soft term in lerp(hard, soft, weight); hard_soft uses distill.alpha
SOFT_WEIGHT = {"hard": 0.0, "soft": 1.0}
LOGGED_TERMS = {"hard": ("loss", "hard_loss"), "soft": ("loss", "soft_loss"), "hard_soft": ("loss", "hard_loss", "soft_loss")}
# trainer.precision -> the dtype of the weights, and of the autocast region around forward and loss (as
# Lightning's MixedPrecision plugin: `trainer=gpu` sets bf16-mixed)
DTYPES = {"32": torch.float32, "32-true": torch.float32, "64": torch.float64, "64-true": torch.float64,
          "bf16-mixed": torch.float32}
AUTOCAST = {"bf16-mixed": torch.bfloat16}


@dataclass
class Job:
    """One job of the sweep: its config (paths.output_dir set to its job dir) and the overrides that made it."""

    cfg: DictConfig
    overrides: list[str]
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.cfg.paths.output_dir)

    def settings(self) -> dict[str, Any]:
        """The resolved config recorded with the job's result or failure (the sweep report reads it)."""
        return OmegaConf.to_container(self.cfg, resolve=True)


@dataclass
class Student:
    """The per-job state of the loop: callbacks, counters, logger."""

    job: Job
    best: ModelCheckpoint
    last: ModelCheckpoint
    periodic: ModelCheckpoint | None
    early_stopping: EarlyStopping | None
    logger: Any
    active: bool = True
    stop_requested: bool = False
    epochs: int = 0
    steps: int = 0
    best_state: dict[str, Tensor] | None = None
    error: str | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)


def unit_weight(cfg: DictConfig) -> float:
    return SOFT_WEIGHT.get(cfg.distill.group, cfg.distill.alpha)


def batches_per_epoch(n_batches: int, limit: Any) -> int:
    """Lightning's reading of trainer.limit_train_batches: a fraction of the batches or a count."""
    if limit is None:
        return n_batches
    if isinstance(limit, float):
        return int(n_batches * limit)
    return min(n_batches, int(limit))


def mlp_layers(params: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The stacked (weight [S, out, in], bias [S, out]) of each Linear of S MLPs (`layers.<i>.weight`), in order."""
    names = sorted({k.rsplit(".", 1)[0] for k in params}, key=lambda name: int(name.split(".")[1]))
    return [(params[f"{name}.weight"], params[f"{name}.bias"]) for name in names]


def stacked_mlp(layers: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """[S, B, classes] logits of S MLPs (Linear, ReLU, ..., Linear) on flat inputs: [S, B, in], or [B, in] when
    every student sees the same batch; then the first layers of all students are one matrix product."""
    for k, (w, b) in enumerate(layers):
        if k:
            x = torch.relu(x)
        if x.dim() == 2:
            x = torch.addmm(b.flatten(), x, w.flatten(0, 1).T).unflatten(1, w.shape[:2]).transpose(0, 1)
        else:
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    return x


def make_student(job: Job) -> Student:
    callbacks = {name: instantiate(c) for name, c in (job.cfg.get("callbacks") or {}).items()
                 if c is not None and name in ("model_checkpoint", "last_checkpoint", "periodic_checkpoint", "early_stopping")}
    loggers = [instantiate(c) for c in (job.cfg.get("logger") or {}).values() if c is not None]
    return Student(job, callbacks["model_checkpoint"], callbacks["last_checkpoint"],
                   callbacks.get("periodic_checkpoint"), callbacks.get("early_stopping"), loggers)


def fit_group(jobs: list[Job], state_key: str | None = None) -> list[dict[str, Any] | None]:
    """Train the jobs together; each job's metrics.json result (None for a failed job, with its failed.json).
    `state_key` names the group's saved state (`group_state_path`): the launcher keys it on every job of the
    group, finished or not, so that it is found again whichever of them finished since."""
    started = time.perf_counter()
    cfg = jobs[0].cfg
    precision = str(cfg.trainer.get("precision", "32-true"))
    dtype = DTYPES[precision]
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")

    # bf16-mixed: forward and loss under autocast, as Lightning's plugin runs them; else no context at all (a
    # disabled torch.autocast still costs ~20 us a step)
    autocast = (functools.partial(torch.autocast, device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST
                else contextlib.nullcontext)

    datamodule = prepare_data(cfg)
    teacher_ckpt = ensure_teacher(cfg, datamodule)  # the same teacher for the group: not a batched key
    teacher = load_net(teacher_ckpt, compose_teacher_config(cfg).model)
    online = not cfg.distill.cache_teacher_logits  # the teacher runs on every training batch, as in a single run
    if online:
        card_teacher_logits = test_logits(teacher, datamodule)[0]  # float32, as the model card computes them
        teacher = teacher.to(device, dtype)  # as Lightning casts the whole module (64-true)
        logits = {split: split_logits(teacher, datamodule, split, autocast) for split in ("val", "test")}
    else:
        logits = {split: t.to(device) for split, t in
                  cached_teacher_logits(teacher_ckpt, teacher, datamodule, Path(cfg.paths.cache_dir)).items()}
        train_logits = logits.pop("train")  # float32: a single run computes its soft targets from it in float32
        card_teacher_logits = logits["test"].cpu()  # float32, as the model card reads them
        logits = {split: t.to(dtype) for split, t in logits.items()}

    nets = []
    for job in jobs:  # as build() does: seed, then construct
        pl.seed_everything(job.cfg.seed, workers=True)
        nets.append(instantiate(job.cfg.model).to(device, dtype))
    net_config = OmegaConf.to_container(cfg.model, resolve=True)
    params, buffers = stack_module_state(nets)
    layers = mlp_layers(params)
    optimizer = instantiate(cfg.module.optimizer)(params=list(params.values()))
    frozen = {k: v.detach().clone() for k, v in params.items()}  # weights of stopped/failed students

    T = torch.tensor([float(j.cfg.distill.T) for j in jobs], dtype=dtype, device=device)
    weight = torch.tensor([float(unit_weight(j.cfg)) for j in jobs], dtype=dtype, device=device)
    students = [make_student(job) for job in jobs]
    # Each T's soft targets for the whole training split, once, in float32 as a single run computes them.
    temperatures = sorted(set(T.tolist()))
    student_T = torch.tensor([temperatures.index(t) for t in T.tolist()], device=device)[:, None]
    if not online:
        train_targets = torch.stack([soft_targets(train_logits, t) for t in temperatures]).to(dtype)
    # Students with the same data seed see the same batches: each batch is gathered once per data seed.
    data_seeds = sorted({int(j.cfg.data.seed) for j in jobs})
    student_order = torch.tensor([data_seeds.index(int(j.cfg.data.seed)) for j in jobs], device=device)

    images, labels = (t.to(device) for t in datamodule.splits["train"])
    batch_size = datamodule.batch_size
    n_batches = batches_per_epoch(-(-len(images) // batch_size), cfg.trainer.get("limit_train_batches"))
    val_batches = len(datamodule.val_dataloader())
    max_epochs, log_every = int(cfg.trainer.max_epochs), max(int(cfg.trainer.get("log_every_n_steps", 50)), 1)
    train_seconds, val_seconds = 0.0, 0.0
    state_path, first_epoch = group_state_path(jobs, state_key), 0
    saved, rows = load_group_state(state_path, jobs, device)
    if saved is not None:  # an interrupted earlier run of this group: continue after its last finished epoch
        first_epoch, (train_seconds, val_seconds) = saved["epoch"] + 1, saved["seconds"]
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved["params"][k].index_select(0, rows))
                frozen[k].copy_(saved["frozen"][k].index_select(0, rows))
        optimizer.load_state_dict(optimizer_rows(saved["optimizer"], rows))
        for s, r in zip(students, rows.tolist()):
            restore_student(s, saved["students"][r])
        log.info("Group of %d jobs resumes at epoch %d from %s", len(jobs), first_epoch + 1, state_path)
    else:  # outputs of an attempt that never finished an epoch (prepare_job sends ordinary runs' dirs elsewhere)
        for job in jobs:
            shutil.rmtree(job.dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(job.dir / "tensorboard", ignore_errors=True)

    set_up = time.perf_counter()
    for epoch in range(first_epoch, max_epochs):
        active = [s.active for s in students]
        if not any(active):
            break
        epoch_started = time.perf_counter()
        for s in students:
            if s.active and s.job.cfg.callbacks.get("lr_monitor") is not None:
                for lg in s.logger:
                    lg.log_metrics({f"lr-{type(optimizer).__name__}": optimizer.param_groups[0]["lr"]}, step=s.steps)
        orders = torch.stack([torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
                              for seed in data_seeds]).to(device)  # the TensorLoader's order of each data seed
        sums = torch.zeros(len(jobs), 3, dtype=dtype, device=device)
        count = 0
        # The active students step together, so they share one step count; the rest changes only when one fails.
        steps = next(s.steps for s, a in zip(students, active) if a)
        active_mask, frozen_rows = frozen_students(active, frozen, device)
        for b in range(n_batches):
            batch = orders[:, b * batch_size:(b + 1) * batch_size]  # [data seeds, batch]
            pixels = datamodule.normalize(images[batch.flatten()]).to(dtype)  # [data seeds * batch, 1, 28, 28]
            x = pixels.flatten(1).unflatten(0, batch.shape)
            # one batch for all: [batch, features], the first layers of all students in one matrix product
            x = x[0] if len(data_seeds) == 1 else x[student_order]
            idx = batch[student_order]  # [students, batch]
            optimizer.zero_grad()
            with autocast():
                student_logits = stacked_mlp(layers, x)
                hard = stacked_cross_entropy(student_logits, labels[idx])
                if online:  # the teacher once per data seed's batch, for all the students that share it
                    with torch.no_grad():
                        seed_logits = teacher(pixels).unflatten(0, batch.shape)  # [data seeds, batch, classes]
                    targets = torch.stack([soft_targets(seed_logits, t) for t in temperatures])[
                        student_T[:, 0], student_order]
                else:
                    targets = train_targets[student_T, idx]
                soft = stacked_kd_term(student_logits, targets, T)
                terms = torch.stack([torch.lerp(hard, soft, weight), hard, soft], dim=1)  # [students, 3]
            finite = torch.isfinite(terms[:, 0])
            if not bool(finite[active_mask].all()):  # one host sync a step, as a single run's check
                for i in torch.nonzero(~finite).flatten().tolist():
                    if active[i]:
                        students[i].steps = steps
                        fail(students[i], terms[i], epoch, params, frozen, i)
                        active[i] = False
                active_mask, frozen_rows = frozen_students(active, frozen, device)
            terms[:, 0].sum().backward()
            optimizer.step()
            if frozen_rows is not None:  # stopped and failed students: their weights put back
                with torch.no_grad():
                    for p, (rows, weights) in zip(params.values(), frozen_rows):
                        p.index_copy_(0, rows, weights)
            sums += terms.detach() * idx.shape[1]
            count += idx.shape[1]
            steps += 1
            if steps % log_every == 0:
                step_terms = terms.detach().cpu()
                for i, s in enumerate(students):
                    if active[i]:
                        s.steps = steps
                        log_step_terms(s, step_terms[i], epoch)
        for s, a in zip(students, active):
            if a:
                s.steps = steps
        train_seconds += time.perf_counter() - epoch_started

        val_started = time.perf_counter()
        val = evaluate(layers, datamodule, "val", logits["val"], T, dtype, autocast)
        val_seconds += time.perf_counter() - val_started
        writes: list[tuple[dict, Path]] = []
        group_optimizer_state = optimizer.state_dict()
        for i, s in enumerate(students):
            if not active[i]:
                continue
            s.epochs = epoch + 1
            s.val_metrics = val[i]
            means = {f"train/{name}": float(sums[i, k] / count) for k, name in enumerate(("loss", "hard_loss", "soft_loss"))
                     if name in LOGGED_TERMS[s.job.cfg.distill.group]}
            for lg in s.logger:  # two records at one step, as Lightning writes them
                lg.log_metrics({**val[i], "epoch": epoch}, step=s.steps - 1)
                lg.log_metrics({**means, "epoch": epoch}, step=s.steps - 1)
            # Lightning's order at the end of validation: early stopping decides (its own rule), and then the
            # checkpoint callbacks save, with the updated early-stopping state; the fit goes on until min_epochs.
            if s.early_stopping is not None:
                should_stop, reason = s.early_stopping._evaluate_stopping_criteria(torch.tensor(val[i]["val/loss"]))
                if should_stop:  # as EarlyStopping._run_early_stopping_check records it
                    s.early_stopping.stopped_epoch, s.early_stopping.stopping_reason_message = epoch, reason
                s.stop_requested |= should_stop
            state = {f"net.{k}": v[i].detach().clone().cpu() for k, v in {**params, **buffers}.items()}
            writes += end_of_epoch(s, epoch, state, net_config, (train_seconds, val_seconds),
                                   student_optimizer_state(group_optimizer_state, i), (n_batches, val_batches))
            if s.stop_requested and epoch + 1 >= int(cfg.trainer.get("min_epochs") or 1):
                stop(s, params, frozen, i)

        writes.append(({"epoch": epoch, "seconds": (train_seconds, val_seconds), "params": params, "frozen": frozen,
                        "optimizer": optimizer.state_dict(), "students": [student_state(s) for s in students],
                        "jobs": job_ids(jobs)}, state_path))
        with ThreadPoolExecutor(max_workers=8) as pool:  # each write waits on its fsync, not on the CPU
            list(pool.map(lambda write: atomic_torch_save(*write), writes))
        if epoch == first_epoch:  # which jobs the state holds, readable without loading it (remove_unusable_states)
            atomic_write_text(state_path.with_suffix(".json"), json.dumps({"jobs": job_ids(jobs)}))
        log.info("epoch %d/%d: %d of %d students trained, best val/acc %.4f (%.1f s)", epoch + 1, max_epochs,
                 sum(active), len(students), max((val[i]["val/acc"] for i in range(len(students)) if active[i]), default=float("nan")),
                 time.perf_counter() - epoch_started)

    trained = time.perf_counter()
    results = [finish(s, datamodule, logits, card_teacher_logits, T[i:i + 1], dtype, autocast, teacher, teacher_ckpt,
                      (time.perf_counter() - started) / len(jobs)) for i, s in enumerate(students)]
    state_path.unlink(missing_ok=True)
    state_path.with_suffix(".json").unlink(missing_ok=True)
    log.info("Group of %d jobs: %.1f s set-up (data, teacher logits, students), %.1f s training, %.1f s tests and "
             "outputs", len(jobs), set_up - started, trained - set_up, time.perf_counter() - trained)
    return results


# ---- resume: the group's state after each finished epoch, in <sweep dir>/.batched/ ----------------------------
STUDENT_FIELDS = ("active", "stop_requested", "epochs", "steps", "best_state", "error", "val_metrics")


# `<key>.pt` holds the stacked weights, optimizer and per-student loop state after the last finished epoch, one
# row per job, with the jobs' ids (`job_ids`); `<key>.json` lists those ids. The launcher's key covers every job of
# the group, so a rerun finds the state whichever jobs finished since (e.g. killed while writing the outputs), and
# resumes the others from their rows. A state that no group can use is removed (`remove_unusable_states`).
def state_key(members: list[Any]) -> str:
    """The key of a group's state: a hash of what identifies every job of the group (finished or not)."""
    return hashlib.sha256(json.dumps(members).encode()).hexdigest()[:16]


def job_ids(jobs: list[Job]) -> list[list[Any]]:
    return [[str(j.dir), list(j.overrides)] for j in jobs]


def group_state_path(jobs: list[Job], key: str | None = None) -> Path:
    return jobs[0].dir.parent / ".batched" / f"{key or state_key(job_ids(jobs))}.pt"


def load_group_state(path: Path, jobs: list[Job], device: torch.device) -> tuple[dict | None, Tensor | None]:
    """The saved state at `path` and the rows of `jobs` in it; (None, None) when there is none, or when it is
    damaged or does not hold every one of `jobs` (then it is removed: no group can use it)."""
    if not path.is_file():
        return None, None
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        ids = [[d, list(o)] for d, o in saved["jobs"]]
        rows = [ids.index(job_id) for job_id in job_ids(jobs)]
    except ValueError:
        log.warning("Group state %s does not hold every job of this group: training them from the start", path)
    except Exception as err:  # noqa: BLE001 - a damaged file (killed before its rename cannot be: it is atomic)
        log.warning("Group state %s is unreadable (%s): training the group from the start", path, type(err).__name__)
    else:
        return saved, torch.tensor(rows, dtype=torch.long, device=device)
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    return None, None


def optimizer_rows(state: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """The stacked optimizer's state_dict for the students at `rows`: elementwise state, so each tensor shaped like
    a stacked parameter is cut by rows; 0-dim ones (Adam's step) are shared."""
    return {"state": {k: {name: v.index_select(0, rows.to(v.device)) if isinstance(v, Tensor) and v.dim() else v
                          for name, v in param_state.items()} for k, param_state in state["state"].items()},
            "param_groups": state["param_groups"]}


def remove_unusable_states(batched_dir: Path) -> list[Path]:
    """Remove the group states in `batched_dir` that no group can use: those whose jobs all finished (their
    metrics.json records the same overrides), those without a readable job list (damaged, or written before
    states were keyed on the whole group), and temporaries of dead writers. Returns the states removed."""
    removed = []
    if not batched_dir.is_dir():
        return removed
    remove_dead_temporaries(batched_dir)
    for path in sorted(batched_dir.glob("*.pt")):
        try:
            ids = json.loads(path.with_suffix(".json").read_text())["jobs"]
            usable = any(not _finished(Path(d), overrides) for d, overrides in ids)
        except (OSError, ValueError, KeyError, TypeError):
            usable = False
        if not usable:
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("Removed %d group state(s) no group can use from %s", len(removed), batched_dir)
    return removed


def _finished(job_dir: Path, overrides: list[str]) -> bool:
    try:
        return json.loads((job_dir / "metrics.json").read_text()).get("overrides") == overrides
    except (OSError, ValueError, AttributeError):
        return False


# What a ModelCheckpoint's checkpoint state holds, and current_score, which it does not save but compares with.
CHECKPOINT_FIELDS = ("best_model_score", "best_model_path", "current_score", "best_k_models", "kth_best_model_path",
                     "kth_value", "last_model_path")


def checkpoint_callbacks(s: Student) -> list[ModelCheckpoint]:
    return [cb for cb in (s.best, s.last, s.periodic) if cb is not None]


def student_state(s: Student) -> dict[str, Any]:
    return {**{f: getattr(s, f) for f in STUDENT_FIELDS},
            "checkpoints": [{f: getattr(cb, f) for f in CHECKPOINT_FIELDS} for cb in checkpoint_callbacks(s)],
            "early_stopping": s.early_stopping.state_dict() if s.early_stopping is not None else None}


def restore_student(s: Student, state: dict[str, Any]) -> None:
    for f in STUDENT_FIELDS:
        setattr(s, f, state[f])
    for cb, fields in zip(checkpoint_callbacks(s), state["checkpoints"]):
        for f, value in fields.items():
            setattr(cb, f, value)
    if s.early_stopping is not None:
        s.early_stopping.load_state_dict(state["early_stopping"])


def set_best(s: Student, score: Tensor) -> None:
    """What the best-checkpoint callback (save_top_k=1) records when the score improves, before it saves."""
    path = str(Path(s.best.dirpath) / "best.ckpt")
    s.best.best_model_score, s.best.best_model_path, s.best.current_score = score, path, score
    s.best.best_k_models = {path: score}
    s.best.kth_best_model_path, s.best.kth_value = path, score


def frozen_students(active: list[bool], frozen: dict[str, Tensor],
                    device: torch.device) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
    """The active students as a mask, and the rows and kept weights of the others (None when all are active)."""
    rows = torch.tensor([i for i, a in enumerate(active) if not a], dtype=torch.long, device=device)
    kept = [(rows, w.index_select(0, rows)) for w in frozen.values()] if len(rows) else None
    return torch.tensor(active, device=device), kept


def stop(s: Student, params: dict[str, Tensor], frozen: dict[str, Tensor], i: int) -> None:
    s.active = False
    with torch.no_grad():
        for k, p in params.items():
            frozen[k][i] = p[i]


def fail(s: Student, terms: Tensor, epoch: int, params: dict[str, Tensor], frozen: dict[str, Tensor], i: int) -> None:
    """A non-finite loss: this student stops before the step, its checkpoints on disk stay the last good ones."""
    names = LOGGED_TERMS[s.job.cfg.distill.group]
    values = ", ".join(f"{name}={terms[k].item():.4g}" for k, name in enumerate(("loss", "hard_loss", "soft_loss"))
                       if name in names)
    s.error = (f"NonFiniteLossError: non-finite training loss at step {s.steps} (epoch {epoch}): {values}; "
               "the checkpoints saved so far are kept")
    stop(s, params, frozen, i)


def log_step_terms(s: Student, terms: Tensor, epoch: int) -> None:
    names = LOGGED_TERMS[s.job.cfg.distill.group]
    values = {f"train/{n}_step": float(terms[k]) for k, n in enumerate(("loss", "hard_loss", "soft_loss")) if n in names}
    for lg in s.logger:
        lg.log_metrics({**values, "epoch": epoch}, step=s.steps - 1)


@torch.no_grad()
def split_logits(net: torch.nn.Module, datamodule: Any, split: str, autocast: Any) -> Tensor:
    """`net`'s outputs on a whole split in dataset order, as a run computes them batch by batch (in its
    precision: the net's dtype, under the run's autocast)."""
    outputs = []
    for x, _, _ in datamodule.eval_loader(split):
        with autocast():
            outputs.append(net(x.to(next(net.parameters()).device, next(net.parameters()).dtype)))
    return torch.cat(outputs)


@torch.no_grad()
def evaluate(layers: list[tuple[Tensor, Tensor]], datamodule: Any, split: str, teacher_logits: Tensor, T: Tensor,
             dtype: torch.dtype, autocast: Any = contextlib.nullcontext,
             outputs: list[tuple[Tensor, Tensor]] | None = None) -> list[dict[str, float]]:
    """Every student's `<split>/` metrics, as DistillModule computes them: batch means weighted by batch size.
    `outputs` (when given) receives each batch's logits [students, batch, classes] and labels, on the CPU."""
    n_students = len(T)
    totals = torch.zeros(n_students, 5, dtype=torch.float64)
    n = 0
    for x, y, idx in datamodule.eval_loader(split):
        x, y = x.to(T.device, dtype).flatten(1), y.to(T.device)
        t_logits = teacher_logits[idx.to(T.device)]
        with autocast():
            logits = stacked_mlp(layers, x)  # [students, batch, classes]
            ce = stacked_cross_entropy(logits, y.expand(n_students, -1))
            soft = stacked_kd_term(logits, F.log_softmax(t_logits / T[:, None, None], dim=-1), T)
        if outputs is not None:
            outputs.append((logits.float().cpu(), y.cpu()))
        totals += torch.stack([t.double() for t in (
            ce * len(y), (logits.argmax(-1) == y).sum(1), soft * len(y),
            (logits.argmax(-1) == t_logits.argmax(-1)).sum(1), (t_logits.argmax(-1) == y).sum().expand(n_students),
        )], dim=1).cpu()
        n += len(y)
    # float32 as torchmetrics' states: the numbers a single run logs and its callbacks compare
    means = (totals / n).float()
    return [{f"{split}/loss": float(m[0]), f"{split}/acc": float(m[1]), f"{split}/soft_loss": float(m[2]),
             f"{split}/agreement": float(m[3]), f"{split}/teacher_acc": float(m[4])} for m in means]


def end_of_epoch(s: Student, epoch: int, state: dict[str, Tensor], net_config: Any, seconds: tuple[float, float],
                 optimizer_state: dict[str, Any], batches: tuple[int, int]) -> list[tuple[dict, Path]]:
    """Lightning's checkpoint callbacks in their order (best: strictly better val/loss; last: every epoch; periodic:
    every n epochs): each updates its state and then saves the trainer's checkpoint, which holds every callback's
    state at that moment. The checkpoints to write atomically, and where."""
    def save(path: Path) -> tuple[dict, Path]:
        return checkpoint([s.best, s.last, s.periodic, s.early_stopping], epoch, s.steps, state, net_config,
                          s.val_metrics, seconds, optimizer_state, batches), path

    dirpath = Path(s.best.dirpath)
    score = torch.tensor(s.val_metrics["val/loss"])
    writes = []
    if s.best.best_model_score is None or bool(score < s.best.best_model_score):
        set_best(s, score)
        s.best_state = state
        writes.append(save(dirpath / "best.ckpt"))
    s.last.best_model_path = str(dirpath / "last.ckpt")
    writes.append(save(dirpath / "last.ckpt"))
    if s.periodic is not None and (epoch + 1) % s.periodic._every_n_epochs == 0:
        path = Path(s.periodic.dirpath) / f"{s.periodic.filename.format(epoch=epoch)}.ckpt"
        s.periodic.best_model_path = str(path)
        writes.append(save(path))
    return writes


def finish(s: Student, datamodule: Any, logits: dict[str, Tensor], card_teacher_logits: Tensor,
           T: Tensor, dtype: torch.dtype, autocast: Any, teacher: torch.nn.Module, teacher_ckpt: Path,
           wall_seconds: float) -> dict[str, Any] | None:
    """Test the best checkpoint, write metrics.json's content (or failed.json) and the TensorBoard HParams."""
    job = s.job
    if s.error is not None or s.best_state is None:
        error = s.error or "no epoch finished"
        record_outcome(job.dir, job.dir / "failed.json", {"overrides": job.overrides, "config": job.settings(),
                                                          "error": error})
        log.error("Job %s failed (%s); the other jobs of its group go on", job.dir.name, error)
        for lg in s.logger:
            lg.finalize("failed")
        return None
    state = {k[len("net."):]: v.to(T.device).unsqueeze(0) for k, v in s.best_state.items()}
    figures = job.cfg.callbacks.get("tensorboard_figures")
    outputs: list[tuple[Tensor, Tensor]] | None = [] if figures is not None else None  # the figures' logits
    test = evaluate(mlp_layers(state), datamodule, "test", logits["test"], T, dtype, autocast, outputs)[0]
    for lg in s.logger:
        lg.log_metrics({**test, "epoch": s.epochs}, step=s.steps)
    if outputs is not None:  # what the TensorBoardFigures callback logs at the end of a single run's test
        student_logits, labels = torch.cat([o[0][0] for o in outputs]), torch.cat([o[1] for o in outputs])
        for lg in s.logger:
            if isinstance(lg, TensorBoardLogger):
                log_test_figures(lg.experiment, student_logits, labels, s.steps, teacher_logits=card_teacher_logits,
                                 T=float(T), run_dir=figures.get("run_dir"),
                                 n_examples=figures.get("n_examples", N_EXAMPLES))
    params = sum(v.numel() for v in state.values())
    result: dict[str, Any] = {
        **test, **fit_facts(s.best),
        **data_facts(datamodule), "params": params, "teacher_params": count_params(teacher),
        "best_ckpt": s.best.best_model_path, "teacher_ckpt": str(teacher_ckpt),
        "teacher_ckpts": [str(teacher_ckpt)], "teacher_ckpts_sha256": [file_sha256(teacher_ckpt)],
        **teacher_file_facts([Path(job.cfg.teacher.ckpt_path) if job.cfg.teacher.ckpt_path else Path(teacher_ckpt)]),
        "output_dir": str(job.dir),
        "wall_seconds": wall_seconds,
        "tags": list(job.cfg.get("tags") or []), **run_identity(job.cfg, job.dir),  # as train() records them
    }
    for lg in s.logger:
        lg.log_hyperparams(hparams_of(job.cfg, datamodule.source), hp_metrics_of(result))
    (job.dir / "failed.json").unlink(missing_ok=True)
    record_outcome(job.dir, job.dir / "metrics.json", {**run_record(result), "overrides": job.overrides, "config": job.settings()})
    # the cheap model card, as every distillation run writes (the student's test logits are its own: cheap)
    write_card(job.dir, job.cfg, datamodule=datamodule, teacher_logits=card_teacher_logits)
    finish_run(s.logger, job.dir)  # trackers (logger=mlflow, ...) get the job's files, then every logger is closed
    return result


def record_failure(job: Job, err: Exception) -> None:
    """failed.json of a job, as run_sweep_job writes it: a disk that refuses it costs the record, not the sweep."""
    error = disk_error_message(err) or f"{type(err).__name__}: {err}"
    log.error("Job %s failed (%s); the sweep goes on", job.dir.name, error)
    record_outcome(job.dir, job.dir / "failed.json", {"overrides": job.overrides, "config": job.settings(),
                                                      "error": error, "traceback": traceback.format_exc()})


def run_group(jobs: list[Job], state_key: str | None = None) -> list[dict[str, Any] | None]:
    """fit_group on the jobs whose config is valid; a failure (a bad value, bad data, no teacher) is recorded
    in failed.json of the jobs it concerns, as run_sweep_job records a job's failure."""
    valid = []
    for job in jobs:
        try:
            validate_config(job.cfg)
            valid.append(job)
        except Exception as err:  # noqa: BLE001 - a bad value fails its own job only
            record_failure(job, err)
    results: dict[int, dict[str, Any] | None] = {}
    if valid:
        try:
            results = {id(job): r for job, r in zip(valid, fit_group(valid, state_key))}
        except Exception as err:  # noqa: BLE001 - the group's data or teacher failed: every job of it
            for job in valid:
                record_failure(job, err)
    return [results.get(id(job)) for job in jobs]


def memory_per_student(cfg: DictConfig) -> int:
    """Bytes one stacked student needs, generously: weights, gradients, two Adam moments and the frozen copy,
    and activations of a training and an evaluation batch (each layer's output, kept for the backward)."""
    net = instantiate(cfg.model)
    n_params = sum(p.numel() for p in net.parameters())
    widths = sum(m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear))
    itemsize = torch.finfo(DTYPES[str(cfg.trainer.get("precision", "32-true"))]).bits // 8
    batch = int(cfg.data.batch_size) + int(cfg.data.get("eval_batch_size", cfg.data.batch_size))
    inputs = next(m.in_features for m in net.modules() if isinstance(m, torch.nn.Linear))
    return itemsize * (5 * n_params + 3 * batch * (inputs + widths))
