"""One job of a Hydra multirun (`python train.py -m ...`): resumable, and a failure does not stop the sweep.

Running the same sweep command again into the same sweep dir (`hydra.sweep.dir=<dir>`) skips the jobs that
finished (their `metrics.json` records the same overrides), continues unfinished ones from their last or
interrupted checkpoint, and retries failed ones. A job that fails (a bad setting, a NaN loss, out of memory)
writes `failed.json` with its error and returns None, so the other jobs and an Optuna study go on (Optuna marks
a trial whose value is not a number as failed; NaN would crash its Hydra plugin). Ctrl-C still stops the whole
sweep, after saving the running job's checkpoint.
"""

import json
import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The fit was stopped by Ctrl-C or SIGTERM after saving checkpoints/interrupted.ckpt."""

    def __init__(self, output_dir: Path, sigterm: bool) -> None:
        super().__init__(f"interrupted by {'SIGTERM' if sigterm else 'Ctrl-C'}; resume with: "
                         f"python train.py resume={output_dir}")
        self.exit_code = 143 if sigterm else 130  # the shell's codes for death by SIGTERM / SIGINT


def limit_threads_for_parallel_jobs() -> None:
    """Jobs run side by side by the joblib launcher share the CPU: give each its share of threads."""
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return
    cpus = len(os.sched_getaffinity(0))
    n_jobs = launcher.n_jobs if launcher.n_jobs > 0 else max(1, cpus + 1 + launcher.n_jobs)  # joblib's -1 = all
    torch.set_num_threads(max(1, cpus // n_jobs))
    log.info("%d jobs at once on %d cores: %d torch threads for this one", n_jobs, cpus, torch.get_num_threads())


def run_sweep_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> float | None:
    job_dir = Path(cfg.paths.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    metrics_file, record, failure = job_dir / "metrics.json", job_dir / "job.json", job_dir / "failed.json"

    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("overrides") == overrides:
            log.info("Job %s finished in an earlier run of this sweep: skipped", job_dir.name)
            return metrics.get(cfg.optimized_metric)
    if record.is_file() and json.loads(record.read_text())["overrides"] != overrides:
        message = f"{job_dir} holds another job ({json.loads(record.read_text())['overrides']}): use a new sweep dir"
        failure.write_text(json.dumps({"overrides": overrides, "error": message}, indent=2))
        log.error(message)
        return None
    checkpoints = job_dir / "checkpoints"
    if any((checkpoints / name).is_file() for name in ("last.ckpt", "interrupted.ckpt")):
        log.info("Job %s resumes from its last checkpoint", job_dir.name)
        cfg.ckpt_path = "last"
    job_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"overrides": overrides}, indent=2))
    limit_threads_for_parallel_jobs()

    try:
        result = train(cfg)
    except Interrupted:
        raise  # Ctrl-C / SIGTERM stop the sweep; the next run of the command resumes this job
    except Exception as err:  # noqa: BLE001 - any failure of one job is recorded and the sweep goes on
        failure.write_text(json.dumps({
            "overrides": overrides, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
        }, indent=2))
        log.error("Job %s failed (%s: %s); the sweep goes on", job_dir.name, type(err).__name__, err)
        return None
    failure.unlink(missing_ok=True)
    metrics_file.write_text(json.dumps({**result, "overrides": overrides}, indent=2))
    return result.get(cfg.optimized_metric)
