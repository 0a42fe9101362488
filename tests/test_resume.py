"""Reproducible and resumable: deterministic runs repeat exactly; a run interrupted by SIGTERM or Ctrl-C saves a
checkpoint and, resumed in place, ends with the metrics of an uninterrupted run. resume= changes only what cannot
change the finished epochs (or what it is told to force, recorded); a copied or moved run continues in place, and
every tool reads the copy's own files; eval.py tests on the data the checkpoint's run trained on."""

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from fake_data import write_mnist
from helpers import offline_overrides as offline
from helpers import run_script
from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.config import CONF_DIR, compose_train_config
from kd_lightning.errors import ConfigError, Interrupted, hydra_value
from kd_lightning.eval import evaluate
from kd_lightning.train import resume_config, train

# A small net with dropout (so the resumed RNG state matters), Adadelta + StepLR (scheduler state), 3 epochs.
RUN = ["experiment=teacher", "model=mlp_784_20_20_10", "model.dropout=0.2", "trainer.max_epochs=3",
       "trainer.deterministic=true", "seed=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The metrics of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("whole")
    run_script("train.py", *RUN, *offline(tmp), f"hydra.run.dir={tmp / 'run'}")
    return json.loads((tmp / "run" / "metrics.json").read_text())


@pytest.mark.slow  # subprocess
def test_seeded_deterministic_runs_are_identical(tmp_path: Path, uninterrupted: dict) -> None:
    """The recipe run again in this process, in fresh dirs, repeats the subprocess run bit for bit."""
    cfg = compose_train_config([*RUN, *offline(tmp_path), f"paths.output_dir={tmp_path / 'run'}"])
    again = train(cfg)
    for key in ("test/acc", "test/loss", "val/acc", "val/loss", "best_val_loss", "best_epoch"):
        assert again[key] == uninterrupted[key], key
    assert again["test/acc"] > 0.5


@pytest.mark.slow  # subprocess
@pytest.mark.parametrize(("signal", "exit_code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, offline_overrides: list[str], signal: str,
                                                    exit_code: int, uninterrupted: dict) -> None:
    whole = uninterrupted

    run_dir = tmp_path / "interrupted"
    stopped = run_script(
        "train.py", *RUN, *offline_overrides, f"hydra.run.dir={run_dir}",
        "+callbacks.stop._target_=probes.SendSignalAt", "+callbacks.stop.step=70", f"+callbacks.stop.signal={signal}",
        expect_rc=exit_code,
    )
    assert f"resume with: python train.py resume={run_dir}" in stopped.stdout + stopped.stderr
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (run_dir / "metrics.json").exists()

    # Mid-epoch (50 batches an epoch), in its own directory, without the signal this time (a change that resume=
    # refuses unless forced: recorded in metrics.json).
    run_script("train.py", f"resume={run_dir}", "+callbacks.stop=null", "resume_force=[callbacks.stop]")
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "best_val_loss", "best_epoch", "epochs"):
        assert resumed[key] == whole[key], key
    assert [(c["key"], c["to"], c["epoch"], c["forced"]) for c in resumed["resume_changes"]] == \
        [("callbacks.stop", None, 1, True)]  # step 70 of 50 a epoch: the change holds from epoch 1, mid-epoch

    # The TensorBoard curves continue: each epoch's validation point once, steps increasing.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [49, 99, 149]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2


class RisingValLoss(pl.LightningModule):
    """val/loss grows every epoch: the best checkpoint stays at epoch 0 while training goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_last_epoch_after_the_best_one(tmp_path: Path) -> None:
    """The configured checkpoints: best.ckpt at the best epoch, last.ckpt at the last one (what resume reads).
    (Lightning 2.6's `save_last=True` beside a monitored top-1 would leave last.ckpt at the best epoch.)"""
    cfg = compose_train_config([f"paths.output_dir={tmp_path}"])
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("model_checkpoint", "last_checkpoint")]
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(RisingValLoss(), train_dataloaders=data, val_dataloaders=data)
    epoch_of = {name: torch.load(tmp_path / "checkpoints" / name, weights_only=True)["epoch"]
                for name in ("best.ckpt", "last.ckpt")}
    assert epoch_of == {"best.ckpt": 0, "last.ckpt": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


# ---- resume= changes only what cannot change the finished epochs; copied runs; eval's data -------------------
TINY = ["+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]


def recorded_run(run_dir: Path, overrides: list[str]) -> OmegaConf:
    """The composed config of a train.py run, recorded in `run_dir/.hydra` as Hydra records it (its config and
    its config-group choices), for a run trained in this process."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        choices = OmegaConf.to_container(compose("train", overrides, return_hydra_config=True).hydra.runtime.choices)
    cfg = compose_train_config([*overrides, f"paths.output_dir={run_dir}"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run_dir / ".hydra" / "hydra.yaml")
    return cfg


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch `experiment=soft` run at T=2 (its teacher: 1 short epoch), trained in this process."""
    tmp = tmp_path_factory.mktemp("soft")
    teacher = ["trainer.max_epochs=1", *TINY]
    cfg = recorded_run(tmp / "run", ["experiment=soft", "trainer.max_epochs=2", *TINY, *offline(tmp),
                                     "teacher.overrides=[" + ",".join(f"'{o}'" for o in teacher) + "]"])
    train(cfg)
    return tmp / "run"


def copy_of(run: Path, tmp_path: Path, name: str = "a cöpy") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(("override", "line"), [
    ("distill.T=8", "distill.T=8 is not accepted with resume=: the run was trained with distill.T=2.0. resume= "
                    "changes only trainer.max_epochs, "),
    ("module.optimizer.lr=0.1", "module.optimizer.lr=0.1 is not accepted with resume=: the run was trained with "
                                "module.optimizer.lr=0.001. "),
    ("model=mlp_784_20_20_10", "model=mlp_784_20_20_10 is not accepted with resume=: the run was trained with "
                               "model=mlp_784_16_10; a resumed run keeps its config groups"),
    ("data=fashion_mnist", "data=fashion_mnist is not accepted with resume=: the run was trained with data=mnist;"),
    ("+distill.dkd.extra=1", "distill.dkd.extra=1 is not accepted with resume=: the run was trained with "
                             "distill.dkd.extra=(absent). "),
])
@pytest.mark.slow  # trains the module's run (fixture)
def test_resume_refuses_a_change_of_what_the_finished_epochs_mean(soft_run: Path, override: str, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        resume_config(soft_run, ["trainer.max_epochs=3", override])
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    if "=" in override and not override.startswith(("model=", "data=")):
        key = override.lstrip("+").split("=")[0]
        assert str(err.value).endswith(f"to change {key} anyway from epoch 2 on, add resume_force=[{key}] (recorded "
                                       "in metrics.json)")
    assert not (soft_run / "resume_changes.json").exists()  # nothing recorded, nothing trained


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_resume_accepts_the_allowed_keys_and_the_runs_own_values(soft_run: Path, tmp_path: Path) -> None:
    run = copy_of(soft_run, tmp_path)
    cfg = resume_config(run, ["trainer.max_epochs=5", "callbacks.early_stopping.patience=4",
                              f"paths.data_dir={tmp_path / 'moved data'}", "trainer.enable_progress_bar=false",
                              "experiment=soft", "model=mlp_784_16_10", "distill.T=2", "module.optimizer.lr=1e-3"])
    assert (cfg.trainer.max_epochs, cfg.callbacks.early_stopping.patience, cfg.distill.T) == (5, 4, 2.0)
    changes = json.loads((run / "resume_changes.json").read_text())["changes"]
    assert [(c["key"], c["from"], c["to"], c["epoch"], c["forced"]) for c in changes] == [
        ("trainer.max_epochs", 2, 5, 2, False), ("callbacks.early_stopping.patience", 2, 4, 2, False),
        ("paths.data_dir", str(soft_run.parent / "data"), str(tmp_path / "moved data"), 2, False)]


@pytest.mark.slow  # subprocess
def test_refused_resume_is_one_line_on_the_command_line(soft_run: Path, tmp_path: Path) -> None:
    run = copy_of(soft_run, tmp_path)
    for override, line in (("data=fashion_mnist", "data=fashion_mnist is not accepted with resume=: the run was "
                                                  "trained with data=mnist;"),
                           ("distill.T=8", "distill.T=8 is not accepted with resume=: the run was trained with "
                                           "distill.T=2.0.")):
        proc = run_script("train.py", f"resume={hydra_value(str(run))}", override, expect_rc=2)
        output = proc.stdout + proc.stderr
        assert line in output and "Traceback" not in output and "Error executing job" not in output
        assert len([ln for ln in output.splitlines() if "not accepted" in ln]) == 1


@pytest.mark.slow  # trains and resumes
def test_a_forced_change_is_recorded_with_the_epoch_it_holds_from(soft_run: Path, tmp_path: Path) -> None:
    run = copy_of(soft_run, tmp_path)
    train(resume_config(run, ["distill.T=8", "trainer.max_epochs=3"], force=["distill.T"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["config"]["distill"]["T"] == 8
    assert metrics["resume_changes"] == [
        {"key": "distill.T", "from": 2.0, "to": 8, "epoch": 2, "forced": True},
        {"key": "trainer.max_epochs", "from": 2, "to": 3, "epoch": 2, "forced": False},
    ]
    # A later resume continues at T=8 (the run's setting since epoch 2), and adds its own change to the record.
    cfg = resume_config(run, ["trainer.max_epochs=4"])
    assert cfg.distill.T == 8
    train(cfg)
    changes = json.loads((run / "metrics.json").read_text())["resume_changes"]
    assert [(c["key"], c["to"], c["epoch"]) for c in changes] == [
        ("distill.T", 8, 2), ("trainer.max_epochs", 3, 2), ("trainer.max_epochs", 4, 3)]


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow  # trains and resumes
def test_a_copied_run_resumes_in_place_and_its_best_ckpt_stays_best(soft_run: Path, tmp_path: Path) -> None:
    original = sha256s(soft_run / "checkpoints")
    copy = copy_of(soft_run, tmp_path)
    assert json.loads((soft_run / "metrics.json").read_text())["best_ckpt"] == "checkpoints/best.ckpt"
    train(resume_config(copy, ["trainer.max_epochs=4"]))
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["best_ckpt"] == "checkpoints/best.ckpt" and "output_dir" not in metrics
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == \
        ["best.ckpt", "epoch001.ckpt", "epoch003.ckpt", "last.ckpt"]  # no best-v1.ckpt
    best = load_checkpoint(copy / "checkpoints" / "best.ckpt")
    state = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"])
    assert best["epoch"] == metrics["best_epoch"] and state["best_model_path"] == str(copy / "checkpoints" / "best.ckpt")
    # The best of all four epochs, the two trained before the copy included.
    events = EventAccumulator(str(copy / "tensorboard"))
    events.Reload()
    val_losses = {e.step: e.value for e in events.Scalars("val/loss")}
    assert len(val_losses) == 4 and metrics["best_val_loss"] == pytest.approx(min(val_losses.values()), rel=1e-6)
    assert sha256s(soft_run / "checkpoints") == original  # the original run is untouched

    # eval.py on the copy's best.ckpt gives what its metrics.json says.
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose("eval", [f"ckpt_path={hydra_value(str(copy / 'checkpoints' / 'best.ckpt'))}",
                                    f"paths.output_dir={tmp_path}",
                                    "trainer.enable_progress_bar=false"])
    assert evaluate(eval_cfg)["test/acc"] == metrics["test/acc"]


@pytest.mark.parametrize("record", ["metrics.json", "teachers.json"])  # a finished run; an interrupted one
@pytest.mark.slow  # trains the module's run (fixture)
def test_resuming_with_another_teacher_than_the_recorded_one_is_refused(soft_run: Path, tmp_path: Path,
                                                                         record: str) -> None:
    run = copy_of(soft_run, tmp_path)
    teacher = json.loads((run / "metrics.json").read_text())["teacher_ckpt"]
    assert json.loads((run / "teachers.json").read_text())["teacher_ckpts"] == [teacher]
    if record == "teachers.json":
        (run / "metrics.json").unlink()
    recorded = json.loads((run / record).read_text())
    recorded["teacher_ckpts_sha256" if record == "metrics.json" else "sha256"] = ["0" * 64]  # as if the cached
    (run / record).write_text(json.dumps(recorded))  # teacher had been retrained since
    with pytest.raises(ConfigError, match=rf"^the teacher {teacher} is not the one {run} was "
                                          r"distilled from \(sha256 \w{12}\.\.\., recorded 000000000000\.\.\.\)"):
        train(resume_config(run, ["trainer.max_epochs=3"]))


@pytest.mark.slow  # trains a run
def test_eval_tests_on_the_data_the_checkpoints_run_trained_on(tmp_path: Path) -> None:
    """A Fashion-MNIST run's checkpoint, evaluated without data=, is tested on Fashion-MNIST (not eval.yaml's MNIST,
    whose 28x28 inputs would fit the net as well)."""
    data = write_mnist(tmp_path / "data", folder="FashionMNIST", n_train=400, n_test=100)
    run = tmp_path / "run"
    cfg = recorded_run(run, ["experiment=teacher", "model=mlp_784_16_10", "data=fashion_mnist",
                             "trainer.max_epochs=1", *TINY, *offline(tmp_path)])
    assert cfg.paths.data_dir == str(data)
    metrics = train(cfg)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose("eval", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                                    f"paths.output_dir={tmp_path / 'eval'}", "trainer.enable_progress_bar=false"])
    result = evaluate(eval_cfg)
    assert result["data_source"] == metrics["data_source"] == "fashion_mnist"
    assert result["data_from"] == f"the checkpoint's run {run}"
    assert (result["test/acc"], result["test/loss"]) == (metrics["test/acc"], pytest.approx(metrics["test/loss"]))


@pytest.mark.slow  # subprocess
def test_eval_records_an_explicit_data_override(soft_run: Path, tmp_path: Path) -> None:
    run_script("eval.py", f"ckpt_path={soft_run / 'checkpoints' / 'best.ckpt'}", "data=mnist",
               f"paths.data_dir={tmp_path / 'data'}", "data.download=false", f"hydra.run.dir={tmp_path}")
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["data_from"] == "data= given on the command line" and result["data_source"] == "mnist-sample-5k"


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_resume_command_is_quoted_for_the_shell_and_for_hydra(tmp_path: Path) -> None:
    """Pasted into a shell, the printed command gives Hydra the run dir, non-ASCII characters, spaces, quotes,
    brackets and commas included."""
    for name in ("rün dir é", "it's [a],b=c", 'a "quoted" dir\\'):
        run_dir = tmp_path / name
        command = str(Interrupted(run_dir, sigterm=False)).split("resume with: ")[1]
        argv = shlex.split(command)
        assert argv[:2] == ["python", "train.py"] and len(argv) == 3
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", argv[2:], return_hydra_config=True)
        assert cfg.resume == str(run_dir) and cfg.hydra.run.dir == str(run_dir)
