"""logger=csv|mlflow|wandb|aim|many (kd_lightning/trackers.py): a single run and a 2-job sweep, each read back through
the tracker's own client or files (MlflowClient, the W&B offline run's transaction log, Aim's Repo, the CSV);
the reproducing command and git commit of a run; a missing tracker package named before anything trains."""

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ROOT, run_script, subprocess_env
from helpers import offline_overrides as offline
from kd_lightning.config import compose_train_config
from kd_lightning.summary import code_version, reproduce_command, shell_quote
from kd_lightning.trackers import RUN_FILES, SWEEP_REPORT_RUN, run_names

TRACKERS = "logger=[tensorboard,csv,mlflow,wandb,aim]"
TINY = ["experiment=soft", "trainer.max_epochs=2", "+trainer.limit_train_batches=6", "trainer.log_every_n_steps=3",
        "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=6']", TRACKERS]
RUN_ARTIFACTS = {Path(name).name for name in RUN_FILES}  # metrics.json, MODEL_CARD.md, card.png, config.yaml


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single run (tags=[smoke]) and one 2-job sweep (distill.T=1,4), every tracker on, sharing one teacher."""
    tmp = tmp_path_factory.mktemp("trackers")
    run_script("train.py", *TINY, *offline(tmp), "tags=[smoke]")
    run_script("train.py", "-m", *TINY, *offline(tmp), "distill.T=1,4")
    return tmp / "logs"


def single_run(logs: Path) -> Path:
    (run,) = (logs / "train" / "runs").iterdir()
    return run


def sweep_jobs(logs: Path) -> tuple[Path, list[Path]]:
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    jobs = sorted((p for p in sweep.iterdir() if (p / "metrics.json").is_file()), key=lambda p: job_T(p))
    assert len(jobs) == 2
    return sweep, jobs


def metrics_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def job_T(job: Path) -> float:
    return metrics_of(job)["config"]["distill"]["T"]


def override_dirname(job: Path) -> str:
    """What a sweep job is named by its settings: its dir's name (`000_distill.T:1`), as its TensorBoard run."""
    assert job.name.startswith(("000_distill.T:", "001_distill.T:")), job.name
    return job.name


