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
resolved config under "config": the report labels each result with the settings that produced it. A record that
cannot be read back (a damaged `metrics.json`) is named in one line and the job counts as unfinished: the rerun
trains it again (the damaged file is kept beside it as `metrics.json.damaged`).

Job dirs are named by their settings, `${kd_job_dirname:}` (conf/hydra/default.yaml): the job number,
zero-padded so that dirs (and the TensorBoard runs in them) sort in job order, then the overrides that the sweep
varies, as Hydra's `hydra.job.override_dirname` writes them (sorted, without the keys of its `exclude_keys`),
with characters that need no quoting in a shell or a Hydra override: `003_distill.T:4+distill.alpha:0.9`.
Sweeps written before jobs were named so (dirs `0`, `1`, ...) are read, and continued, as they are.
"""

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd_lightning.checkpoints import atomic_write_text, intact_checkpoint
from kd_lightning.errors import Interrupted, disk_error_message
from kd_lightning.launch import is_first_rank
from kd_lightning.run_dir import run_record

log = logging.getLogger(__name__)

JOB_NUMBER_DIGITS = 3  # job dirs sort in job order up to job 999 (and stay unique beyond)
MAX_JOB_DIRNAME = 200  # characters; file systems allow 255 bytes per name
JOB_DIR = re.compile(r"(\d+)(?:_|$)")  # a job dir's name: its number, alone (older sweeps) or before its settings


def job_dirname_of(num: int, overrides: list[str], exclude_keys: Iterable[str] = (),
                   swept_keys: Iterable[str] | None = None, kv_sep: str = ":", item_sep: str = "+") -> str:
    """`<num, zero-padded>_<overrides>`: as Hydra's `override_dirname`, the job's overrides sorted, without
    `exclude_keys` and (when `swept_keys` is known) without the keys that are not swept (the same in every job),
    the `+`/`++` of appended keys dropped, quotes and brackets dropped, and any other character that a shell or
    Hydra's override parser would need quoted (`/`, `=`, `,`, space, non-ASCII, ...) written `_`; at most
    MAX_JOB_DIRNAME characters."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    excluded, swept = set(exclude_keys), None if swept_keys is None else set(swept_keys)
    lines = sorted(o.input_line.lstrip("+") for o in parsed
                   if o.key_or_group not in excluded and (swept is None or o.key_or_group in swept))
    name = re.sub(r"[\"'\[\](){}]", "", item_sep.join(line.replace("=", kv_sep, 1) for line in lines))
    name = re.sub(r"[^A-Za-z0-9_.:+@%-]", "_", name)
    number = f"{int(num):0{JOB_NUMBER_DIGITS}d}"
    return f"{number}_{name}"[:MAX_JOB_DIRNAME] if name else number


def swept_keys(sweep_dir: Path, sweeper_params: Any) -> set[str] | None:
    """The keys a sweep varies: those of the sweeper's `params` and those swept on its command line (its
    sweep.json, written by SweepGuard before the first job); None when the command line is not known."""
    try:
        record = read_record(sweep_dir / "sweep.json")
    except DamagedRecord:
        record = None
    if record is None or not isinstance(record.get("overrides"), list):
        return None
    parser = OverridesParser.create()
    keys = {o.key_or_group for o in parser.parse_overrides(record["overrides"]) if o.is_sweep_override()}
    return keys | {str(k) for k in (sweeper_params or {})}


def job_dirname(*, _root_: DictConfig) -> str:
    """`${kd_job_dirname:}`: the dir of the sweep job whose config this is (hydra.sweep.subdir). A job of a sweep
    started before jobs were named by their settings goes on in its dir `<num>`."""
    hydra_cfg = _root_.hydra
    sweep_dir, num = Path(str(hydra_cfg.sweep.dir)), int(hydra_cfg.job.num)
    if (sweep_dir / str(num)).is_dir():
        return str(num)
    naming = hydra_cfg.job.config.override_dirname
    return job_dirname_of(num, list(hydra_cfg.overrides.task), naming.exclude_keys,
                          swept_keys(sweep_dir, OmegaConf.select(_root_, "hydra.sweeper.params")),
                          kv_sep=naming.kv_sep, item_sep=naming.item_sep)


OmegaConf.register_new_resolver("kd_job_dirname", job_dirname, replace=True)


def job_number(job_dir: Path) -> int | None:
    """The job number of a sweep's job dir (`0`, `003_distill.T:4`, ...); None for any other dir."""
    match = JOB_DIR.match(job_dir.name)
    return int(match.group(1)) if match else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job dirs of a multirun, in job order: named `<num>_<settings>`, or `<num>` by older sweeps."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and job_number(p) is not None]
    return sorted(jobs, key=lambda p: (job_number(p), p.name))


class DamagedRecord(Exception):
    """A job record (metrics.json, failed.json, job.json) that is not a readable JSON object."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is damaged ({reason})")
        self.path = path


def read_record(path: Path) -> dict[str, Any] | None:
    """A job record as written by `write_json`; None when there is none; DamagedRecord when it cannot be read
    back (cut short by a crash or a full disk, overwritten, not JSON)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedRecord(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(record, dict):
        raise DamagedRecord(path, f"a JSON {type(record).__name__}, not an object")
    return record


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
    try:
        metrics = read_record(metrics_file)
    except DamagedRecord as err:
        log.warning("%s: job %s counts as unfinished and is trained again (the damaged file is kept as %s.damaged)",
                    err, job_dir.name, metrics_file.name)
        if is_first_rank():
            metrics_file.replace(metrics_file.with_name(f"{metrics_file.name}.damaged"))
        metrics = None
    if metrics is not None and metrics.get("overrides") == overrides:
        log.info("Job %s finished in an earlier run of this sweep: skipped", job_dir.name)
        return "finished", metrics.get(metric)
    try:
        started = read_record(record)
    except DamagedRecord:
        started = None  # written again below when the job starts
    if started is not None and (other := started.get("overrides")) != overrides:
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
    record_outcome(job_dir, metrics_file, {**run_record(result), "overrides": overrides, "config": settings})
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
    return [job / "failed.json" for job in job_dirs(sweep_dir) if (job / "failed.json").is_file()]


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
