"""Lightning callbacks of this project."""

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption), save a checkpoint to resume from.

    Lightning turns SIGTERM into an exception at the next batch boundary and Ctrl-C into KeyboardInterrupt;
    both reach `on_exception`. Other exceptions (a NaN loss, a bug) save nothing: the state may be bad, and the
    last good checkpoint must stay the newest. `ckpt_path=last` picks this file when it is the newest.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            super().on_exception(trainer, pl_module, exception)
            if trainer.is_global_zero:
                print(f"\nInterrupted: checkpoint saved to {Path(self.ckpt_path)}", flush=True)
