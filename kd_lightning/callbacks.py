"""Lightning callbacks of this project (the stock ones are configured in conf/callbacks/)."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, OnExceptionCheckpoint
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


class ChannelsLast(Callback):
    """Keep the LightningModule's 4-D weights in channels_last (NHWC) memory format, enabled by `trainer=gpu`.

    The whole module is converted, a DistillModule's teacher included. Inputs need no conversion: a
    convolution whose weight is channels_last returns channels_last output for an NCHW input, so every layer
    after the first runs in NHWC, the layout tensor cores use without transposes under bf16 autocast.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy moves the module to its device; `.to(device)` keeps the memory format.
        pl_module.to(memory_format=torch.channels_last)
