"""Issue 25 item 10: what a dead or failed run leaves behind. The temporaries of a writer killed mid-write are
removed on the next start; trainer=gpu on a machine without a GPU is refused before anything is read or written;
a teacher whose training failed leaves no cache entry."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import kd_lightning.validation as validation
from helpers import subprocess_env
from kd_lightning.checkpoints import HOST_TAG, atomic_torch_save, remove_dead_temporaries
from kd_lightning.config import compose_train_config
from kd_lightning.data import MNISTDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import MnistCNN
from kd_lightning.teacher import cached_teacher_logits
from kd_lightning.train import main, train


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- temporaries of dead writers ------------------------------------------------------------------------------
def test_only_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    dead, alive = dead_pid(), os.getpid()
    parent = os.getppid()  # alive, and not this process
    names = {
        "dead": f".a.pt.{HOST_TAG}-{dead}.k3j2_x.tmp",
        "this process": f".a.pt.{HOST_TAG}-{alive}.abcd.tmp",
        "alive": f".a.pt.{HOST_TAG}-{parent}.abcd.tmp",
        "other host, new": f".a.pt.0badf00d-{dead}.abcd.tmp",
        "other host, old": f".a.pt.0badf00e-{dead}.abcd.tmp",
        "dead, other file": f".b.pt.{HOST_TAG}-{dead}.zz.tmp",
        "not ours": ".a.pt.random.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["other host, old"], (day_ago, day_ago))

    removed = remove_dead_temporaries(tmp_path, "a.pt")
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["other host, old"]])
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(names.values()) - {names["dead"], names["other host, old"]}
    assert [p.name for p in remove_dead_temporaries(tmp_path)] == [names["dead, other file"]]  # any file


def test_the_next_write_of_a_file_removes_its_dead_temporaries(tmp_path: Path) -> None:
    orphan = tmp_path / f".logits.pt.{HOST_TAG}-{dead_pid()}.q1w2e3.tmp"
    orphan.write_bytes(b"half a file")
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "logits.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["logits.pt"]


WRITER = """
import sys, time, torch
from pathlib import Path
from kd_lightning.checkpoints import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"the first half of the logits")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)  # killed here

atomic_write(Path(sys.argv[1]), write)
"""


@pytest.mark.slow  # a subprocess killed with SIGKILL during its write
def test_a_logit_cache_write_killed_with_sigkill_is_cleaned_on_the_next_start(tmp_path: Path) -> None:
    """Issue 25.10: a kill -9 during the logit cache's write left an orphan `*.pt.*.tmp` for good."""
    torch.manual_seed(0)
    teacher = MnistCNN().eval()
    ckpt = tmp_path / "t.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, ckpt)
    datamodule = MNISTDataModule(data_dir="/nonexistent", download=False)
    datamodule.prepare_data()
    datamodule.setup("fit")
    logits_dir = tmp_path / "cache" / "logits"
    target = logits_dir / "some-entry.pt"

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = list(logits_dir.glob(".some-entry.pt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].read_bytes() == b"the first half of the logits"

    cached_teacher_logits(ckpt, teacher, datamodule, tmp_path / "cache")  # the next start
    assert not orphans[0].exists()
    assert [p.suffix for p in logits_dir.iterdir() if p.name.startswith(".")] == []


# ---- trainer=gpu without a GPU --------------------------------------------------------------------------------
@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(validation, "usable_accelerators", lambda: ["cpu"])


def offline(tmp_path: Path, *overrides: str) -> list[str]:
    return [f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", "data.download=false",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", *overrides]


def test_gpu_trainer_without_gpu_is_refused_before_the_data(tmp_path: Path, no_gpu: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was read before the accelerator was checked")

    monkeypatch.setattr("kd_lightning.train.prepare_data", no_data)
    cfg = compose_train_config(["experiment=soft", "trainer=gpu", f"paths.output_dir={tmp_path / 'run'}",
                                *offline(tmp_path)])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == ("trainer.accelerator='gpu' is not accepted: this machine can use only cpu (no gpu "
                              "that torch can see); use trainer=default for the CPU")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_gpu_trainer_without_gpu_writes_nothing_from_the_command_line(
        tmp_path: Path, no_gpu: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Issue 25.10: `python train.py experiment=soft trainer=gpu` on a machine without a GPU loaded the data,
    started "Training the teacher", failed, and left an empty teacher dir in the cache."""
    monkeypatch.setattr(sys, "argv", ["train.py", "experiment=soft", "trainer=gpu", *offline(tmp_path)])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:
        main()
    output = "".join(capsys.readouterr())
    assert exited.value.code == 2 and "Traceback" not in output
    assert [line for line in output.splitlines() if "trainer.accelerator" in line] != []
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output
    assert not (tmp_path / "logs").exists()  # no run dir, no teacher cache


# ---- a failed teacher leaves no entry ----------------------------------------------------------------------
def tiny_teacher(tmp_path: Path, *teacher_overrides: str) -> list[str]:
    overrides = ",".join(f"'{o}'" for o in ("model=mlp_784_20_20_10", "trainer.max_epochs=1",
                                              "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                                              "+trainer.limit_test_batches=2", *teacher_overrides))
    return ["experiment=soft", "model=mlp_784_20_20_10", f"paths.output_dir={tmp_path / 'run'}",
            *offline(tmp_path), f"teacher.overrides=[{overrides}]"]


def entries(cache_dir: Path) -> list[str]:
    """The teacher cache's entries (dirs; a released lock file beside one is no entry)."""
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.is_dir() else []


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_teacher_that_fails_to_train_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cache_dir = tmp_path / "logs" / "teachers"

    def failing_fit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pl.Trainer, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(compose_train_config(tiny_teacher(tmp_path)))
    assert "Training the teacher" in caplog.text
    assert entries(cache_dir) == []


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_teacher_refused_by_its_own_checks_leaves_no_entry(tmp_path: Path, no_gpu: None) -> None:
    """A teacher override that its own validation refuses (here its accelerator) fails after the entry's run
    dir was prepared: the entry is removed."""
    with pytest.raises(ConfigError, match=r"^trainer.accelerator='gpu' is not accepted"):
        train(compose_train_config(tiny_teacher(tmp_path, "trainer.accelerator=gpu")))
    assert entries(tmp_path / "logs" / "teachers") == []