def csv_epochs(run: Path, column: str) -> list[float]:
    """The per-epoch values of `column` in the run's CSV logger (an independent record of the same metrics)."""
    with open(run / "csv" / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


# ---- MLflow ------------------------------------------------------------------------------------------------------
def mlflow_client(logs: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{logs / 'mlflow' / 'mlflow.db'}")


def mlflow_runs(client: Any, experiment: str) -> dict[str, Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


@pytest.mark.slow  # two train.py commands (module fixture)
def test_mlflow_single_run(logs: Path) -> None:
    run_dir = single_run(logs)
    metrics = metrics_of(run_dir)
    client = mlflow_client(logs)
    runs = mlflow_runs(client, "train/runs")
    assert list(runs) == [run_dir.name]
    run = runs[run_dir.name]
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    # The settings, and the whole resolved config flattened under config/
    assert params["group"] == "soft" and params["T"] == "2.0" and params["model"] == "MLP"
    assert params["config/distill/T"] == "2.0" and params["config/model/hidden"] == "[16]"
    assert params["config/trainer/limit_train_batches"] == "6" and params["config/tags"] == "['smoke']"
    assert tags["smoke"] == "true"
    assert tags["mlflow.source.git.commit"] == metrics["git_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", metrics["git_commit"])  # this checkout's commit, as the run began
    assert tags["mlflow.note.content"] == f"`{metrics['command']}`"
    # Per-epoch metrics, with the values the CSV logger got; the test metrics at the best checkpoint.
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [round(m.value, 6) for m in history] == [round(v, 6) for v in csv_epochs(run_dir, "val/loss")]
    assert len(history) == 2
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) == 4  # steps 3, 6, 9, 12 of 12
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.metrics["hp/test_acc"] == pytest.approx(metrics["test/acc"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == RUN_ARTIFACTS
    card = client.download_artifacts(run.info.run_id, "MODEL_CARD.md", str(logs.parent / "download"))
    assert Path(card).read_text() == (run_dir / "MODEL_CARD.md").read_text()


@pytest.mark.slow  # two train.py commands (module fixture)
def test_mlflow_sweep_is_one_experiment_with_jobs_named_by_their_settings(logs: Path) -> None:
    sweep, jobs = sweep_jobs(logs)
    client = mlflow_client(logs)
    runs = mlflow_runs(client, f"train/multiruns/{sweep.name}")
    assert set(runs) == {override_dirname(j) for j in jobs} | {SWEEP_REPORT_RUN}
    for job, T in zip(jobs, ("1", "4")):
        run = runs[override_dirname(job)]
        assert f"distill.T:{T}" in run.info.run_name
        assert run.data.params["config/distill/T"] == T and run.data.params["T"] == T
        assert run.data.metrics["test/acc"] == pytest.approx(metrics_of(job)["test/acc"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == RUN_ARTIFACTS
        assert "hydra.mode=RUN" in metrics_of(job)["command"]  # the job alone, not the sweep again
    report = runs[SWEEP_REPORT_RUN]
    assert {a.path for a in client.list_artifacts(report.info.run_id)} >= {"results.csv", "results.md", "curves.png"}


# ---- W&B -----------------------------------------------------------------------------------------------------
def wandb_records(run_dir: Path) -> list[Any]:
    """The records of the W&B offline run in `run_dir` (its run-<id>.wandb transaction log: W&B's LevelDB-style
    log of 32 KiB blocks, each record in chunks of a 7-byte header (crc32, length, type) and its bytes)."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block = log_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """What the offline run holds: its name, group, config, metric history, summary, files and exit."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "files": set(), "exit": None}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
        elif kind == "history":  # a key with "/" comes as nested_key
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "files":
            out["files"] |= {f.path for f in r.files.files}
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


@pytest.mark.slow  # two train.py commands (module fixture)
def test_wandb_single_run_offline(logs: Path) -> None:
    run_dir = single_run(logs)
    metrics = metrics_of(run_dir)
    run = wandb_run(run_dir)
    assert (run["name"], run["group"], run["tags"], run["exit"]) == (run_dir.name, "train/runs", ["smoke"], 0)
    assert run["config"]["config"]["distill"]["T"] == 2.0 and run["config"]["group"] == "soft"
    assert run["config"]["command"] == metrics["command"] and run["config"]["git_commit"] == metrics["git_commit"]
    val_loss = [h["val/loss"] for h in run["history"] if "val/loss" in h]
    assert val_loss == pytest.approx(csv_epochs(run_dir, "val/loss"))
    assert run["summary"]["hp/test_acc"] == pytest.approx(metrics["test/acc"])
    assert {"metrics.json", "MODEL_CARD.md", "card.png", ".hydra/config.yaml"} <= run["files"]
    (files,) = run_dir.glob("wandb/offline-run-*/files")
    assert (files / "MODEL_CARD.md").read_text() == (run_dir / "MODEL_CARD.md").read_text()


@pytest.mark.slow  # two train.py commands (module fixture)
def test_wandb_sweep_is_one_group(logs: Path) -> None:
    sweep, jobs = sweep_jobs(logs)
    for job in jobs:
        run = wandb_run(job)
        assert (run["name"], run["group"], run["exit"]) == (override_dirname(job), f"train/multiruns/{sweep.name}", 0)
        assert run["config"]["config"]["distill"]["T"] == job_T(job)
        assert run["summary"]["test/acc"] == pytest.approx(metrics_of(job)["test/acc"])
    report = wandb_run(sweep)
    assert (report["name"], report["group"]) == (SWEEP_REPORT_RUN, f"train/multiruns/{sweep.name}")
    assert {"results.csv", "results.md", "curves.png"} <= report["files"]


# ---- Aim -----------------------------------------------------------------------------------------------------
def aim_runs(logs: Path) -> dict[str, Any]:
    """Aim's runs by name, through its Repo, after `aim storage reindex` (what `aim up` does on its own)."""
    from aim import Repo

    aim = Path(sys.executable).with_name("aim")
    subprocess.run([str(aim), "storage", "--repo", str(logs / "aim"), "reindex", "-y"], check=True,
                   capture_output=True, timeout=300)
    return {run.name: run for run in Repo.from_path(str(logs / "aim")).iter_runs()}


def aim_metric(run: Any, name: str) -> list[float]:
    (metric,) = [m for m in run.metrics() if m.name == name]
    _, (values, *_) = metric.data.items_list()
    return list(values)


@pytest.mark.slow  # two train.py commands (module fixture)
def test_aim_single_run_and_sweep(logs: Path) -> None:
    runs = aim_runs(logs)
    run_dir = single_run(logs)
    run = runs[run_dir.name]
    assert run.experiment == "train/runs" and [getattr(t, "name", t) for t in run.props.tags] == ["smoke"]
    hparams = run["hparams"]
    assert hparams["config"]["distill"]["T"] == 2.0 and hparams["group"] == "soft"
    assert hparams["git_commit"] == metrics_of(run_dir)["git_commit"]
    assert aim_metric(run, "val/loss") == pytest.approx(csv_epochs(run_dir, "val/loss"))
    assert aim_metric(run, "test/acc") == pytest.approx([metrics_of(run_dir)["test/acc"]])
    assert set(run.artifacts) == {"metrics.json", "MODEL_CARD.md", "card.png", ".hydra/config.yaml"}

    sweep, jobs = sweep_jobs(logs)
    for job in jobs:
        job_run = runs[override_dirname(job)]
        assert job_run.experiment == f"train/multiruns/{sweep.name}"
        assert job_run["hparams"]["config"]["distill"]["T"] == job_T(job)
        assert aim_metric(job_run, "test/acc") == pytest.approx([metrics_of(job)["test/acc"]])
    report = runs[SWEEP_REPORT_RUN]
    assert report.experiment == f"train/multiruns/{sweep.name}"
    assert {"results.csv", "results.md", "curves.png"} <= set(report.artifacts)


# ---- CSV and TensorBoard ------------------------------------------------------------------------------------
@pytest.mark.slow  # two train.py commands (module fixture)
def test_csv_and_tensorboard_record_the_run(logs: Path) -> None:
    run_dir = single_run(logs)
    metrics = metrics_of(run_dir)
    assert len(csv_epochs(run_dir, "train/loss")) == 2 and len(csv_epochs(run_dir, "val/acc")) == 2
    assert csv_epochs(run_dir, "test/acc") == pytest.approx([metrics["test/acc"]])
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["config"]["distill"]["T"] == 2.0 and hparams["tags"] == ["smoke"] and hparams["group"] == "soft"
    # The command that reproduces the run and the commit, in the summary's record and TensorBoard's text tab.
    assert metrics["tags"] == ["smoke"] and metrics["config"]["tags"] == ["smoke"]
    assert metrics["command"].startswith("python train.py experiment=soft trainer.max_epochs=2 ")
    assert "\"teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=6']\"" in metrics["command"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("run/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert metrics["command"] in shown and metrics["git_commit"] in shown and "smoke" in shown
    _, jobs = sweep_jobs(logs)
    for job in jobs:
        assert csv_epochs(job, "test/acc") == pytest.approx([metrics_of(job)["test/acc"]])


# ---- without the package -------------------------------------------------------------------------------------
@pytest.mark.slow  # train.py as a subprocess
def test_missing_tracker_package_is_one_line_before_training(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # This interpreter without mlflow, as after a plain `pip install -e .`: `import mlflow` raises ImportError.
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=soft", "logger=many", *offline(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "install" in line]
    assert len(errors) == 1, errors
    assert errors[0].endswith("logger.mlflow needs the mlflow package, which is not installed: "
                              "pip install 'kd-lightning[trackers]' (or pip install mlflow)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "logs" / "teachers").exists()  # stopped before the teacher was trained


# ---- in process -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_logger_configs_compose() -> None:
    assert list(compose_train_config(["logger=many"]).logger) == ["tensorboard", "csv", "mlflow"]
    for name in ("csv", "mlflow", "wandb", "aim"):
        (node,) = compose_train_config([f"logger={name}"]).logger.values()
        assert node._target_ == f"kd_lightning.trackers.{node._target_.rsplit('.', 1)[1]}"


def test_reproduce_command_round_trips_through_the_shell_and_hydra() -> None:
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = ["experiment=soft", "data.download=false", "teacher.overrides=['trainer.max_epochs=3']",
                 "+note='a, b'", "tags=[x,y]", "~callbacks.timer", 'paths.log_dir="/tmp/with space"']
    command = reproduce_command(overrides)
    assert command.startswith("python train.py experiment=soft data.download=false \"teacher.overrides=['")
    words = shlex.split(command)[2:]
    parser = OverridesParser.create()
    for given, pasted in zip(parser.parse_overrides(overrides), parser.parse_overrides(words), strict=True):
        assert (pasted.key_or_group, pasted.value(), pasted.type) == (given.key_or_group, given.value(), given.type)
    assert reproduce_command(["distill.T=2"], multirun_job=True) == "python train.py distill.T=2 hydra.mode=RUN"
    assert shell_quote("a$b") == "'a$b'" and shell_quote("plain=1") == "plain=1"


def test_code_version_marks_uncommitted_changes(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").strip()
    assert code_version.__wrapped__(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("not part of the code")
    assert code_version.__wrapped__(str(tmp_path)) == head
    (tmp_path / "f.txt").write_text("2")
    assert code_version.__wrapped__(str(tmp_path)) == f"{head}-dirty"
    assert code_version.__wrapped__(str(tmp_path / "missing")) is None


def test_run_names_sweep_job_by_its_settings(tmp_path: Path) -> None:
    job = tmp_path / "logs" / "train" / "multiruns" / "2026-01-01_00-00-00_ab-1" / "3"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"mode": "MULTIRUN", "job": {"override_dirname": "distill.T=2,distill.alpha=0.5"}}},
                   job / ".hydra" / "hydra.yaml")
    assert run_names(job, tmp_path / "logs") == ("train/multiruns/2026-01-01_00-00-00_ab-1",
                                                 "distill.T=2,distill.alpha=0.5")
    single = tmp_path / "logs" / "train" / "runs" / "2026-01-01_00-00-00_ab-2"
    (single / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"mode": "RUN", "job": {"override_dirname": "experiment=soft"}}},
                   single / ".hydra" / "hydra.yaml")
    assert run_names(single, tmp_path / "logs") == ("train/runs", single.name)
    named = job.with_name("003_distill.T:2+distill.alpha:0.5")  # a job dir named by its settings: its name
    (named / ".hydra").mkdir(parents=True)
    (named / ".hydra" / "hydra.yaml").write_text((job / ".hydra" / "hydra.yaml").read_text())
    assert run_names(named, tmp_path / "logs") == ("train/multiruns/2026-01-01_00-00-00_ab-1", named.name)
    assert run_names(tmp_path / "elsewhere" / "run", tmp_path / "logs") == ("elsewhere", "run")
