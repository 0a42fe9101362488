"""The progress bar: a live tqdm bar on a terminal, one line per epoch otherwise, off with
`trainer.enable_progress_bar=false` (Lightning's own switch) without an error."""

import sys
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from fake_data import write_mnist
from kd_lightning.callbacks import EpochLineProgressBar
from kd_lightning.config import compose_train_config
from kd_lightning.train import build, prepare_data


def tiny_run_overrides(tmp_path: Path) -> list[str]:
    write_mnist(tmp_path / "data", n_train=200, n_test=50)
    return [
        "model=mlp_784_16_10", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.output_dir={tmp_path / 'run'}", "data.download=false", "data.batch_size=32",
        "trainer.max_epochs=2", "+trainer.enable_model_summary=false",
    ]


def built(overrides: list[str]):
    """A classifier run as train.py builds it (no teacher)."""
    cfg = compose_train_config(overrides)
    return build(cfg, prepare_data(cfg), [])


def progress_bars(trainer) -> list[ProgressBar]:
    return [c for c in trainer.callbacks if isinstance(c, ProgressBar)]


def test_enable_progress_bar_false_turns_the_bar_off(tmp_path: Path) -> None:
    run = built([*tiny_run_overrides(tmp_path), "trainer.enable_progress_bar=false"])
    assert progress_bars(run.trainer) == []
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.current_epoch == 2


def test_one_plain_line_per_epoch_when_stdout_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = built(tiny_run_overrides(tmp_path))
    assert [type(b) for b in progress_bars(run.trainer)] == [EpochLineProgressBar]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("val/loss=" in line and "val/acc=" in line for line in lines), lines
    val_loss = float(lines[-1].split("val/loss=")[1].split()[0])
    assert val_loss == pytest.approx(float(run.trainer.callback_metrics["val/loss"]), rel=1e-3)


def test_live_bar_with_a_refresh_rate_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    run = built([*tiny_run_overrides(tmp_path), "callbacks.progress_bar.refresh_rate=7"])
    bars = progress_bars(run.trainer)
    assert [type(b) for b in bars] == [TQDMProgressBar] and bars[0].refresh_rate == 7


def test_lean_callbacks_keep_lightnings_state_keys() -> None:
    """The default callbacks' cheaper subclasses write the same callback state keys into checkpoints."""
    from pytorch_lightning import callbacks as pl_callbacks

    from kd_lightning.callbacks import EarlyStopping, ModelCheckpoint

    for kwargs in ({"monitor": "val/loss", "filename": "best"}, {"monitor": None, "every_n_epochs": 2}):
        ours = ModelCheckpoint(**kwargs)
        assert ours.state_key == pl_callbacks.ModelCheckpoint(**kwargs).state_key
        ours.monitor = "val/acc"  # a changed setting changes the key, as in Lightning
        assert ours.state_key == pl_callbacks.ModelCheckpoint(**{**kwargs, "monitor": "val/acc"}).state_key
    assert EarlyStopping(monitor="val/loss").state_key == pl_callbacks.EarlyStopping(monitor="val/loss").state_key


def test_deferred_checkpoint_sync_keeps_order_and_reports_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch-end saves return before their fsyncs and rename; those run in order, and a failure is raised later."""
    import errno
    import os
    import threading

    import torch

    from kd_lightning.checkpoints import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    # Deferred: a save returns while its fsync is still held back (a synchronous writer would wait in it here,
    # time out and find the save not yet returned).
    release, returned_first = threading.Event(), []
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        returned_first.append(release.wait(timeout=10))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    with io.deferred_sync():
        io.save_checkpoint({"step": 0}, path)
    assert not path.exists()  # written to its temporary file, not yet renamed into place
    release.set()
    io.wait()
    monkeypatch.undo()
    assert returned_first and all(returned_first) and torch.load(path, weights_only=True)["step"] == 0

    with io.deferred_sync():
        for step in range(3):
            io.save_checkpoint({"step": step}, path)
    io.teardown()
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with io.deferred_sync():
        io.save_checkpoint({"step": 3}, path)
    with pytest.raises(OSError, match="Input/output error"):
        io.teardown()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 2  # the old file stays whole, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
