"""Bad input gets a one-line error naming the value and what is accepted, before anything trains."""

import os
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException

from fake_data import write_mnist
from helpers import run_script
from kd_lightning.checkpoints import atomic_torch_save, load_checkpoint
from kd_lightning.config import compose_train_config
from kd_lightning.data import MNISTDataModule
from kd_lightning.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from kd_lightning.models import MLP, MnistCNN
from kd_lightning.modules import ClassifierModule
from kd_lightning.train import train
from kd_lightning.validation import validate_config


def compose(tmp_path: Path, *overrides: str):
    return compose_train_config([
        *overrides, f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}",
        f"paths.data_dir={tmp_path / 'data'}", "data.download=false",
    ])


@pytest.mark.parametrize(
    ("override", "key", "accepted"),
    [
        ("distill.T=0", "distill.T=0", "in [0.05, 100]"),
        ("distill.T=-2.5", "distill.T=-2.5", "in [0.05, 100]"),
        ("distill.T=1e-30", "distill.T=1e-30", "in [0.05, 100]"),  # trained a student at chance, exit 0
        ("distill.T=1000", "distill.T=1000", "in [0.05, 100]"),
        ("distill.T=0.0499", "distill.T=0.0499", "in [0.05, 100]"),  # just outside the bounds
        ("distill.T=100.01", "distill.T=100.01", "in [0.05, 100]"),
        ("seed=abc", "seed='abc'", "an integer in [0, 4294967295]"),
        ("seed=-1", "seed=-1", "an integer in [0, 4294967295]"),
        ("distill.alpha=1.5", "distill.alpha=1.5", "[0, 1]"),
        ("distill.alpha=-0.1", "distill.alpha=-0.1", "[0, 1]"),
        ("distill.group=hardsoft", "distill.group='hardsoft'", "hard, soft, hard_soft"),
        ("data.batch_size=0", "data.batch_size=0", "positive integer"),
        ("data.eval_batch_size=-5", "data.eval_batch_size=-5", "positive integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0", "positive integer"),
        ("data.train_val_split=[0.7,0.2]", "data.train_val_split=[0.7, 0.2]", "sum to 1"),
    ],
)
def test_config_values_out_of_range(tmp_path: Path, override: str, key: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        train(compose(tmp_path, "experiment=soft", override))
    message = str(err.value)
    assert "\n" not in message and message.startswith(key) and accepted in message
    assert not (tmp_path / "logs").exists()  # raised before any teacher was trained


@pytest.mark.parametrize("T", ["0.05", "100", "100.0"])
def test_temperature_bounds_are_accepted(tmp_path: Path, T: str) -> None:
    validate_config(compose(tmp_path, "experiment=soft", f"distill.T={T}"))  # raises ConfigError if refused


def test_misspelled_override_is_rejected_by_struct_mode() -> None:
    with pytest.raises(ConfigCompositionException, match="distill.temperature"):
        compose_train_config(["distill.temperature=4"])
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_train_config(["trainer.max_epoch=4"])


@pytest.mark.slow  # subprocess
def test_cli_prints_one_line_and_exits_2(tmp_path: Path, offline_overrides: list[str]) -> None:
    proc = run_script("train.py", "experiment=soft", "distill.alpha=2", *offline_overrides,
                      f"hydra.run.dir={tmp_path / 'run'}", expect_rc=2)
    assert "distill.alpha=2 is not accepted: a weight in [0, 1]" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_num_classes_disagreements(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model has num_classes=7, but the data \(mnist-sample-5k\) has 10"):
        train(compose(tmp_path, "experiment=soft", "model.num_classes=7"))
    with pytest.raises(ConfigError, match=r"^teacher model \(experiment=teacher\) has num_classes=5"):
        train(compose(tmp_path, "experiment=soft", "teacher.overrides=['model.num_classes=5']"))
    assert not (tmp_path / "logs").exists()


def save_net_checkpoint(path: Path, net: torch.nn.Module) -> Path:
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


@pytest.mark.slow  # trains a teacher
def test_teacher_checkpoint_errors(tmp_path: Path) -> None:
    def teacher_at(path: Path) -> None:
        train(compose(tmp_path, "experiment=soft", f"teacher.ckpt_path={path}"))

    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*nowhere.ckpt$"):
        teacher_at(tmp_path / "nowhere.ckpt")

    good = save_net_checkpoint(tmp_path / "good.ckpt", MnistCNN())
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.ckpt is truncated or not a PyTorch checkpoint"):
        teacher_at(truncated)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes.txt is .*not a PyTorch checkpoint"):
        teacher_at(text)

    other = save_net_checkpoint(tmp_path / "mlp.ckpt", MLP([16]))
    with pytest.raises(CheckpointError, match=r"mlp.ckpt does not fit MnistCNN: missing key net.features.0.weight"):
        teacher_at(other)

    wide = save_net_checkpoint(tmp_path / "wide.ckpt", MnistCNN(num_classes=12))
    with pytest.raises(CheckpointError, match=r"wide.ckpt does not fit MnistCNN: net.classifier.3.weight has shape "
                                              r"\(12, 128\), the model expects \(10, 128\)"):
        teacher_at(wide)


class _RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, crafted)
    with pytest.raises(CheckpointError, match=r"crafted.ckpt was refused: loading it would run code \(posix.system\)"):
        load_checkpoint(crafted)
    assert not marker.exists()
    with open(crafted, "rb") as f:  # the file really would have run it
        assert b"system" in f.read()


def test_corrupt_dataset_file_is_named(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=200, n_test=50)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1000])
    dm = MNISTDataModule(data_dir=tmp_path, download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
        dm.setup("fit")
    assert str(err.value).startswith(f"{images} is corrupt or truncated") and "delete it" in str(err.value)


class _ExplodingNet(MLP):
    """Produces an infinite output from the 4th training step on."""

    def __init__(self) -> None:
        super().__init__([16])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        out = super().forward(x)
        return out * float("inf") if self.training and self.calls > 3 else out


def test_non_finite_loss_stops_at_its_step_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    module = ClassifierModule(_ExplodingNet(), optimizer=partial(torch.optim.SGD, lr=0.1))
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         callbacks=[checkpoint], default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 3 \(epoch 0\): loss=nan; the checkpoints saved so far are kept"):
        trainer.fit(module, datamodule=MNISTDataModule(data_dir="/nonexistent", download=False))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_failed_writes_leave_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The teacher cache / logits (our atomic writer).
    target = tmp_path / "logits.pt"
    atomic_torch_save({"train": torch.ones(3)}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")  # atomic_torch_save gives torch.save an open file (kd_lightning.checkpoints)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"train": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["train"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["logits.pt"]  # no temporary file left behind

    # Lightning's checkpoints (written through fsspec's transaction: temporary file, then move).
    module = ClassifierModule(MLP([16]), optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=MNISTDataModule(data_dir="/nonexistent", download=False))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    before = ckpt.read_bytes()
    import fsspec.implementations.local as local

    def failing_write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(ckpt)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert load_checkpoint(ckpt)["global_step"] == 2
