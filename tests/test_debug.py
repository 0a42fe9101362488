"""debug=fdr|overfit|limit|profiler|detect_anomaly (conf/debug/): each composes with every experiment, keeps its
teacher out of the cache normal runs use, and does what it says; `tags=[...]`, the config tree, `--help`, `--cfg job`."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import offline_overrides as offline
from helpers import run_script
from kd_lightning.config import CONF_DIR, compose_train_config, is_distillation
from kd_lightning.data import MNISTDataModule
from kd_lightning.teacher import compose_teacher_config, teacher_identity

DEBUG = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# The inner loop composes the main job's experiment; every other one (two config compositions each) runs with the
# slow tests.
EXPERIMENT_PARAMS = [e if e == "soft" else pytest.param(e, marks=pytest.mark.slow) for e in EXPERIMENTS]
TRAINER = {  # what each debug config sets on the run's trainer
    "fdr": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "limit_test_batches": 1},
    "limit": {"max_epochs": 3, "limit_train_batches": 0.1},
    "overfit": {"overfit_batches": 4, "max_epochs": 50},
    "profiler": {},
    "detect_anomaly": {"detect_anomaly": True},
}
DEBUGGED_TEACHER = ("fdr", "limit")  # the teacher is run the same way; the others train the normal recipe's
QUICK_TEACHER = ["teacher.overrides=['debug=fdr']"]  # where the teacher's training is not what a test is about


def test_the_debug_configs_are_the_documented_five() -> None:
    assert DEBUG == sorted(TRAINER)


@pytest.mark.parametrize("experiment", EXPERIMENT_PARAMS)
@pytest.mark.parametrize("debug", DEBUG)
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_debug_composes_with_every_experiment_and_keeps_its_teacher_apart(debug: str, experiment: str) -> None:
    normal = compose_train_config([f"experiment={experiment}"])
    cfg = compose_train_config([f"experiment={experiment}", f"debug={debug}"])
    assert cfg.task_name == "debug" and normal.task_name == "train"  # logs/debug/runs, not logs/train
    assert cfg.paths.cache_dir == f"{cfg.paths.log_dir}/debug/teachers" != normal.paths.cache_dir
    for key, value in TRAINER[debug].items():
        assert cfg.trainer[key] == value
    for node in ("model", "module"):  # the experiment itself is unchanged (as written: T_max=${trainer.max_epochs})
        assert OmegaConf.to_container(cfg[node]) == OmegaConf.to_container(normal[node])
    if not is_distillation(cfg):
        return
    teacher, normal_teacher = compose_teacher_config(cfg), compose_teacher_config(normal)
    if debug in DEBUGGED_TEACHER:  # a quick teacher: another key, and in the debug cache anyway
        assert teacher.trainer.limit_train_batches == TRAINER[debug]["limit_train_batches"]
        assert teacher_identity(teacher, "x") != teacher_identity(normal_teacher, "x")
    else:  # the student is debugged; its teacher is the normal recipe, trained into the debug cache
        if "benchmark" in cfg:  # the benchmark's teacher trains as long as its students (benchmark.teacher_epochs)
            teacher.trainer.max_epochs = normal_teacher.trainer.max_epochs
        assert teacher_identity(teacher, "x") == teacher_identity(normal_teacher, "x")
    assert teacher.paths.cache_dir == cfg.paths.cache_dir


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_detect_anomaly_reaches_the_trainer(tmp_path: Path) -> None:
    cfg = compose_train_config(["experiment=hard", "debug=detect_anomaly", f"paths.output_dir={tmp_path}"])
    assert instantiate(cfg.trainer)._detect_anomaly is True
    assert instantiate(compose_train_config(["experiment=hard", f"paths.output_dir={tmp_path}"]).trainer)._detect_anomaly is False


def test_overfit_batches_turns_off_shuffling() -> None:
    dm = MNISTDataModule(data_dir="unused")
    dm.splits = {"train": (torch.zeros(256, 28, 28, dtype=torch.uint8), torch.arange(256) % 10)}
    dm.trainer = SimpleNamespace(overfit_batches=4, global_rank=0, world_size=1, strategy=SimpleNamespace(
        root_device=torch.device("cpu")), fit_loop=None)
    assert dm.train_dataloader().shuffle is False
    dm.trainer.overfit_batches = 0
    assert dm.train_dataloader().shuffle is True


# ---- runs --------------------------------------------------------------------------------------------------
def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # train.py as a subprocess
def test_fdr_trains_teacher_and_student_on_one_batch_in_their_own_cache(tmp_path: Path) -> None:
    proc = run_script("train.py", "experiment=soft", "debug=fdr", "tags=[smoke,fdr]", *offline(tmp_path))
    logs = tmp_path / "logs"
    assert not (logs / "teachers").exists() and not (logs / "train").exists()
    (entry,) = (logs / "debug" / "teachers").glob("*/teacher.json")
    assert metrics(entry.parent / "run")["epochs"] == 1
    (run_dir,) = (logs / "debug" / "runs").iterdir()
    result = metrics(run_dir)
    assert result["epochs"] == 1 and result["tags"] == ["smoke", "fdr"] and result["config"]["tags"] == ["smoke", "fdr"]
    assert result["teacher_ckpt"] == str(entry.parent / "teacher.ckpt")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert (run_dir / "MODEL_CARD.md").is_file()
    lines = proc.stdout.splitlines()
    assert lines[0] == "config" and "├── tags: ['smoke', 'fdr']" in lines  # the config tree, printed at the start


@pytest.mark.slow  # train.py as a subprocess
def test_limit_runs_a_tenth_of_the_batches(tmp_path: Path) -> None:
    run_script("train.py", "experiment=hard", "debug=limit", *offline(tmp_path))
    (run_dir,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    # The sample's 3,200 training digits in batches of 64: 50 batches, a tenth is 5, for 3 epochs.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15
    assert metrics(run_dir)["epochs"] == 3


@pytest.mark.slow  # train.py as a subprocess
def test_overfit_fits_the_same_few_batches(tmp_path: Path) -> None:
    run_script("train.py", "experiment=hard", "debug=overfit", "trainer.max_epochs=15", *QUICK_TEACHER,
               *offline(tmp_path))
    (run_dir,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15 * 4
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0], losses  # 4 batches seen 15 times: memorized
    assert not (run_dir / "checkpoints" / "epoch001.ckpt").exists()  # no periodic checkpoints, no early stop


@pytest.mark.slow  # train.py as a subprocess
def test_profiler_writes_its_report_into_the_run_dir(tmp_path: Path) -> None:
    proc = run_script("train.py", "experiment=hard", "debug=profiler", "trainer.max_epochs=1", *QUICK_TEACHER,
                      "+trainer.limit_train_batches=5", "extras.print_config=false", *offline(tmp_path))
    (run_dir,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    report = (run_dir / "fit-profile.txt").read_text()
    assert "Profiler Report" in report and "run_training_epoch" in report
    assert proc.stdout.splitlines()[0] != "config" and "├── trainer" not in proc.stdout  # extras.print_config=false


@pytest.mark.slow  # train.py as subprocesses
def test_help_and_cfg_job() -> None:
    help_text = run_script("train.py", "--help").stdout
    assert "debug: detect_anomaly, fdr, limit, overfit, profiler" in help_text
    assert "logger: aim, csv, many, mlflow, tensorboard, wandb" in help_text
    job = yaml.safe_load(run_script("train.py", "experiment=soft", "debug=fdr", "tags=[a]", "--cfg", "job").stdout)
    assert job["task_name"] == "debug" and job["tags"] == ["a"] and job["trainer"]["limit_train_batches"] == 1
    assert job["teacher"]["overrides"] == ["debug=fdr"] and job["extras"]["print_config"] is True
