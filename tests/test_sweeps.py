"""Hydra multiruns: a T × alpha grid and its report, resuming a sweep, failures that do not stop it, the joblib
launcher (teacher trained once), two Optuna trials, the SLURM launcher config, and the results notebook."""

import csv
import json
import os
from pathlib import Path

import nbclient
import nbformat
import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from helpers import ROOT, job_dir, run_script
from helpers import offline_overrides as offline
from kd_lightning.config import CONF_DIR

TINY = ["trainer.max_epochs=2", "+trainer.limit_train_batches=10", "trainer.log_every_n_steps=5",
        "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=10']"]
GRID = ["-m", "experiment=hard_soft", "distill.T=1,4", "distill.alpha=0.1,0.9", *TINY]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("grid")
    command = [*GRID, *offline(tmp), f"hydra.sweep.dir={tmp / 'sweep'}"]
    run_script("train.py", *command)
    return tmp / "sweep", command


@pytest.mark.slow  # multirun
def test_grid_sweep_report(grid: tuple[Path, list[str]]) -> None:
    sweep, _ = grid
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["T"], r["alpha"]) for r in rows] == [("1", "0.1"), ("1", "0.9"), ("4", "0.1"), ("4", "0.9")]
    # Job dirs named by what the sweep varies, the job number first (TensorBoard lists its runs by these names).
    assert [r["dir"] for r in rows] == ["000_distill.T:1+distill.alpha:0.1", "001_distill.T:1+distill.alpha:0.9",
                                        "002_distill.T:4+distill.alpha:0.1", "003_distill.T:4+distill.alpha:0.9"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [r["dir"] for r in rows]
    for row in rows:
        metrics = json.loads((sweep / row["dir"] / "metrics.json").read_text())
        assert row["status"] == "done" and row["group"] == "hard_soft" and row["seed"] == "42"
        assert float(row["test_acc"]) == pytest.approx(metrics["test/acc"])
        assert float(row["val_acc"]) == pytest.approx(metrics["val/acc"])
        assert float(row["test_agreement"]) == pytest.approx(metrics["test/agreement"])
        assert int(row["best_epoch"]) == metrics["best_epoch"] and float(row["wall_seconds"]) > 0

    table = (sweep / "results.md").read_text().splitlines()
    settings = [line for line in table if line.startswith("| kd") and "| hard_soft |" in line]
    assert len(settings) == 4 and "**(best)**" in settings[0]
    best_val = max(float(r["val_acc"]) for r in rows)
    assert f"| {best_val:.4f} |" in settings[0]
    for png in ("heatmap.png", "curves.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One TensorBoard for the whole sweep: every job's run carries its hparams (the HParams tab).
    for job in range(4):
        tags = {v.tag for f in (job_dir(sweep, job) / "tensorboard").glob("events.*")
                for event in EventFileLoader(str(f)).Load() for v in event.summary.value}
        assert {"_hparams_/experiment", "_hparams_/session_start_info", "hp/test_acc", "val/loss"} <= tags


@pytest.mark.slow  # multirun
def test_rerunning_the_sweep_skips_finished_jobs(grid: tuple[Path, list[str]]) -> None:
    sweep, command = grid
    jobs = [job_dir(sweep, j) for j in range(4)]
    stamps = [(job / "metrics.json").stat().st_mtime_ns for job in jobs]
    # Job 3 "did not finish": its result is gone but its last checkpoint is there.
    (jobs[3] / "metrics.json").unlink()
    # Job 2's result was damaged (issue 25, 8): it counts as unfinished, the sweep goes on and trains it again.
    damaged = jobs[2] / "metrics.json"
    damaged.write_text(damaged.read_text()[:100])
    proc = run_script("train.py", *command)
    log = proc.stdout + proc.stderr
    assert log.count("finished in an earlier run of this sweep: skipped") == 2
    assert log.count(f"{damaged} is damaged (JSONDecodeError: ") == 1
    assert f"Job {jobs[3].name} resumes from its last checkpoint" in log
    assert all((jobs[j] / "metrics.json").stat().st_mtime_ns == stamps[j] for j in range(2))
    for job in jobs[2:]:
        assert json.loads((job / "metrics.json").read_text())["epochs"] == 2
    assert "4 of 4 jobs done" in (sweep / "results.md").read_text()


@pytest.mark.slow  # a notebook, on a multirun
def test_notebook_runs_on_the_sweep(grid: tuple[Path, list[str]]) -> None:
    sweep, _ = grid
    notebook = nbformat.read(ROOT / "notebooks" / "kd_results.ipynb", as_version=4)
    os.environ["KD_SWEEP_DIR"] = str(sweep)
    try:
        nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    finally:
        del os.environ["KD_SWEEP_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # heatmap and curves
    assert any("4 jobs, 4 done" in o.get("text", "") for o in outputs)


@pytest.mark.slow  # multirun
def test_joblib_parallel_jobs_share_one_teacher_and_failures_do_not_stop_the_sweep(tmp_path: Path) -> None:
    """With the default sweep dir (${kd_run_name:}): the workers, which compose their jobs' configs again, put
    every job in the one sweep dir the report covers (each worker used to name its own)."""
    run_script("train.py", "-m", "experiment=soft", "distill.T=2,-1,3", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", *TINY, *offline(tmp_path), expect_rc=1)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name[:3] for p in sweep.iterdir() if p.is_dir()) == ["000", "001", "002"]
    logs = [(job_dir(sweep, job) / "train.log").read_text() for job in range(3)]
    assert sum("Training the teacher" in log for log in logs) == 1
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(f"2 jobs at once on {len(os.sched_getaffinity(0))} cores: {threads} torch threads" in log for log in logs)
    assert len(list((tmp_path / "logs" / "teachers").glob("*/teacher.ckpt"))) == 1
    failure = json.loads((job_dir(sweep, 1) / "failed.json").read_text())
    assert failure["error"].startswith("ConfigError: distill.T=-1 is not accepted: a temperature in [0.05, 100]")
    assert (job_dir(sweep, 0) / "metrics.json").is_file() and (job_dir(sweep, 2) / "metrics.json").is_file()
    assert "- job 1 failed: ConfigError: distill.T=-1" in (sweep / "results.md").read_text()


@pytest.mark.slow  # multirun
def test_two_optuna_trials(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_script("train.py", "sweep=optuna", "hydra.sweeper.n_trials=2", *TINY, *offline(tmp_path),
               f"hydra.sweep.dir={sweep}")
    result = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in result and "distill.T" in result and "distill.alpha" in result
    values = [json.loads((job_dir(sweep, j) / "metrics.json").read_text())["val/acc"] for j in range(2)]
    assert f"best_value: {max(values)}" in result


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_slurm_launcher_configs_compose() -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        plain = compose("train", ["sweep=groups", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                  "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=30"],
                        return_hydra_config=True)
        ours = compose("train", ["sweep=groups", "hydra/launcher=slurm"], return_hydra_config=True)
    assert plain.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (plain.hydra.launcher.partition, plain.hydra.launcher.gpus_per_node, plain.hydra.launcher.timeout_min) == (
        "gpu", 2, 30)
    assert ours.hydra.launcher._target_ == plain.hydra.launcher._target_
    assert (ours.hydra.launcher.timeout_min, ours.hydra.launcher.gpus_per_node) == (240, 1)
    assert dict(ours.hydra.sweeper.params) == {"experiment": "hard,soft,hard_soft", "seed": "1,2,3"}
