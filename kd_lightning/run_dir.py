"""Run dirs: every run gets its own, and `resume=<dir>` is checked before Hydra creates one.

`${kd_run_name:}` (conf/hydra/default.yaml) names a run or sweep dir `<start time>_<suffix>`, e.g.
`2026-11-30_17-20-00_3fa2-12345`: the time first, so dirs sort by start time, then what tells apart runs
started in the same second:
- ranks of one multi-process run started by the cluster (torchrun, SLURM's srun) share the launcher's id,
  `te-<TORCHELASTIC_RUN_ID>` or `slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>`, so they agree on one dir (srun ranks
  also share the job's start time, $SLURM_JOB_START_TIME); ranks that Lightning starts get the dir from it;
- any other run: a hash of the host name and the process id, unique among the processes running at one time
  on all hosts that share the filesystem.
The value is computed once per process (Hydra's `now` is cached the same way), so a config resolved twice,
or pickled to a SLURM job by submitit, names the same dir.
"""

import functools
import json
import logging
import os
import socket
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

# Imported by Hydra's run-dir resolver and callback in every process: torch, Lightning and the nets are imported
# inside the functions that need them.

log = logging.getLogger(__name__)

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"


def run_name(env: Mapping[str, str], pid: int, host: str, now: float) -> str:
    """The dir name of a run started at `now` by process `pid` on `host` with environment `env`."""
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun's default id is "none" (no rendezvous id)
        suffix = f"te-{env['TORCHELASTIC_RUN_ID'][:12]}"
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # ranks started by srun
        suffix = f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
        now = float(env.get("SLURM_JOB_START_TIME", now))
    else:
        suffix = f"{zlib.crc32(host.encode()) & 0xFFFF:04x}-{pid}"
    return f"{time.strftime(TIME_FORMAT, time.localtime(now))}_{suffix}"


@functools.cache
def this_run_name() -> str:
    return run_name(os.environ, os.getpid(), socket.gethostname(), time.time())


OmegaConf.register_new_resolver("kd_run_name", this_run_name, replace=True)


def resume_dir_error(resume: Any) -> str | None:
    """Why `resume=<dir>` is not a train.py run dir to continue, or None."""
    path = Path(str(resume))
    if (path / ".hydra" / "config.yaml").is_file():
        return None
    what = "does not exist" if not path.exists() else "has no .hydra/config.yaml"
    return f"resume={resume} is not accepted: it {what} (not a train.py run dir, e.g. logs/train/runs/<time>)"


class CheckResumeDir(Callback):
    """Hydra callback: refuse a `resume=<dir>` that is no run dir before Hydra creates the run dir there (a
    typo in the path must not leave a new empty dir behind)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        resume = config.get("resume")
        if resume and (error := resume_dir_error(resume)):
            log.error("%s", error)
            sys.exit(2)


# ---- what a run records about paths ---------------------------------------------------------------------------
def recorded_path(run_dir: str | Path, path: str | Path) -> str:
    """How a run records `path`: relative to its run dir when inside it (so a copied or moved run still names its
    own files), else absolute."""
    path, run_dir = Path(path).absolute(), Path(run_dir).absolute()
    return path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else str(path)


def resolve_recorded(run_dir: str | Path, value: str | Path, recorded_dir: str | None = None) -> Path:
    """A path a run recorded about itself (`recorded_path`), resolved against the dir the run is in now. An absolute
    path inside `recorded_dir` (the run's `output_dir` when it recorded it: records of older versions) is moved
    along: a copied run never reads the original's files."""
    path = Path(value)
    if not path.is_absolute():
        return Path(run_dir) / path
    if recorded_dir and path.is_relative_to(recorded_dir):
        return Path(run_dir) / path.relative_to(recorded_dir)
    return path


def checked_teacher(ckpt: str | Path, sha256: str | None, run_dir: str | Path) -> Path:
    """A teacher checkpoint recorded by the run `run_dir` (another run's file: an absolute path and its sha256),
    checked before use: one line if it is gone or its content changed since the run used it."""
    from kd_lightning.checkpoints import file_sha256
    from kd_lightning.errors import CheckpointError

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise CheckpointError(f"the teacher {ckpt} that {run_dir} was distilled from is gone: restore it, or "
                              f"retrain the run")
    if sha256 and (now := file_sha256(ckpt)) != sha256:
        raise CheckpointError(f"the teacher {ckpt} changed since {run_dir} was distilled from it (sha256 "
                              f"{now[:12]}..., recorded {sha256[:12]}...): not the teacher of this run")
    return ckpt


def teacher_ckpts_of(run_dir: str | Path, metrics: Mapping[str, Any]) -> list[Path]:
    """Every teacher checkpoint a finished run's metrics.json names (one, several for multi_teacher, or none),
    each checked against its recorded sha256."""
    paths = metrics.get("teacher_ckpts") or ([metrics["teacher_ckpt"]] if metrics.get("teacher_ckpt") else [])
    shas = metrics.get("teacher_ckpts_sha256") or [None] * len(paths)
    return [checked_teacher(p, sha, run_dir) for p, sha in zip(paths, shas)]


# ---- resume=: the overrides that cannot change what the finished epochs mean ----------------------------------
# Stopping criteria, where files are, how the console and the loaders work. Anything else (a temperature, a learning
# rate, a model, the data) would train the remaining epochs with other settings than the finished ones.
RESUME_KEYS = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "callbacks.early_stopping.patience",
    "paths.data_dir", "paths.log_dir", "paths.cache_dir", "paths.root_dir",
    "trainer.enable_progress_bar", "callbacks.progress_bar", "trainer.enable_model_summary",
    "data.num_workers", "data.persistent_workers", "data.pin_memory", "ckpt_path",
)
RESUME_CHANGES = "resume_changes.json"  # in the run dir: each setting changed by a resume, and from which epoch
_ABSENT = object()


