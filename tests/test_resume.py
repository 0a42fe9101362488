"""Reproducible and resumable: deterministic runs repeat exactly; a run interrupted by SIGTERM or Ctrl-C saves a
checkpoint and, resumed in place, ends with the metrics of an uninterrupted run."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from helpers import offline_overrides as offline
from helpers import run_script
from kd_lightning.config import compose_train_config
from kd_lightning.train import train

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

    # Mid-epoch (50 batches an epoch), in its own directory, without the signal this time.
    run_script("train.py", f"resume={run_dir}", "+callbacks.stop=null")
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "best_val_loss", "best_epoch", "epochs"):
        assert resumed[key] == whole[key], key

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
