"""The teacher of a distillation run: a given checkpoint, or one trained once and cached by config hash.

The cache lives in `paths.cache_dir/<key>/`: `teacher.ckpt` (written atomically: copied to a temporary file,
then renamed) and `run/`, the teacher's own run dir (`.hydra/config.yaml`, `metrics.json`, TensorBoard logs,
checkpoints every 2 epochs). `key`
hashes everything that determines the teacher's weights: model, data (and the data source actually found),
module (optimizer, scheduler), seed and training length. Runs that start together wait on a file lock, so
the teacher is trained by the first and reused by the others.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kd_lightning.checkpoints import atomic_copy
from kd_lightning.config import compose_train_config

log = logging.getLogger(__name__)

# Data keys that change where or how fast data is read, never which examples a model sees.
DATA_KEYS_NOT_HASHED = {"data_dir", "download", "offline_fallback", "num_workers", "pin_memory", "persistent_workers"}
TRAINER_KEYS_HASHED = {"max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val"}


def compose_teacher_config(cfg: DictConfig) -> DictConfig:
    """The full training config of the teacher named by `cfg.teacher`, on the run's data and paths."""
    tcfg = compose_train_config([f"experiment={cfg.teacher.experiment}", *cfg.teacher.overrides])
    tcfg.data = cfg.data
    tcfg.paths = cfg.paths
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


def provide_teacher(cfg: DictConfig, data_source: str) -> Path:
    """Path of the teacher checkpoint for this run, training the teacher first if it is not cached."""
    if cfg.teacher.ckpt_path:
        return Path(cfg.teacher.ckpt_path)
    tcfg = compose_teacher_config(cfg)
    key = teacher_key(tcfg, data_source)
    cache = Path(cfg.paths.cache_dir) / key
    ckpt = cache / "teacher.ckpt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if ckpt.is_file():
            log.info("Using the cached teacher %s", ckpt)
            return ckpt
        from kd_lightning.train import train  # the same recipe trains teachers and students

        run_dir = cache / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that died before finishing
        (run_dir / ".hydra").mkdir(parents=True)
        tcfg.paths.output_dir = str(run_dir)
        log.info("Training the teacher (experiment=%s) into %s", cfg.teacher.experiment, run_dir)
        OmegaConf.save(tcfg, run_dir / ".hydra" / "config.yaml")  # the layout of a Hydra run dir
        result = train(tcfg)
        atomic_copy(result["best_ckpt"], ckpt)
    return ckpt
