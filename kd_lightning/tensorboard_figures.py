"""Pictures of a run in TensorBoard (conf/callbacks/default.yaml: `tensorboard_figures`).

At test time (train.py tests the best checkpoint once per run):
- `test/confusion_matrix` (image): the test split's confusion matrix (torchmetrics), counts in the cells, coloured by
  row share;
- `config` (text): the run's resolved config, read from its `.hydra/config.yaml`;
- `distill/dark_knowledge` (image), distillation runs only: for a few test examples, the teacher's softened
  distribution over the classes at T = 1, 2, 4, 8 and the run's T, beside the student's at the run's T. The mass
  the teacher puts on wrong classes at higher T is the "dark knowledge" the soft loss transfers.

The images are drawn straight into pixel arrays with Pillow (no matplotlib figure: drawing those cost seconds per run)
by plain functions of tensors that log into any TensorBoard `SummaryWriter`-like `experiment` (`add_image`,
`add_text`): the callback below calls them, and so can code that trains students without a Lightning Trainer
(`log_test_figures`).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix

from kd_lightning.config import saved_run_config
from kd_lightning.drawing import (
    BLACK,
    GREY,
    LIGHT,
    STUDENT_COLOUR,
    TEACHER_COLOUR,
    WHITE,
    blues,
    font,
    text_width,
    tick_classes,
    vertical_text,
)

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
N_EXAMPLES = 4  # test examples in the dark-knowledge picture

CONFUSION_TAG, CONFIG_TAG, DARK_KNOWLEDGE_TAG = "test/confusion_matrix", "config", "distill/dark_knowledge"


class TensorBoardFigures(Callback):
    """Log the confusion matrix, the config and (distillation) the dark-knowledge picture to TensorBoard."""

    def __init__(self, run_dir: str | None = None, n_examples: int = N_EXAMPLES) -> None:
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
        log_confusion_matrix(writer, confusion, step)
        if self.run_dir:
            log_config(writer, self.run_dir, step)
        teacher, T = getattr(pl_module, "teacher", None), getattr(pl_module, "T", None)
        if isinstance(teacher, torch.nn.Module) and T is not None and self.examples is not None:
            x, y = self.examples
            with torch.no_grad():
                teacher_logits, student_logits = teacher(x).float().cpu(), pl_module(x).float().cpu()
            log_dark_knowledge(writer, teacher_logits, student_logits, y.cpu(), float(T), step)
        writer.flush()


# ---- what is logged, from tensors -------------------------------------------------------------------------------
def log_test_figures(experiment: Any, student_logits: Tensor, labels: Tensor, step: int, *,
                     teacher_logits: Tensor | None = None, T: float | None = None,
                     run_dir: str | Path | None = None, n_examples: int = N_EXAMPLES) -> None:
    """Log what the callback logs at test time, from the test split's logits [n, classes] and labels [n] in dataset
    order: the confusion matrix; the config when `run_dir` has a `.hydra/config.yaml`; with `teacher_logits` and
    `T`, the dark-knowledge picture of the first `n_examples` examples. `experiment`: a TensorBoard SummaryWriter
    (a TensorBoardLogger's `.experiment`), flushed at the end."""
    student_logits, labels = student_logits.detach().float().cpu(), labels.cpu()
    log_confusion_matrix(experiment, confusion_matrix(student_logits, labels), step)
    if run_dir is not None:
        log_config(experiment, run_dir, step)
    if teacher_logits is not None and T is not None:
        log_dark_knowledge(experiment, teacher_logits[:n_examples].detach().float().cpu(), student_logits[:n_examples],
                           labels[:n_examples], float(T), step)
    if hasattr(experiment, "flush"):
        experiment.flush()


def confusion_matrix(logits: Tensor, labels: Tensor) -> Tensor:
    """Counts [true class, predicted class], as the callback's torchmetrics MulticlassConfusionMatrix sums them."""
    return multiclass_confusion_matrix(logits, labels, num_classes=logits.shape[1])


def log_confusion_matrix(experiment: Any, confusion: Tensor, step: int) -> None:
    experiment.add_image(CONFUSION_TAG, confusion_image(confusion), step, dataformats="HWC")


def log_config(experiment: Any, run_dir: str | Path, step: int) -> None:
    """The run's resolved config as text, when `run_dir` holds `.hydra/config.yaml` (nothing otherwise)."""
    if (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        cfg = saved_run_config(Path(run_dir))  # resolvable in spawned DDP ranks too (no Hydra there)
        # Markdown code block: TensorBoard renders text as Markdown, which would eat the YAML's indentation.
        experiment.add_text(CONFIG_TAG, "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", step)


def log_dark_knowledge(experiment: Any, teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, T: float,
                       step: int) -> None:
    experiment.add_image(DARK_KNOWLEDGE_TAG, dark_knowledge_image(teacher_logits, student_logits, labels, T), step,
                         dataformats="HWC")


# ---- drawing (kd_lightning/drawing.py: Pillow, no matplotlib figure) ---------------------------------------
def class_key_lines(class_names: Sequence[str], width: int, size: int = 12) -> list[str]:
    """"0 cat · 1 dog · ..." wrapped to `width` pixels: what the class indices on the axes mean."""
    lines: list[str] = []
    for c, name in enumerate(class_names):
        entry = f"{c} {name}"
        if lines and text_width(lines[-1] + " · " + entry, size) <= width:
            lines[-1] += " · " + entry
        else:
            lines.append(entry)
    return lines


def confusion_image(confusion: Tensor, title: str = "test confusion matrix (counts; colour: row share)",
                    class_names: Sequence[str] | None = None) -> np.ndarray:
    """The confusion matrix as an RGB uint8 image [H, W, 3]: cells coloured by row share (white 0 to dark blue 1,
    with a colour bar), counts written in the non-empty cells (up to 20 classes), true class down, predicted
    across; with `class_names` (up to 20), a key under the matrix says which name each index is."""
    counts = confusion.detach().cpu().to(torch.long)
    rates = (counts.float() / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    n = len(counts)
    cell = 44 if n <= 10 else 32 if n <= 20 else max(3, 640 // n)
    grid = n * cell
    left, top, bottom, bar_gap, bar_w, bar_labels = 62, 44, 56, 16, 18, 64
    width = max(left + grid + bar_gap + bar_w + bar_labels, text_width(title, 15) + 24)
    key = class_key_lines(class_names, width - 24) if class_names and n <= 20 else []
    height = top + grid + bottom + 16 * len(key)
    image = Image.new("RGB", (width, height), WHITE)
    pixels = np.asarray(blues(rates)).repeat(cell, 0).repeat(cell, 1)
    image.paste(Image.fromarray(pixels), (left, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + grid, top + grid), outline=BLACK)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    draw.text((left + j * cell + cell // 2, top + i * cell + cell // 2), str(int(counts[i, j])),
                              fill=WHITE if rates[i, j] > 0.5 else BLACK, font=font(11 if cell > 40 else 10),
                              anchor="mm")
    for c in tick_classes(n):
        mid = c * cell + cell // 2
        draw.line((left + mid, top + grid, left + mid, top + grid + 4), fill=BLACK)
        draw.text((left + mid, top + grid + 6), str(c), fill=BLACK, font=font(12), anchor="ma")
        draw.line((left - 5, top + mid, left - 1, top + mid), fill=BLACK)
        draw.text((left - 8, top + mid), str(c), fill=BLACK, font=font(12), anchor="rm")
    draw.text((left + grid // 2, top + grid + 26), "predicted class", fill=BLACK, font=font(14), anchor="ma")
    vertical_text(image, (14, top + grid // 2), "true class", 14)
    for i, line in enumerate(key):
        draw.text((12, top + grid + bottom - 4 + 16 * i), line, fill=BLACK, font=font(12), anchor="la")
    draw.text((width // 2, 14), title, fill=BLACK, font=font(15), anchor="ma")
    # Colour bar: row share 1 at the top, 0 at the bottom.
    x0 = left + grid + bar_gap
    ramp = blues(np.linspace(1, 0, grid))[:, None, :].repeat(bar_w, 1)
    image.paste(Image.fromarray(ramp), (x0, top))
    draw.rectangle((x0 - 1, top - 1, x0 + bar_w, top + grid), outline=BLACK)
    for value in (0.0, 0.5, 1.0):
        y = top + round((1 - value) * (grid - 1))
        draw.line((x0 + bar_w, y, x0 + bar_w + 4, y), fill=BLACK)
        draw.text((x0 + bar_w + 7, y), f"{value:g}", fill=BLACK, font=font(12), anchor="lm")
    vertical_text(image, (x0 + bar_w + 48, top + grid // 2), "row share", 13)
    return np.asarray(image)


def dark_knowledge_image(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, T: float) -> np.ndarray:
    """One row per example: bar charts of the teacher's softmax(logits / t) for each t of TEMPERATURES and the run's
    T, and the student's at the run's T, on a 0..1 scale with the label's bar shaded darker; RGB uint8 [H, W, 3]."""
    temps = sorted({*TEMPERATURES, T})
    n, classes = len(labels), teacher_logits.shape[1]
    columns = [(f"teacher, T={t:g}" + (" (run)" if t == T else ""), teacher_logits / t, TEACHER_COLOUR) for t in temps]
    columns.append((f"student, T={T:g}", student_logits / T, STUDENT_COLOUR))
    probs = [scaled.float().softmax(1).numpy() for _, scaled, _ in columns]
    panel_w, panel_h, gap = max(170, 3 * classes), 110, 22
    left, top, row_gap = 104, 62, 34
    title = "Dark knowledge: the teacher's softened class distribution (label shaded) and the student's"
    width = max(left + len(columns) * (panel_w + gap), text_width(title, 15) + 24)
    height = top + n * (panel_h + row_gap) + 4
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 12), title, fill=BLACK, font=font(15), anchor="ma")
    slot = panel_w / classes
    for row in range(n):
        label = int(labels[row])
        y0 = top + row * (panel_h + row_gap)
        y1 = y0 + panel_h
        draw.text((8, y0 + panel_h // 2 - 9), f"example {row}", fill=BLACK, font=font(12), anchor="lm")
        draw.text((8, y0 + panel_h // 2 + 9), f"label {label}", fill=BLACK, font=font(12), anchor="lm")
        for value in (0.0, 0.5, 1.0):  # the shared y axis, labelled on the first panel
            draw.text((left - 8, y1 - round(value * panel_h)), f"{value:g}", fill=BLACK, font=font(11), anchor="rm")
        for col, ((name, _, colour), p) in enumerate(zip(columns, probs)):
            x0 = left + col * (panel_w + gap)
            if row == 0:
                draw.text((x0 + panel_w // 2, top - 8), name, fill=BLACK, font=font(12), anchor="md")
            draw.line((x0, y0 + panel_h // 2, x0 + panel_w, y0 + panel_h // 2), fill=LIGHT)  # 0.5
            for c in range(classes):
                bar = round(float(p[row, c]) * panel_h)
                shade = tuple(round(v * 0.65) for v in colour) if c == label else colour  # black at 35% over it
                bx0, bx1 = x0 + c * slot + 0.1 * slot, x0 + (c + 1) * slot - 0.1 * slot
                if bar > 0:
                    draw.rectangle((round(bx0), y1 - bar, max(round(bx1) - 1, round(bx0)), y1), fill=shade)
            draw.rectangle((x0, y0, x0 + panel_w, y1), outline=GREY)
            for c in tick_classes(classes):
                mid = round(x0 + (c + 0.5) * slot)
                draw.text((mid, y1 + 3), str(c), fill=BLACK, font=font(10), anchor="ma")
    return np.asarray(image)
