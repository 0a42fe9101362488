"""The teacher of a distillation run: its config, its identity (the cache key), the cache of trained teachers
with its lock and checks, and the cache of its logits over a dataset. Training a teacher is not done here:
kd_lightning/train.py runs the same recipe on the config composed here (docs/pipeline.md).

Teacher config: `teacher.experiment` plus `teacher.overrides`, composed with the run's trainer choice
(`trainer_choice`, e.g. gpu: the teacher trains on the GPU in bf16 too) and the run's paths; from the run's
data only the dataset's identity (`DATA_IDENTITY_KEYS`): its batch size and other loader settings are the
teacher recipe's.

Cache of trained teachers, `paths.cache_dir/<key>/`:
- `teacher.ckpt`: the teacher's best-by-validation checkpoint (written atomically);
- `teacher.json`: the key, the identity that was hashed into it, and the sha256 of `teacher.ckpt`; written last,
  so an entry without it is unfinished. Every reuse compares the stored identity with the run's and the
  checkpoint's sha256 with the file: a mismatch is never used, the entry is rebuilt (with one log line);
- `run/`: the teacher's own run dir (`.hydra/config.yaml`, `metrics.json`, TensorBoard logs, checkpoints).
  An interrupted teacher run of the same identity is continued from its last checkpoint.
`key` hashes the whole resolved teacher config and the data source actually found, except `NOT_IN_KEY`: keys
that cannot change the teacher's weights. Runs that start together wait on a file lock (and say so), so the
teacher is trained by the first and reused by the others.

Teacher logits: when a split's inputs are a fixed function of the example (no random augmentation), the
teacher's logits for the whole split are computed once (eval mode, no grad, batched) and stored as one tensor
indexed by dataset index in `paths.cache_dir/logits/<teacher file hash>-<data hash>.pt`, with what identifies
and checks them (teacher checkpoint sha256, data identity with the content fingerprint of the data's files,
shape, dtype, sha256 of the values). A load checks all of these and that the teacher reproduces the first batch
of every cached split; any mismatch or damage is logged in one line and the cache rebuilt.
The trained teacher's key holds the same content fingerprint: other files of the same count and shape train
another teacher, whose checkpoint (another sha256) keys other logits.
"""

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.checkpoints import (
    atomic_copy,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    file_sha256,
    read_checkpoint_file,
    remove_dead_temporaries,
)
from kd_lightning.config import compose_teacher_recipe, is_distillation
from kd_lightning.launch import train_in_one_process

log = logging.getLogger(__name__)

# What the teacher shares with the run it teaches: which examples, split how, read from where.
DATA_IDENTITY_KEYS = ("_target_", "data_dir", "num_classes", "train_val_split", "split_seed", "download",
                      "offline_fallback",
                      # data=image_folder: the folder, and how its images become inputs (the teacher sees the
                      # student's eval views through the logit cache, so it is trained on the same ones)
                      "_recursive_", "root", "channels", "image_size", "train_transforms", "eval_transforms",
                      "normalization", "stats_sample", "require_test", "hash_content", "cache_dir")

# Keys of the resolved teacher config left out of its cache key, because they cannot change its weights.
NOT_IN_KEY = (
    "paths",                                       # where data, logs and caches live
    "task_name", "optimized_metric", "ckpt_path", "resume", "tags", "extras",
    "trainer_choice",                              # the trainer config it selected is in the key
    "data.data_dir", "data.download", "data.offline_fallback",  # where data is read from: the source found is in the key
    "data.num_workers", "data.pin_memory", "data.persistent_workers",  # how fast it is read
    # image_folder: its content is in the key through the source (image_folder:<fingerprint>), not its path
    "data.root", "data.verify_images", "data.cache_decoded", "data.cache_dir", "data.hash_content",
    "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.progress_bar", "callbacks.lr_monitor", "callbacks.timer",  # what is shown or logged
    "callbacks.last_checkpoint", "callbacks.periodic_checkpoint", "callbacks.interrupt_checkpoint",  # extra files
    "callbacks.model_checkpoint.dirpath",
    "logger",
)
# Besides: `distill` and `teacher` when the teacher itself is no distillation run (it reads neither).
DATA_KEYS_NOT_HASHED = {k.split(".", 1)[1] for k in NOT_IN_KEY if k.startswith("data.")}


