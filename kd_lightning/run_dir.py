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
import logging
import os
import socket
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