def _allowed(key: str, keys: Any) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def _show(value: Any) -> str:
    return "null" if value is None else "(absent)" if value is _ABSENT else str(value)


def _saved_value(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if OmegaConf.is_config(node):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: as written
            return OmegaConf.to_container(node, resolve=False)
    return node


def resumed_epoch(checkpoint: Path | None) -> int:
    """The 0-based epoch in which a fit resumed from `checkpoint` goes on (0 without one)."""
    if checkpoint is None:
        return 0
    from kd_lightning.checkpoints import load_checkpoint

    state = load_checkpoint(checkpoint)
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(state.get("epoch", -1)) + 1


def recorded_resume_changes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The settings earlier resumes of `run_dir` changed, oldest first (`RESUME_CHANGES`)."""
    path = Path(run_dir) / RESUME_CHANGES
    return json.loads(path.read_text())["changes"] if path.is_file() else []


def apply_resume_changes(run_dir: str | Path, cfg: DictConfig, overrides: list[str], force: list[str],
                         checkpoint: Path | None) -> list[dict[str, Any]]:
    """Apply to the saved config `cfg` the changes of earlier resumes, then the resume command's `overrides`
    (Hydra's syntax) that change a setting. Each must be a key of `RESUME_KEYS`, or be listed in `force`
    (`resume_force=[key, ...]`); anything else, and any config group (model=, data=), is one line naming the key,
    its saved value and the new one. Return every change, with the epoch from which it holds (recorded in
    `RESUME_CHANGES` by the caller and in metrics.json)."""
    from kd_lightning.config import CONF_DIR
    from kd_lightning.errors import ConfigError

    earlier = recorded_resume_changes(run_dir)
    for change in earlier:
        _set(cfg, change["key"], change["to"])
    for key in force:
        if (CONF_DIR / key).is_dir():
            raise ConfigError(f"resume_force=[{key}] is not accepted: {key} is a config group, which a resumed run "
                              "cannot change (its checkpoints hold another net or data): start a new run")
    choices_file = Path(run_dir) / ".hydra" / "hydra.yaml"
    choices = OmegaConf.load(choices_file).hydra.runtime.choices if choices_file.is_file() else {}
    epoch = None
    changes = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if (CONF_DIR / key).is_dir():  # a config group: model=, data=, experiment=, module/optimizer=, ...
            new, saved = override.value(), choices.get(key, _ABSENT)
            if saved is not _ABSENT and str(new) == str(saved):
                continue  # the run's own choice, e.g. the original command pasted again
            was = f"the run was trained with {key}={saved}" if saved is not _ABSENT else \
                f"the run's saved config fixes its {key}"
            raise ConfigError(f"{override.input_line} is not accepted with resume=: {was}; a resumed run keeps its "
                              "config groups (its checkpoints hold that net and data): start a new run")
        saved = _saved_value(cfg, key)
        new = _ABSENT if override.is_delete() else override.value()
        if saved == new:
            continue
        if saved is _ABSENT and not override.is_add():
            raise ConfigError(f"{override.input_line} is not accepted with resume=: the run's saved config has no "
                              f"key {key}")
        forced = _allowed(key, force)
        if not (forced or _allowed(key, RESUME_KEYS)):
            epoch = resumed_epoch(checkpoint) if epoch is None else epoch
            raise ConfigError(
                f"{key}={_show(new)} is not accepted with resume=: the run was trained with {key}={_show(saved)}. "
                f"resume= changes only {', '.join(RESUME_KEYS)} (they cannot change what the finished epochs mean); "
                f"to change {key} anyway from epoch {epoch} on, add resume_force=[{key}] (recorded in metrics.json)")
        if key != "ckpt_path":  # which checkpoint to continue from is no setting of the run
            epoch = resumed_epoch(checkpoint) if epoch is None else epoch
            changes.append({"key": key, "from": None if saved is _ABSENT else saved, "to": None if new is _ABSENT
                            else new, "epoch": epoch, "forced": forced and not _allowed(key, RESUME_KEYS)})
        _set(cfg, key, new)
    return earlier + changes


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    with open_dict(cfg):
        if value is _ABSENT:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and leaf in node:
                del node[leaf]
        else:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def record_resume_changes(run_dir: str | Path, changes: list[dict[str, Any]]) -> None:
    from kd_lightning.checkpoints import atomic_write_text

    atomic_write_text(Path(run_dir) / RESUME_CHANGES, json.dumps({"changes": changes}, indent=2))


def run_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """What metrics.json records of a run's `result`: the paths to its own files relative to its dir (`best_ckpt`),
    without the dir it ran in (a copied or moved run is the same run)."""
    record = {k: v for k, v in result.items() if k != "output_dir"}
    if result.get("best_ckpt") and result.get("output_dir"):
        record["best_ckpt"] = recorded_path(result["output_dir"], result["best_ckpt"])
    return record