# ---- the teacher's config and identity ----------------------------------------------------------------------
def compose_teacher_config(cfg: DictConfig) -> DictConfig:
    """The full training config of the teacher named by `cfg.teacher`: its recipe with the run's trainer choice,
    on the run's dataset and paths. The same inside and outside a Hydra app: everything comes from `cfg`."""
    tcfg = compose_teacher_recipe(cfg)
    recipe_data = OmegaConf.to_container(tcfg.data, resolve=False)
    loader_settings = {k: v for k, v in recipe_data.items() if k not in DATA_IDENTITY_KEYS and k in cfg.data}
    tcfg.data = OmegaConf.merge(cfg.data, loader_settings)  # `${seed}` and the like resolve in the teacher's config
    tcfg.paths = cfg.paths
    train_in_one_process(tcfg.trainer)  # torchrun/srun ranks > 0 cannot join a teacher's DDP fit: they wait for it
    return tcfg


def dataset_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved `DATA_IDENTITY_KEYS` of a config's data: equal for a student and the teacher it was given."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: data[k] for k in DATA_IDENTITY_KEYS if k in data and k not in DATA_KEYS_NOT_HASHED}


def teacher_identity(tcfg: DictConfig, data_source: str | None, data_content: str | None = None) -> dict[str, Any]:
    """The resolved teacher config without `NOT_IN_KEY`, plus the data source actually found and the fingerprint
    of its files' content (`KDDataModule.content_fingerprint()`: other images of the same count and shape are
    another teacher)."""
    probe = tcfg.copy()
    probe.paths.output_dir = ""  # a run dir is chosen after the key; excluded anyway
    identity = OmegaConf.to_container(probe, resolve=True)
    for dotted in NOT_IN_KEY:
        *parents, leaf = dotted.split(".")
        node = identity
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if not is_distillation(identity):  # a plain classifier teacher reads neither
        identity.pop("distill", None)
        identity.pop("teacher", None)
    identity["data_source"] = data_source
    identity["data_content"] = data_content
    return identity


