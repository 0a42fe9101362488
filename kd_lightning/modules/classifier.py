"""ClassifierModule: one net trained with cross-entropy. Teachers are trained with it."""

import random
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import NonFiniteLossError

EVAL_STAGES = ("val", "test")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of `net`; optimizer and scheduler are Hydra partials taking params / optimizer.

    Logs `train/loss` (epoch mean; `train/loss_step` every trainer.log_every_n_steps), and per evaluation stage `<stage>/loss` (mean cross-entropy over the whole split)
    and `<stage>/acc` (top-1). Checkpoints hold `net.*` weights plus `net_config`, the Hydra config that
    builds the net, so a checkpoint alone is enough to rebuild and evaluate it.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        compile: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.compile_net = compile
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing = label_smoothing  # of the training loss only: val/test loss stays plain CE
        self.net_config: dict | None = None  # the Hydra config of `net`, stored in checkpoints
        self.num_classes: int = net.num_classes
        self.eval_metrics = nn.ModuleDict({stage: self._make_eval_metrics() for stage in EVAL_STAGES})
        self.on_train_epoch_start()

    def _make_eval_metrics(self) -> MetricCollection:
        # average="micro" is plain top-1 accuracy; torchmetrics' default ("macro") averages per class.
        return MetricCollection(
            {"acc": MulticlassAccuracy(self.num_classes, average="micro"), "loss": MeanMetric()},
            compute_groups=False,  # metrics are updated one by one, never through the collection
        )

    def configure_model(self) -> None:
        # In place (nn.Module.compile): parameter names, hence checkpoints, stay those of the plain net.
        if self.compile_net:
            self.net.compile()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)
        self.log_train_terms({"loss": loss}, len(y))
        return loss

    # ---- training-loss logging without per-step cost ---------------------------------------------------------
    # Each self.log call costs Lightning ~0.3 ms on a CPU, more than a small student's whole step. So the loss
    # terms are summed on the device (no host sync) and logged once per epoch as means (`train/<term>`), and the
    # step values (`train/<term>_step`) only on the steps the logger writes (every trainer.log_every_n_steps).
    def log_train_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        # One host sync a step (nothing measurable on a CPU): stop at the exact step, before the optimizer step,
        # so the weights and the checkpoints on disk are the last good ones.
        if not torch.isfinite(terms["loss"]):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.global_step} (epoch {self.current_epoch}): {values}; "
                "the checkpoints saved so far are kept"
            )
        values = torch.stack([v.detach() for v in terms.values()]) * batch_size
        sums = self._train_sums  # a plain dict: nn.Module.__setattr__ would cost more than the sums
        sums["sums"] = values if sums["sums"] is None else sums["sums"] + values
        sums["count"] += batch_size
        sums["names"] = list(terms)
        trainer = self._trainer  # None when a step is called by hand (tests); `self.trainer` would raise
        if trainer is not None and (self.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            self.log_dict({f"train/{k}_step": v for k, v in terms.items()}, on_step=True, on_epoch=False,
                          prog_bar=True, batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        # The epoch's running sums of the training terms (weighted by batch size), for their epoch means.
        self._train_sums: dict[str, Any] = {"sums": None, "count": 0, "names": []}

    def on_train_epoch_end(self) -> None:
        sums = self._train_sums
        if sums["sums"] is not None:
            means = sums["sums"] / sums["count"]
            self.log_dict({f"train/{k}": v for k, v in zip(sums["names"], means)}, sync_dist=True)

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

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step("test", batch)  # the logits, for callbacks (TensorBoardFigures)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the net's parameters only (subclasses hold frozen modules, e.g. a teacher)."""
        return list(self.net.parameters())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["net_config"] = self.net_config
        # The validation metrics this checkpoint was chosen by: the best checkpoint reports its own.
        checkpoint["val_metrics"] = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")
        }
        # Lightning does not save the RNG state; dropout after a resume must draw what it would have drawn.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_initialized():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if states := checkpoint.get("rng_states"):
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
