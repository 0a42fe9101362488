"""Test-only callbacks, loaded by runs started from the tests (`+callbacks.x._target_=probes.…`)."""

import hashlib
import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SendSignalAt(pl.Callback):
    """Send this process `signal` at the end of training step `step`, as a user's Ctrl-C or a cluster would."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class TeacherProbe(pl.Callback):
    """Write, per rank, a hash of the teacher's weights and whether it was ever in train mode during the fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.ever_training = Path(out_dir), False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.ever_training |= any(m.training for m in pl_module.teacher.modules())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.teacher.state_dict().items()):
            digest.update(name.encode() + tensor.cpu().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(f"{digest.hexdigest()} {self.ever_training}")
