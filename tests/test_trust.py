"""Trust (issue 11): unique run dirs, results labelled by the settings that produced them, atomic checkpoints on
any filesystem, resume past a damaged checkpoint, splits without a batch, eval.py's one-line errors, the range
of T, cache file modes, the resume command quoted for the shell, and sweeps with failed jobs exiting non-zero."""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from helpers import ROOT, job_dir, run_script
from kd_lightning.checkpoints import AtomicCheckpointIO, atomic_torch_save, intact_checkpoint
from kd_lightning.config import CONF_DIR, compose_train_config
from kd_lightning.errors import CheckpointError, ConfigError, DataError, Interrupted
from kd_lightning.eval import evaluate
from kd_lightning.models import MLP
from kd_lightning.report import load_results
from kd_lightning.run_dir import CheckResumeDir, run_name, this_run_name
from kd_lightning.sweeps import SweepGuard, run_sweep_job
from kd_lightning.train import resume_config, train

OFFLINE = ["data.download=false", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]


# ---- 3: every run its own dir ---------------------------------------------------------------------------------
def test_run_names_are_unique_per_run_agree_across_ranks_and_sort_by_time() -> None:
    t = 1_790_000_000.0
    same_second = {run_name({}, pid, host, t) for pid in (100, 101) for host in ("node1", "node2")}
    assert len(same_second) == 4  # two processes on each of two hosts sharing a filesystem
    assert all(name.startswith(run_name({}, 1, "h", t)[:19]) for name in same_second)  # the time first
    assert sorted([run_name({}, 999, "b", t + 1), run_name({}, 5, "a", t)]) == [
        run_name({}, 5, "a", t), run_name({}, 999, "b", t + 1)]

    # Ranks of one run started by the cluster: different processes (and start times), one dir.
    torchrun = {"TORCHELASTIC_RUN_ID": "a1b2c3"}
    assert run_name(torchrun, 100, "n1", t) == run_name(torchrun, 200, "n1", t) != run_name({}, 100, "n1", t)
    srun = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_START_TIME": str(int(t))}
    assert run_name(srun, 100, "n1", t + 3) == run_name(srun, 200, "n2", t + 1)
    assert run_name(srun, 100, "n1", t + 3).endswith("_slurm-4242.0")
    # A single-task SLURM job (sbatch running train.py) is told apart like any other process.
    single = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1"}
    assert run_name(single, 100, "n1", t) != run_name(single, 101, "n1", t)


def test_processes_started_at_once_get_different_names() -> None:
    code = "from kd_lightning.run_dir import this_run_name; print(this_run_name())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    names = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(names)) == 3 and all(len(n) > 20 for n in names)


def test_run_and_sweep_dirs_use_the_unique_name(tmp_path: Path) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"paths.log_dir={tmp_path}"], return_hydra_config=True)
        resumed = compose("train", [f"resume={tmp_path / 'old'}"], return_hydra_config=True)
    assert cfg.hydra.run.dir == f"{tmp_path}/train/runs/{this_run_name()}"
    assert cfg.hydra.sweep.dir == f"{tmp_path}/train/multiruns/{this_run_name()}"
    assert resumed.hydra.run.dir == str(tmp_path / "old")  # resume= keeps continuing in place


# ---- 4: a sweep's results carry their settings -------------------------------------------------------------
def sweep_config(sweep_dir: Path, *task: str):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": list(task)}}})


def test_rerun_with_other_parameters_into_a_sweep_dir_is_refused(tmp_path: Path, caplog) -> None:
    guard = SweepGuard()
    guard.on_multirun_start(sweep_config(tmp_path, "experiment=soft", "distill.T=2,0,4"))
    guard.on_multirun_start(sweep_config(tmp_path, "distill.T=2,0,4", "experiment=soft"))  # the same sweep again
    with pytest.raises(SystemExit) as exit_, caplog.at_level(logging.ERROR):
        guard.on_multirun_start(sweep_config(tmp_path, "experiment=soft", "distill.T=8"))
    assert exit_.value.code == 2
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and "distill.T=2,0,4" in message and "distill.T=8" in message
    assert "use a new hydra.sweep.dir" in message


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_report_labels_a_job_by_its_recorded_settings_not_its_rewritten_hydra_config(tmp_path: Path) -> None:
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    produced = compose_train_config(["experiment=soft", "distill.T=2", "seed=7"])
    rewritten = compose_train_config(["experiment=soft", "distill.T=8", "seed=7"])
    OmegaConf.save(rewritten, job / ".hydra" / "config.yaml")  # what Hydra leaves after a rerun with T=8
    (job / "metrics.json").write_text(json.dumps({
        "test/acc": 0.91, "val/acc": 0.9, "config": OmegaConf.to_container(produced, resolve=False)}))
    [row] = load_results(tmp_path)
    assert (row["status"], row["group"], row["T"], row["seed"], row["test_acc"]) == ("done", "soft", 2.0, 7, 0.91)


