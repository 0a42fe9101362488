"""Two-process DDP on the CPU (gloo), end to end through train.py, inside a Hydra multirun."""

import json
from pathlib import Path

import pytest

from fake_data import write_mnist
from helpers import job_dir, run_script

pytestmark = pytest.mark.slow  # DDP, through train.py


def test_ddp_cpu_run_inside_a_multirun(tmp_path: Path, offline_overrides: list[str]) -> None:
    """On MNIST files whose splits do not divide over 2 ranks (train 801, val 200, test 333): evaluation
    shards differ by one example, and the gathered test metrics still count every example once."""
    sweep, probe_dir = tmp_path / "sweep", tmp_path / "probe"
    write_mnist(tmp_path / "data", n_train=1001, n_test=333)
    run_script("train.py", "-m", "experiment=soft", "trainer=ddp_cpu", "seed=1", "trainer.max_epochs=2",
               "+trainer.limit_train_batches=10",
               "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=10']",
               *offline_overrides, f"hydra.sweep.dir={sweep}",
               "+callbacks.probe._target_=probes.TeacherProbe", f"+callbacks.probe.out_dir={probe_dir}", timeout=900)
    run_dir = job_dir(sweep, 0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["data_source"] == "mnist"
    # Both ranks trained against the same frozen teacher, never in train mode.
    reports = [(probe_dir / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert reports[0] == reports[1] and reports[0][1] == "False"
    # One set of checkpoints, written once, in the job's dir: the ranks shared it (no per-rank Hydra dirs).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "epoch001.ckpt", "last.ckpt"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [run_dir.name]
    assert not (tmp_path / "logs" / "train").exists()
    # Test metrics gathered over both ranks' shards equal a one-process evaluation of the same checkpoint.
    run_script("eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", *offline_overrides[:3],
               "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}")
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(metrics["test/acc"] - single["test/acc"]) < 1e-6
    assert abs(metrics["test/loss"] - single["test/loss"]) < 1e-5
