"""ClassifierModule: one net trained with cross-entropy. Teachers are trained with it."""

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

EVAL_STAGES = ("val", "test")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of `net`; optimizer and scheduler are Hydra partials taking params / optimizer.

    Logs `train/loss`, and per evaluation stage `<stage>/loss` (mean cross-entropy over the whole split)
    and `<stage>/acc` (top-1). Checkpoints hold `net.*` weights plus `net_config`, the Hydra config that
    builds the net, so a checkpoint alone is enough to rebuild and evaluate it.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing = label_smoothing  # of the training loss only: val/test loss stays plain CE
        self.net_config: dict | None = None  # the Hydra config of `net`, stored in checkpoints
        self.num_classes: int = net.num_classes
        self.eval_metrics = nn.ModuleDict({stage: self._make_eval_metrics() for stage in EVAL_STAGES})

    def _make_eval_metrics(self) -> MetricCollection:
        # average="micro" is plain top-1 accuracy; torchmetrics' default ("macro") averages per class.
        return MetricCollection(
            {"acc": MulticlassAccuracy(self.num_classes, average="micro"), "loss": MeanMetric()},
            compute_groups=False,  # metrics are updated one by one, never through the collection
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, _ = batch
        logits = self.net(x)
        metrics = self.eval_metrics[stage]
        metrics["acc"].update(logits, y)
        metrics["loss"].update(F.cross_entropy(logits, y), weight=len(y))
        self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def configure_optimizers(self) -> Any:
        # The net's parameters only: subclasses may hold other (frozen) modules that must not be optimized.
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["net_config"] = self.net_config
