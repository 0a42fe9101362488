"""Pictures of a run in TensorBoard (conf/callbacks/default.yaml: `tensorboard_figures`).

At test time (train.py tests the best checkpoint once per run):
- `test/confusion_matrix` (image): the test split's confusion matrix (torchmetrics), rows normalized;
- `config` (text): the run's resolved config, read from its `.hydra/config.yaml`;
- `distill/dark_knowledge` (image), distillation runs only: for a few test examples, the teacher's softened
  distribution over the classes at T = 1, 2, 4, 8 and the run's T, beside the student's at the run's T. The mass
  the teacher puts on wrong classes at higher T is the "dark knowledge" the soft loss transfers.
"""

from pathlib import Path

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure  # figures without pyplot, as report.py
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from kd_lightning.config import saved_run_config

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


class TensorBoardFigures(Callback):
    """Log the confusion matrix, the config and (distillation) the dark-knowledge picture to TensorBoard."""

    def __init__(self, run_dir: str | None = None, n_examples: int = 4) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        self.n_examples = n_examples
        self.confusion: MulticlassConfusionMatrix | None = None
        self.examples: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(pl_module.num_classes).to(pl_module.device)
        self.examples = None

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Tensor | None,
                          batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, _ = batch
        logits = outputs if isinstance(outputs, Tensor) else pl_module(x)  # ClassifierModule returns its logits
        self.confusion.update(logits.detach(), y)
        if self.examples is None:
            self.examples = (x[: self.n_examples].detach(), y[: self.n_examples].detach())

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        confusion = self.confusion.compute().cpu()  # summed over DDP ranks by torchmetrics
        writer_logger = self.tensorboard(trainer)
        if writer_logger is None or not trainer.is_global_zero:
            return
        writer, step = writer_logger.experiment, trainer.global_step
        writer.add_figure("test/confusion_matrix", confusion_figure(confusion), step)
        if self.run_dir and (saved := self.run_dir / ".hydra" / "config.yaml").is_file():
            cfg = saved_run_config(saved.parent.parent)  # resolvable in spawned DDP ranks too (no Hydra there)
            # Markdown code block: TensorBoard renders text as Markdown, which would eat the YAML's indentation.
            writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", step)
        teacher, T = getattr(pl_module, "teacher", None), getattr(pl_module, "T", None)
        if isinstance(teacher, torch.nn.Module) and T is not None and self.examples is not None:
            x, y = self.examples
            with torch.no_grad():
                teacher_logits, student_logits = teacher(x).float().cpu(), pl_module(x).float().cpu()
            writer.add_figure("distill/dark_knowledge",
                              dark_knowledge_figure(teacher_logits, student_logits, y.cpu(), float(T)), step)
        writer.flush()


def confusion_figure(confusion: Tensor) -> Figure:
    counts = confusion.float()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(rates)
    fig = Figure(figsize=(0.45 * n + 2.5, 0.45 * n + 1.8) if n <= 20 else (9, 8))
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title="test confusion matrix (counts; colour: row share)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def dark_knowledge_figure(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, T: float) -> Figure:
    """One row per example: the teacher's softmax(logits / t) for each t, and the student's at the run's T."""
    temps = sorted({*TEMPERATURES, T})
    n, classes = len(labels), range(teacher_logits.shape[1])
    fig = Figure(figsize=(2.6 * (len(temps) + 1), 2.0 * n + 0.6))
    axes = fig.subplots(n, len(temps) + 1, squeeze=False, sharey=True)
    for row in range(n):
        panels = [(f"teacher, T={t:g}" + (" (run)" if t == T else ""), teacher_logits[row] / t, "tab:blue")
                  for t in temps]
        panels.append((f"student, T={T:g}", student_logits[row] / T, "tab:orange"))
        for ax, (title, scaled, colour) in zip(axes[row], panels):
            probs = scaled.softmax(0).tolist()
            ax.bar(classes, probs, color=colour)
            ax.bar([int(labels[row])], [probs[int(labels[row])]], color="black", alpha=0.35)  # the label
            ax.set_ylim(0, 1)
            ax.set_title(title if row == 0 else "", fontsize=9)
            ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel(f"example {row}\nlabel {int(labels[row])}", fontsize=8)
    fig.suptitle("Dark knowledge: the teacher's softened class distribution (label shaded) and the student's")
    fig.tight_layout()
    return fig
