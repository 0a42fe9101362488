import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # fake_data.py, probes.py


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


@pytest.fixture
def offline_overrides(tmp_path: Path) -> list[str]:
    """Keep a run's data, logs and teacher cache inside tmp_path, offline, with a quiet console."""
    return [
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.download=false",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
    ]
