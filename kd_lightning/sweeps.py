"""One job of a Hydra multirun (`python train.py -m ...`): resumable, and a failure does not stop the sweep.

Running the same sweep command again into the same sweep dir (`hydra.sweep.dir=<dir>`) skips the jobs that
finished (their `metrics.json` records the same overrides), continues unfinished ones from their newest intact
checkpoint, and retries failed ones. A sweep command with other parameters is refused in a dir that holds a sweep
(`sweep.json` records its overrides; Hydra would otherwise rewrite the jobs' `.hydra/config.yaml` under the
earlier results). A job that fails (a bad setting, a NaN loss, out of memory) writes `failed.json` with its
error and returns None, so the other jobs and an Optuna study go on (Optuna marks a trial whose value is not a
number as failed; NaN would crash its Hydra plugin); when the sweep and its report are done, the command exits
with 1 and names the failed jobs. Ctrl-C still stops the whole sweep, after saving the running job's checkpoint.

Every record of a job (`job.json` at its start, `metrics.json` or `failed.json` at its end) holds the job's
resolved config under "config": the report labels each result with the settings that produced it.
"""

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd_lightning.checkpoints import atomic_write_text, intact_checkpoint
from kd_lightning.errors import Interrupted, disk_error_message
from kd_lightning.launch import is_first_rank

log = logging.getLogger(__name__)


def limit_threads_for_parallel_jobs() -> None:
    """Jobs run side by side by the joblib launcher share the CPU: give each its share of threads."""
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return
    cpus = len(os.sched_getaffinity(0))
    n_jobs = launcher.n_jobs if launcher.n_jobs > 0 else max(1, cpus + 1 + launcher.n_jobs)  # joblib's -1 = all
    torch.set_num_threads(max(1, cpus // n_jobs))
    log.info("%d jobs at once on %d cores: %d torch threads for this one", n_jobs, cpus, torch.get_num_threads())


def write_json(path: Path, record: dict[str, Any]) -> None:
    """The job's records are written by one process: rank 0 when torchrun/srun started several (one per GPU)."""
    if is_first_rank():
        atomic_write_text(path, json.dumps(record, indent=2))


def earlier_outcome(job_dir: Path, overrides: list[str], settings: dict[str, Any],
                    metric: str) -> tuple[str, float | None] | None:
    """What an earlier run of this sweep left in `job_dir`: ("finished", its metric) when the same job finished;
    ("refused", None) when the dir holds another job (recorded in failed.json); None when the job is to run."""
    metrics_file, record = job_dir / "metrics.json", job_dir / "job.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("overrides") == overrides:
            log.info("Job %s finished in an earlier run of this sweep: skipped", job_dir.name)
            return "finished", metrics.get(metric)
    if record.is_file() and (other := json.loads(record.read_text())["overrides"]) != overrides:
        message = f"{job_dir} holds another job ({other}): use a new sweep dir"
        write_json(job_dir / "failed.json", {"overrides": overrides, "config": settings, "error": message})
        log.error(message)
        return "refused", None
    return None


def run_sweep_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> float | None:
    job_dir = Path(cfg.paths.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    settings = OmegaConf.to_container(cfg, resolve=True)  # what produced this job's results
    metrics_file, record, failure = job_dir / "metrics.json", job_dir / "job.json", job_dir / "failed.json"

    if outcome := earlier_outcome(job_dir, overrides, settings, cfg.optimized_metric):
        return outcome[1]
    if checkpoint := intact_checkpoint(job_dir / "checkpoints"):
        log.info("Job %s resumes from its last checkpoint (%s)", job_dir.name, checkpoint.name)
        cfg.ckpt_path = str(checkpoint)
    try:
        write_json(record, {"overrides": overrides, "config": settings})
        limit_threads_for_parallel_jobs()
        result = train(cfg)
    except Interrupted:
        raise  # Ctrl-C / SIGTERM stop the sweep; the next run of the command resumes this job
    except Exception as err:  # noqa: BLE001 - any failure of one job is recorded and the sweep goes on
        error = disk_error_message(err) or f"{type(err).__name__}: {err}"
        log.error("Job %s failed (%s); the sweep goes on", job_dir.name, error)
        record_outcome(job_dir, failure, {"overrides": overrides, "config": settings, "error": error,
                                          "traceback": traceback.format_exc()})
        return None
    if is_first_rank():
        failure.unlink(missing_ok=True)
    record_outcome(job_dir, metrics_file, {**result, "overrides": overrides, "config": settings})
    return result.get(cfg.optimized_metric)


# Jobs of this process's sweep whose metrics.json or failed.json could not be written (a full or read-only disk):
# the sweep goes on, writes its report from what was recorded, and exits 1 naming them.
UNRECORDED: list[str] = []


def record_outcome(job_dir: Path, path: Path, record: dict[str, Any]) -> None:
    """Write a job's metrics.json or failed.json; a disk that refuses it costs this job's record, not the sweep."""
    try:
        write_json(path, record)
    except OSError as err:
        log.error("Job %s: %s could not be written, so the job counts as unfinished (%s)", job_dir.name,
                  path.name, disk_error_message(err) or f"{type(err).__name__}: {err}")
        UNRECORDED.append(str(job_dir))


def failed_jobs(sweep_dir: Path) -> list[Path]:
    """The failed.json of each job of the sweep whose last attempt failed, in job order."""
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [job / "failed.json" for job in jobs if (job / "failed.json").is_file()]


class SweepGuard(Callback):
    """Hydra callback: one sweep per sweep dir, and a sweep with failed jobs exits non-zero after its report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        UNRECORDED.clear()
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = sorted(config.hydra.overrides.task)
        record = sweep_dir / "sweep.json"
        if record.is_file():
            earlier = json.loads(record.read_text())["overrides"]
            if earlier != overrides:
                log.error("%s holds the sweep %s; this command sweeps %s: use a new hydra.sweep.dir (the same "
                          "command again continues that sweep)", sweep_dir, " ".join(earlier), " ".join(overrides))
                sys.exit(2)
        else:
            write_json(record, {"overrides": overrides})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir) if sweep_dir.is_dir() else []
        if failed:
            log.error("%d job(s) of the sweep failed; their errors: %s", len(failed), " ".join(map(str, failed)))
        if UNRECORDED:
            log.error("%d job(s) of the sweep have no record (the disk refused it): %s", len(UNRECORDED),
                      " ".join(UNRECORDED))
        if failed or UNRECORDED:
            sys.exit(1)
