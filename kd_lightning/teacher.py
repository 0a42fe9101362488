"""The teacher of a distillation run: a given checkpoint, or one trained once and cached by config hash; and
the cache of its logits over a dataset.

The cache lives in `paths.cache_dir/<key>/`: `teacher.ckpt` (written atomically: copied to a temporary file,
then renamed) and `run/`, the teacher's own run dir (`.hydra/config.yaml`, `metrics.json`, TensorBoard logs,
checkpoints every 2 epochs). `key`
hashes everything that determines the teacher's weights: model, data (and the data source actually found),
module (optimizer, scheduler), seed and training length. Runs that start together wait on a file lock, so
the teacher is trained by the first and reused by the others.

Teacher logits: when a split's inputs are a fixed function of the example (no random augmentation), the
teacher's logits for the whole split are computed once (eval mode, no grad, batched) and stored as one tensor
indexed by dataset index in `paths.cache_dir/logits/<teacher file hash>-<data hash>.pt`; it is rebuilt when
either the teacher checkpoint's content or the data identity changes.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.checkpoints import atomic_copy, atomic_torch_save, load_net
from kd_lightning.config import compose_train_config
from kd_lightning.launch import is_first_rank, train_in_one_process, wait_for_file
from kd_lightning.validation import check_num_classes

log = logging.getLogger(__name__)

# Data keys that change where or how fast data is read, never which examples a model sees.
DATA_KEYS_NOT_HASHED = {"data_dir", "download", "offline_fallback", "num_workers", "pin_memory", "persistent_workers"}
TRAINER_KEYS_HASHED = {"max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val"}


def compose_teacher_config(cfg: DictConfig) -> DictConfig:
    """The full training config of the teacher named by `cfg.teacher`, on the run's data and paths, with the
    run's trainer config (`trainer=gpu`: the teacher trains on the GPU in bf16 too)."""
    trainer_choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
    tcfg = compose_train_config([
        *([f"trainer={trainer_choice}"] if trainer_choice else []),
        f"experiment={cfg.teacher.experiment}",
        *cfg.teacher.overrides,
    ])
    tcfg.data = cfg.data
    tcfg.paths = cfg.paths
    if not trainer_choice:  # composed outside a Hydra app (tests, notebooks): at least the same device type
        tcfg.trainer.accelerator = cfg.trainer.accelerator
    return tcfg


def teacher_key(tcfg: DictConfig, data_source: str) -> str:
    """A short hash of what determines the teacher's weights."""
    container = OmegaConf.to_container(tcfg, resolve=True)
    identity: dict[str, Any] = {
        "model": container["model"],
        "module": container["module"],
        "data": {k: v for k, v in container["data"].items() if k not in DATA_KEYS_NOT_HASHED},
        "data_source": data_source,
        "seed": container["seed"],
        "trainer": {k: v for k, v in container["trainer"].items() if k in TRAINER_KEYS_HASHED},
        "early_stopping": (container.get("callbacks") or {}).get("early_stopping"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def provide_teacher(cfg: DictConfig, datamodule: Any) -> tuple[nn.Module, Path]:
    """The teacher net of this run and its checkpoint: `teacher.ckpt_path`, or the cached teacher, trained now
    if it is not cached. The checkpoint must fit the model of the teacher config."""
    tcfg = compose_teacher_config(cfg)
    train_in_one_process(tcfg.trainer)  # torchrun/srun ranks > 0 wait below: they cannot join a teacher's DDP fit
    check_num_classes(f"teacher model (experiment={cfg.teacher.experiment})", tcfg.model, datamodule)
    if cfg.teacher.ckpt_path:
        ckpt = Path(cfg.teacher.ckpt_path)
        return load_net(ckpt, tcfg.model), ckpt
    key = teacher_key(tcfg, datamodule.source)
    cache = Path(cfg.paths.cache_dir) / key
    ckpt = cache / "teacher.ckpt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not is_first_rank():  # rank 0 of this job trains or loads it; the file appears atomically
        return load_net(wait_for_file(ckpt, "the teacher"), tcfg.model), ckpt
    with FileLock(str(cache) + ".lock"):
        if ckpt.is_file():
            log.info("Using the cached teacher %s", ckpt)
        else:
            from kd_lightning.train import train  # the same recipe trains teachers and students

            run_dir = cache / "run"
            shutil.rmtree(run_dir, ignore_errors=True)  # a run that died before finishing
            (run_dir / ".hydra").mkdir(parents=True)
            tcfg.paths.output_dir = str(run_dir)
            log.info("Training the teacher (experiment=%s) into %s", cfg.teacher.experiment, run_dir)
            OmegaConf.save(tcfg, run_dir / ".hydra" / "config.yaml")  # the layout of a Hydra run dir
            result = train(tcfg)
            atomic_copy(result["best_ckpt"], ckpt)
    return load_net(ckpt, tcfg.model), ckpt


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def cached_teacher_logits(teacher_ckpt: Path, teacher: nn.Module, datamodule: Any, cache_dir: Path,
                          device: str = "cpu") -> dict[str, Tensor]:
    """Teacher logits per split with fixed inputs, from the cache or computed (and cached) now."""
    splits = ["val", "test"] if datamodule.random_augmentation else ["train", "val", "test"]
    if datamodule.random_augmentation:
        log.info("Training inputs are randomly augmented: the teacher runs online on training batches")
    data_key = hashlib.sha256(json.dumps(datamodule.cache_identity(), sort_keys=True).encode()).hexdigest()
    path = cache_dir / "logits" / f"{file_sha256(teacher_ckpt)[:16]}-{data_key[:16]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            cached: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
            if set(splits) <= set(cached):
                log.info("Using cached teacher logits %s", path)
                return {split: cached[split] for split in splits}
        log.info("Computing the teacher's logits for %s into %s", ", ".join(splits), path)
        cached = {split: compute_teacher_logits(teacher, datamodule.eval_loader(split), device) for split in splits}
        atomic_torch_save(cached, path)
    return cached