def teacher_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def first_difference(stored: Any, current: Any, prefix: str = "") -> str:
    """The first dotted key at which two identities differ, for a one-line message."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for k in sorted(set(stored) | set(current), key=str):
            if stored.get(k, "<missing>") != current.get(k, "<missing>"):
                return first_difference(stored.get(k, "<missing>"), current.get(k, "<missing>"), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: stored {stored!r}, now {current!r}"


# ---- the cache of trained teachers --------------------------------------------------------------------------
class TeacherCache:
    """One entry of the teacher cache, `cache_dir/<key>/`, for the teacher config `tcfg` on `data_source` whose
    files have the content fingerprint `data_content`."""

    def __init__(self, cache_dir: str | Path, tcfg: DictConfig, data_source: str | None,
                 data_content: str | None = None) -> None:
        self.identity = teacher_identity(tcfg, data_source, data_content)
        self.key = teacher_key(self.identity)
        self.dir = Path(cache_dir) / self.key
        self.ckpt, self.record, self.run_dir = self.dir / "teacher.ckpt", self.dir / "teacher.json", self.dir / "run"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while the entry is checked, trained or read; says what it waits for when another run holds it."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Waiting for another run to finish the teacher %s (lock %s.lock held)", self.dir, self.dir)
            lock.acquire()
        try:
            remove_dead_temporaries(self.dir)  # of a teacher.ckpt/teacher.json write killed mid-way
            yield
        finally:
            lock.release()

    def verified(self) -> bool:
        """True when the entry is complete and is this teacher: stored identity and checkpoint checksum match.
        Anything else is logged in one line and the entry's files are removed, to be rebuilt."""
        if not self.ckpt.exists() and not self.record.exists():
            return False
        problem = self._problem()
        if problem is None:
            return True
        log.warning("Cached teacher %s %s: training it again", self.dir, problem)
        self.record.unlink(missing_ok=True)
        self.ckpt.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return False

    def _problem(self) -> str | None:
        if not self.record.is_file():
            return "is unfinished (no teacher.json)"
        try:
            stored = json.loads(self.record.read_text())
            stored_identity, stored_sha = stored["identity"], stored["teacher_ckpt_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"has an unreadable teacher.json ({type(err).__name__})"
        if stored_identity != self.identity:
            return f"was trained with another config ({first_difference(stored_identity, self.identity)})"
        if not self.ckpt.is_file():
            return "has no teacher.ckpt"
        if file_sha256(self.ckpt) != stored_sha:
            return "has a damaged teacher.ckpt (its sha256 differs from teacher.json)"
        return None

    def continues_a_run(self) -> bool:
        """Whether `run/` holds an interrupted run of this same teacher, to continue from its last checkpoint."""
        saved = self.run_dir / ".hydra" / "config.yaml"
        checkpoints = self.run_dir / "checkpoints"
        if not saved.is_file() or not any((checkpoints / n).is_file() for n in ("last.ckpt", "interrupted.ckpt")):
            return False
        try:
            saved_identity = teacher_identity(OmegaConf.load(saved), self.identity["data_source"],
                                              self.identity["data_content"])
            return saved_identity == self.identity
        except Exception:  # noqa: BLE001 - an unreadable record is no run to continue
            return False

    def prepare_run(self, tcfg: DictConfig) -> DictConfig:
        """The config that trains (or continues training) this teacher in `run/`."""
        tcfg = tcfg.copy()
        tcfg.paths.output_dir = str(self.run_dir)
        if self.continues_a_run():
            log.info("Continuing the interrupted teacher run %s from its last checkpoint", self.run_dir)
            tcfg.ckpt_path = "last"
            return tcfg
        shutil.rmtree(self.run_dir, ignore_errors=True)  # a run that died before finishing, or of another config
        (self.run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(tcfg, self.run_dir / ".hydra" / "config.yaml")  # the layout of a Hydra run dir
        return tcfg

    def discard(self) -> None:
        """Remove the entry (its run dir and any partial files): the teacher's training failed."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def store(self, best_ckpt: str | Path) -> None:
        """Copy the trained teacher in, then write teacher.json: the entry is complete once that exists."""
        atomic_copy(best_ckpt, self.ckpt)
        record = {"key": self.key, "teacher_ckpt_sha256": file_sha256(self.ckpt), "identity": self.identity}
        atomic_write(self.record, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True)))


def is_plain_weights_file(path: str | Path) -> bool:
    """Whether `path` is a plain state_dict (a `.safetensors` file, or a torch file holding only tensors): a
    teacher trained elsewhere, given as `teacher.ckpt_path`."""
    if Path(path).suffix == ".safetensors":
        return True
    content = read_checkpoint_file(path)
    return isinstance(content, dict) and bool(content) and all(isinstance(v, Tensor) for v in content.values())


def weights_as_checkpoint(path: str | Path, model_cfg: Any, cache_dir: str | Path, sha256: str) -> Path:
    """A kd-lightning teacher checkpoint of the plain weights file `path` (sha256 `sha256`) as the net `model_cfg`,
    every key strict (the head must be for the data's classes): made once in
    `<cache_dir>/weights/<sha256[:16]>-<net name>/teacher.ckpt`, as released teachers are
    (kd_lightning/models/cifar100/released.py), so every tool reads it as a trained teacher."""
    from kd_lightning.models.library import initial_weights_off, load_weights

    net_config = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else model_cfg
    name = str(net_config.get("name") or str(net_config.get("_target_", "net")).rsplit(".", 1)[-1])
    entry = Path(cache_dir) / "weights" / f"{sha256[:16]}-{name}"
    ckpt, record = entry / "teacher.ckpt", entry / "source.json"
    source = {"source": str(Path(path).resolve()), "source_sha256": sha256, "net_config": net_config}
    if ckpt.is_file() and record.is_file() and json.loads(record.read_text()) == source:
        return ckpt
    net = instantiate(net_config, **initial_weights_off(net_config))
    load_weights(net, path, in_chans_adapt=False)
    atomic_torch_save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_config": net_config,
                       "weights_source": source}, ckpt)
    atomic_write_text(record, json.dumps(source, indent=2))
    return ckpt


def given_teacher(path: Path, model_cfg: DictConfig, cache_dir: str | Path) -> Path:
    """The checkpoint of `teacher.ckpt_path=<path>`: a Lightning checkpoint as it is; a released teacher file
    (`ckpt_epoch_240.pth`: a dict with `model` or `net`) or a plain state_dict (`.pth`, `.safetensors`) loaded
    strictly into `model_cfg`'s net and converted once into the cache (kd_lightning/models/cifar100/released.py,
    kd_lightning/models/library.py)."""
    from kd_lightning.models.cifar100.released import read_released, released_as_checkpoint

    if is_plain_weights_file(path):  # a plain state_dict (.pth, .safetensors) of a teacher trained elsewhere
        return weights_as_checkpoint(path, model_cfg, cache_dir, file_sha256(path))
    if read_released(path) is None:
        return path
    return released_as_checkpoint(path, model_cfg, cache_dir, file_sha256(path))


# ---- the cache of teacher logits ----------------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: DDP broadcasts the cached logits (module buffers), which inference tensors refuse
def compute_teacher_logits(teacher: nn.Module, loader: Any, device: str = "cpu") -> Tensor:
    """Logits for every example of `loader`, row i for dataset index i (whatever order the loader uses)."""
    was_training = teacher.training
    teacher.eval().to(device)
    indices, outputs = [], []
    for x, _, idx in loader:
        indices.append(idx.cpu())
        outputs.append(teacher(x.to(device)).float().cpu())
    teacher.train(was_training).cpu()
    logits = torch.empty(sum(len(i) for i in indices), outputs[0].shape[1])
    logits[torch.cat(indices)] = torch.cat(outputs)
    return logits


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _logit_cache_problem(cached: Any, teacher_sha: str, data_identity: dict, splits: list[str],
                         teacher: nn.Module, datamodule: Any, device: str) -> str | None:
    """Why a loaded logit cache cannot be used for this teacher and data, or None."""
    if not isinstance(cached, dict) or not {"teacher_sha256", "data_identity", "checks", "logits"} <= set(cached):
        return "is not a logit cache of this version"
    if cached["teacher_sha256"] != teacher_sha:
        return "was computed by another teacher checkpoint"
    if cached["data_identity"] != data_identity:
        return "was computed on other data"
    sizes = data_identity.get("sizes", {})
    for split in splits:
        logits, check = cached["logits"].get(split), cached["checks"].get(split)
        if not isinstance(logits, Tensor) or not isinstance(check, dict):
            return f"has no {split} split"
        if split in sizes and logits.shape[0] != sizes[split] or list(logits.shape) != check.get("shape"):
            return f"has {split} logits of shape {list(logits.shape)}, expected {sizes.get(split)} rows"
        if str(logits.dtype) != check.get("dtype") or logits.dtype != torch.float32:
            return f"has {split} logits of dtype {logits.dtype}"
        if tensor_sha256(logits) != check.get("sha256"):
            return f"has damaged {split} logits (checksum mismatch)"
    # The data's content is in `data_identity` (its files' fingerprint). What remains to check is that the values
    # are this teacher's outputs on these inputs: it reproduces the first batch of every split.
    was_training = teacher.training
    teacher.eval().to(device)
    try:
        for split in splits:
            x, _, idx = next(iter(datamodule.eval_loader(split)))
            with torch.inference_mode():
                expected = teacher(x.to(device)).float().cpu()
            if not torch.allclose(cached["logits"][split][idx], expected, rtol=1e-3, atol=1e-4):
                return f"does not match the teacher's logits on the first {split} batch"
    finally:
        teacher.train(was_training).cpu()
    return None


def cached_teacher_logits(teacher_ckpt: Path, teacher: nn.Module, datamodule: Any, cache_dir: Path,
                          device: str = "cpu") -> dict[str, Tensor]:
    """Teacher logits per split with fixed inputs, from the verified cache or computed (and cached) now."""
    splits = ["val", "test"] if datamodule.random_augmentation else ["train", "val", "test"]
    if datamodule.random_augmentation:
        log.info("Training inputs are randomly augmented: the teacher runs online on training batches")
    data_identity = json.loads(json.dumps(datamodule.cache_identity()))  # as stored: lists, not tuples
    data_key = hashlib.sha256(json.dumps(data_identity, sort_keys=True).encode()).hexdigest()
    teacher_sha = file_sha256(teacher_ckpt)
    path = cache_dir / "logits" / f"{teacher_sha[:16]}-{data_key[:16]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        remove_dead_temporaries(path.parent)  # of a logit cache write killed mid-way (kill -9)
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                problem = _logit_cache_problem(cached, teacher_sha, data_identity, splits, teacher, datamodule, device)
            except Exception as err:  # noqa: BLE001 - truncated or not a torch file: rebuilt below
                problem = f"is unreadable ({type(err).__name__})"
            if problem is None:
                log.info("Using cached teacher logits %s", path)
                return {split: cached["logits"][split] for split in splits}
            log.warning("Teacher-logit cache %s %s: computing it again", path, problem)
        log.info("Computing the teacher's logits for %s into %s", ", ".join(splits), path)
        logits = {split: compute_teacher_logits(teacher, datamodule.eval_loader(split), device) for split in splits}
        atomic_torch_save({
            "teacher_sha256": teacher_sha,
            "data_identity": data_identity,
            "checks": {s: {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": tensor_sha256(t)}
                       for s, t in logits.items()},
            "logits": logits,
        }, path)
    return logits
