"""End to end through the real entry points: `python train.py experiment=soft`, then eval.py on its checkpoint."""

import json
from pathlib import Path

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow  # train.py and eval.py as subprocesses


def test_soft_experiment_trains_teacher_once_then_reuses_it(tmp_path: Path, offline_overrides: list[str]) -> None:
    overrides = [
        "experiment=soft",
        *offline_overrides,
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=20",
        "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=20']",
    ]
    first = run_script("train.py", *overrides, f"hydra.run.dir={tmp_path / 'run1'}")
    out = first.stdout + first.stderr
    assert "Training the teacher" in out and "Run summary" in out and "mnist-sample-5k" in out

    cache = tmp_path / "logs" / "teachers"
    (key_dir,) = [p for p in cache.iterdir() if (p / "teacher.ckpt").exists()]
    teacher_ckpt = key_dir / "teacher.ckpt"
    stamp = teacher_ckpt.stat().st_mtime_ns
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["data_source"] == "mnist-sample-5k"
    assert metrics["params"] == 12_730 and metrics["teacher_params"] == 1_199_882
    # Well above chance (0.1) after 40 steps (0.59 measured), so a student that ignores its data or a metric
    # that is not an accuracy fails here.
    assert 0.3 < metrics["test/acc"] <= 1.0 and metrics["test/teacher_acc"] > 0.5
    checkpoints = {p.name for p in (tmp_path / "run1" / "checkpoints").iterdir()}
    assert {"best.ckpt", "last.ckpt", "epoch001.ckpt"} <= checkpoints
    assert list((tmp_path / "run1" / "tensorboard").glob("events.out.tfevents.*"))

    second = run_script("train.py", *overrides, f"hydra.run.dir={tmp_path / 'run2'}")
    out = second.stdout + second.stderr
    assert "Using the cached teacher" in out and "Training the teacher" not in out
    assert teacher_ckpt.stat().st_mtime_ns == stamp
    assert [p for p in cache.iterdir() if (p / "run").is_dir()] == [key_dir]
    assert "Using cached teacher logits" in out
    # Same seed, same teacher: the same student.
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]

    run_script(  # exits 0, or run_script fails the test with its output
        "eval.py", f"ckpt_path={tmp_path / 'run1' / 'checkpoints' / 'best.ckpt'}", *offline_overrides[1:3],
        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