@pytest.fixture
def in_a_sweep_job(tmp_path: Path):
    """The Hydra state of a multirun job, in this process."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["experiment=soft", "distill.T=3"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    cfg.paths.output_dir = str(tmp_path / "0")
    yield cfg
    HydraConfig.instance().cfg = None


def test_sweep_job_records_its_settings_with_its_result_or_failure(in_a_sweep_job, tmp_path: Path) -> None:
    cfg = in_a_sweep_job
    assert run_sweep_job(cfg, lambda c: {"val/acc": 0.5, "test/acc": 0.4}) == 0.5
    metrics = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert metrics["config"]["distill"]["T"] == 3 and metrics["overrides"] == ["experiment=soft", "distill.T=3"]

    (tmp_path / "0" / "metrics.json").unlink()

    def fails(c):
        raise RuntimeError("out of memory")

    assert run_sweep_job(cfg, fails) is None
    failure = json.loads((tmp_path / "0" / "failed.json").read_text())
    assert failure["config"]["distill"]["T"] == 3 and failure["error"] == "RuntimeError: out of memory"


# ---- 6: atomic checkpoints on any filesystem, resume past a damaged one -------------------------------------
class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoints_are_written_atomically_in_their_own_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(Tiny(), train_dataloaders=DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    ckpt = tmp_path / "ckpts" / "last.ckpt"

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    trainer.save_checkpoint(ckpt)
    [(src, dst)] = renames
    assert dst == ckpt and src.parent == ckpt.parent  # the temporary file is never on another filesystem
    before = ckpt.read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # the disk fills up half way through the checkpoint (f: an open file)
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(ckpt)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and torch.load(ckpt, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("trainer_config", sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")))
def test_every_train_py_trainer_writes_checkpoints_atomically(tmp_path: Path, trainer_config: str) -> None:
    """Every trainer config (ddp_spawn and ddp_cpu list their plugins by hand, replacing default.yaml's list),
    instantiated as Lightning builds it; GPU configs on the CPU here, with the rest of their settings."""
    cfg = compose_train_config([f"trainer={trainer_config}", f"paths.output_dir={tmp_path}"])
    targets = [plugin["_target_"] for plugin in cfg.trainer.get("plugins") or []]
    assert "kd_lightning.checkpoints.AtomicCheckpointIO" in targets, trainer_config
    on_cpu = {"accelerator": "cpu", "precision": "32-true", "devices": 2} if cfg.trainer.accelerator != "cpu" else {}
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False, **on_cpu)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO), trainer_config


def test_cache_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_torch_save({"x": torch.ones(1)}, tmp_path / "a.pt")
        os.umask(0o002)  # a group sharing a cache
        atomic_torch_save({"x": torch.ones(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o664


def make_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "my run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_train_config(["experiment=teacher", *OFFLINE]), run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    return run_dir


def write_checkpoints(run_dir: Path, *names: str) -> None:
    """Checkpoints named oldest first."""
    for i, name in enumerate(names):
        path = run_dir / "checkpoints" / name
        torch.save({"state_dict": {"net.w": torch.ones(2)}, "epoch": i}, path)
        os.utime(path, ns=(10**18 + i * 10**9,) * 2)


def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(tmp_path: Path, caplog) -> None:
    run_dir = make_run_dir(tmp_path)
    write_checkpoints(run_dir, "best.ckpt", "epoch002.ckpt", "last.ckpt")
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(last, "r+b") as f:  # a full disk under Lightning's own writer
        f.truncate(last.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        cfg = resume_config(run_dir, [])
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "epoch002.ckpt")
    assert any("last.ckpt is truncated or not a PyTorch checkpoint" in r.getMessage() for r in caplog.records)

    for name in ("best.ckpt", "epoch002.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^every checkpoint in .*my run/checkpoints is damaged \((\w+.ckpt, ){2}"
                                              r"\w+.ckpt\): nothing to resume from; delete them"):
        resume_config(run_dir, [])
    (run_dir / "checkpoints" / "best.ckpt").unlink()
    (run_dir / "checkpoints" / "epoch002.ckpt").unlink()
    last.unlink()
    assert resume_config(run_dir, []).ckpt_path == "last" and intact_checkpoint(run_dir / "checkpoints") is None


# ---- 8: every split holds a batch -------------------------------------------------------------------------
@pytest.mark.parametrize(("split", "fractions"), [("val", "[0.9999,0.0001]"), ("train", "[0.0001,0.9999]")])
def test_split_without_a_batch_is_refused_before_training(tmp_path: Path, split: str, fractions: str) -> None:
    cfg = compose_train_config(["experiment=soft", f"data.train_val_split={fractions}", *OFFLINE,
                                f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train_val_split=")
    assert f"leaves the {split} split without a single batch" in message
    assert not (tmp_path / "logs").exists()  # no teacher was trained first


# ---- 9: eval.py's errors ----------------------------------------------------------------------------------
def eval_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", [*overrides, "data.download=false", f"paths.data_dir={tmp_path / 'data'}",
                                f"paths.output_dir={tmp_path / 'eval'}"])


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_eval_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*nowhere.ckpt$"):
        evaluate(eval_config(tmp_path, f"ckpt_path={tmp_path / 'nowhere.ckpt'}"))

    # A net for CIFAR's 3x32x32 images and 100 classes, then one for MNIST's inputs with 7 classes.
    ckpt = tmp_path / "other.ckpt"
    for in_features, num_classes, expected in (
        (3 * 32 * 32, 100, r"that does not take mnist-sample-5k inputs of shape \(1, 28, 28\)"),
        (784, 7, "with 7 outputs, but mnist-sample-5k has 10 classes"),
    ):
        net_config = {"_target_": "kd_lightning.models.MLP", "hidden": [8], "in_features": in_features,
                      "num_classes": num_classes}
        net = instantiate(net_config)
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_config": net_config},
                   ckpt)
        with pytest.raises(CheckpointError, match=f"^{ckpt} holds a MLP {expected}.*: evaluate it on the data") as err:
            evaluate(eval_config(tmp_path, f"ckpt_path={ckpt}"))
        assert "\n" not in str(err.value)

    torch.save({"state_dict": {f"net.{k}": v for k, v in MLP([8]).state_dict().items()},
                "net_config": {"_target_": "kd_lightning.models.MLP", "hidden": [8]}}, ckpt)
    with pytest.raises(DataError, match=r"^mnist not found in .*data/MNIST/raw \(download disabled") as err:
        evaluate(eval_config(tmp_path, f"ckpt_path={ckpt}", "data.offline_fallback=false"))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_eval_cli_missing_checkpoint_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_script("eval.py", f"ckpt_path={tmp_path / 'nowhere.ckpt'}", f"paths.log_dir={tmp_path / 'logs'}",
                      expect_rc=2)
    output = proc.stdout + proc.stderr
    assert f"checkpoint not found: {tmp_path / 'nowhere.ckpt'}" in output and "Traceback" not in output


# ---- 10: odd values -----------------------------------------------------------------------------------------
def test_resume_command_is_quoted_for_the_shell() -> None:
    message = str(Interrupted(Path("/tmp/my runs/2026-01-01_00-00-00"), sigterm=True))
    assert message.endswith("resume with: python train.py 'resume=/tmp/my runs/2026-01-01_00-00-00'")


def test_resume_of_a_dir_that_is_no_run_is_refused_without_creating_it(tmp_path: Path, caplog) -> None:
    typo = tmp_path / "typo" / "run"
    with pytest.raises(SystemExit) as exit_, caplog.at_level(logging.ERROR):
        CheckResumeDir().on_run_start(OmegaConf.create({"resume": str(typo)}))
    assert exit_.value.code == 2
    assert caplog.records[-1].getMessage() == (f"resume={typo} is not accepted: it does not exist (not a train.py "
                                                "run dir, e.g. logs/train/runs/<time>)")
    CheckResumeDir().on_run_start(OmegaConf.create({"resume": None}))  # no resume: nothing to check
    assert not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_resume_typo_on_the_command_line(tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "run"
    proc = run_script("train.py", f"resume={typo}", expect_rc=2)
    assert f"resume={typo} is not accepted: it does not exist" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "typo").exists()


def test_sweep_with_failed_jobs_exits_1_naming_their_failed_json(tmp_path: Path, caplog) -> None:
    for job, record in (("0", "metrics.json"), ("1", "failed.json"), ("2", "metrics.json"), ("10", "failed.json")):
        (tmp_path / job).mkdir()
        (tmp_path / job / record).write_text("{}")
    with pytest.raises(SystemExit) as exit_, caplog.at_level(logging.ERROR):
        SweepGuard().on_multirun_end(sweep_config(tmp_path))
    assert exit_.value.code == 1
    assert caplog.records[-1].getMessage() == (f"2 job(s) of the sweep failed; their errors: {tmp_path}/1/failed.json "
                                                f"{tmp_path}/10/failed.json")
    for job in ("1", "10"):
        (tmp_path / job / "failed.json").unlink()
    SweepGuard().on_multirun_end(sweep_config(tmp_path))  # all done: returns, exit code 0


TINY = ["model=mlp_784_16_10", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
        "teacher.overrides=['model=mlp_784_20_20_10','trainer.max_epochs=1','+trainer.limit_train_batches=3']"]


@pytest.mark.slow
def test_sweep_rerun_with_other_values_and_failed_jobs(tmp_path: Path) -> None:
    """The reproduction of issue 11 (4): T=2,0,4 then T=8 into the same sweep dir."""
    sweep = tmp_path / "sweep"
    common = ["-m", "experiment=soft", *TINY, f"paths.log_dir={tmp_path / 'logs'}", *OFFLINE,
              f"hydra.sweep.dir={sweep}"]
    first = run_script("train.py", *common, "distill.T=2,0,4", expect_rc=1)  # T=0 fails: the sweep exits 1
    assert f"1 job(s) of the sweep failed; their errors: {job_dir(sweep, 1)}/failed.json" in first.stdout + first.stderr
    assert "distill.T=0 is not accepted" in json.loads((job_dir(sweep, 1) / "failed.json").read_text())["error"]
    report = (sweep / "results.md").read_text()  # the report was written before the exit
    assert "2 of 3 jobs done" in report and "- job 1 failed: ConfigError: distill.T=0" in report

    rerun = run_script("train.py", *common, "distill.T=8", expect_rc=2)
    assert "use a new hydra.sweep.dir" in rerun.stdout + rerun.stderr
    assert yaml.safe_load((job_dir(sweep, 0) / ".hydra" / "config.yaml").read_text())["distill"]["T"] == 2
    rows = {r["job"]: r for r in load_results(sweep)}
    assert (rows[0]["T"], rows[2]["T"]) == (2.0, 4.0)
    assert rows[0]["test_acc"] == json.loads((job_dir(sweep, 0) / "metrics.json").read_text())["test/acc"]


@pytest.mark.slow
def test_a_run_whose_last_checkpoint_is_damaged_resumes_and_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train_config(["experiment=teacher", "model=mlp_784_16_10", "trainer.max_epochs=2",
                                "+trainer.limit_train_batches=3", *OFFLINE, f"paths.log_dir={tmp_path / 'logs'}",
                                f"paths.output_dir={run_dir}"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    train(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a full disk left before checkpoints were atomic

    resumed_cfg = resume_config(run_dir, ["trainer.max_epochs=3"])
    assert Path(resumed_cfg.ckpt_path).name in ("best.ckpt", "epoch001.ckpt")
    resumed = train(resumed_cfg)
    assert resumed["epochs"] == 3 and torch.load(last, weights_only=True)["epoch"] == 2
