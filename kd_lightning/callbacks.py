"""Lightning callbacks of the template (the stock ones are configured in conf/callbacks/)."""

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class ChannelsLast(Callback):
    """Keep the LightningModule's 4-D weights in channels_last (NHWC) memory format, enabled by `trainer=gpu`.

    The whole module is converted, a DistillModule's teacher included. Inputs need no conversion: a
    convolution whose weight is channels_last returns channels_last output for an NCHW input, so every layer
    after the first runs in NHWC, the layout tensor cores use without transposes under bf16 autocast.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy moves the module to its device; `.to(device)` keeps the memory format.
        pl_module.to(memory_format=torch.channels_last)
