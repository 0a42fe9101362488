"""Teacher vs student TracIn scores: top-k overlaps against chance, rank correlations, tables and figures."""

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

from kd_lightning.data import KDDataModule

# direction name -> (how the [N_train, N_test] score matrix is oriented for it, largest scores first?)
# proponents / opponents: for each test example, the train examples with the highest / lowest scores;
# train→test: for each train example, the test examples it influences most.
DIRECTIONS: dict[str, tuple[bool, bool]] = {
    "proponents": (True, True),   # (transpose to [N_test, N_train], largest)
    "opponents": (True, False),
    "train→test": (False, True),
}


def top_k_overlap(a: Tensor, b: Tensor, k: int, largest: bool = True) -> Tensor:
    """Per row of the [Q, N] score matrices a and b: how many of a's top-k columns are among b's top-k."""
    in_a = torch.zeros(a.shape, dtype=torch.bool).scatter_(1, a.topk(k, dim=1, largest=largest).indices, True)
    in_b = torch.zeros(b.shape, dtype=torch.bool).scatter_(1, b.topk(k, dim=1, largest=largest).indices, True)
    return (in_a & in_b).sum(1)


def overlap_rows(teacher: Tensor, student: Tensor, ks: Sequence[int]) -> list[dict[str, Any]]:
    """For each direction and k (clipped to the set size N): the mean top-k overlap of teacher and student over
    the queried examples, and k²/N, the mean overlap of two random k-subsets of N."""
    rows = []
    for direction, (transpose, largest) in DIRECTIONS.items():
        a, b = (teacher.T, student.T) if transpose else (teacher, student)
        n = a.shape[1]
        for k in sorted({min(int(k), n) for k in ks}):
            overlap = top_k_overlap(a.float(), b.float(), k, largest).double().mean().item()
            rows.append({"direction": direction, "k": k, "N": n, "overlap": overlap, "chance": k * k / n,
                         "overlap_fraction": overlap / k, "queries": a.shape[0]})
    return rows


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (flattened; ties get their mean rank)."""
    return spearman_corrcoef(a.flatten().float(), b.flatten().float()).item()


def spearman_per_row(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of a with the same row of b."""
    return spearman_corrcoef(a.T.float(), b.T.float())  # torchmetrics correlates columns


# ---- writing -----------------------------------------------------------------------------------------------
def write_overlap_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def overlap_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| direction | k | N | teacher ∩ student (mean) | chance k²/N | overlap / chance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['k']} | {r['N']} | {r['overlap']:.1f} | {r['chance']:.1f} | "
                     f"{r['overlap'] / r['chance']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_overlap(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean teacher-student overlap vs k, one panel per direction, with the chance curve k²/N."""
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(4.2 * len(DIRECTIONS), 3.6), squeeze=False)
    for ax, direction in zip(axes[0], DIRECTIONS):
        sel = [r for r in rows if r["direction"] == direction]
        ks = [r["k"] for r in sel]
        ax.plot(ks, [r["overlap"] for r in sel], "o-", label="teacher ∩ student")
        ax.plot(ks, [r["chance"] for r in sel], "s--", color="gray", label="chance k²/N")
        ax.plot(ks, ks, ":", color="lightgray", label="identical (k)")
        ax.set(title=f"{direction} (N={sel[0]['N']})", xlabel="k", ylabel="mean overlap")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show(ax: Any, image: Tensor, title: str, color: str = "black") -> None:
    ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None)
    ax.set_title(title, fontsize=7, color=color)
    ax.axis("off")


def plot_proponents(images: "ImageSource", queries: Sequence[int], scores: dict[str, Tensor], n_shown: int,
                    path: Path) -> None:
    """For each queried test example: the image, then its top proponents under each model (a row per model)."""
    models = list(scores)
    fig, axes = plt.subplots(len(queries) * len(models), n_shown + 1,
                             figsize=(1.1 * (n_shown + 1), 1.25 * len(queries) * len(models)), squeeze=False)
    for qi, q in enumerate(queries):
        test_image, test_label = images("test", [q])
        for mi, model in enumerate(models):
            row = axes[qi * len(models) + mi]
            _show(row[0], test_image[0], f"test {q} ({int(test_label[0])})\n{model}")
            top = scores[model][:, q].topk(n_shown).indices.tolist()
            train_images, train_labels = images("train", top)
            for j, (i, image, label) in enumerate(zip(top, train_images, train_labels)):
                color = "black" if int(label) == int(test_label[0]) else "red"
                _show(row[j + 1], image, f"#{i} ({int(label)})", color)
    fig.suptitle("Top proponents (train index (label); red: another label than the test example)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_self_influence(images: "ImageSource", self_influence: dict[str, Tensor], n_shown: int, path: Path) -> None:
    """The training examples with the highest self-influence under each model (likely mislabeled or atypical)."""
    columns = min(n_shown, 16)
    rows_per_model = -(-n_shown // columns)
    fig, axes = plt.subplots(rows_per_model * len(self_influence), columns,
                             figsize=(1.1 * columns, 1.6 * rows_per_model * len(self_influence) + 0.4), squeeze=False)
    for mi, (model, values) in enumerate(self_influence.items()):
        top = values.topk(min(n_shown, len(values))).indices.tolist()
        train_images, labels = images("train", top)
        for j in range(rows_per_model * columns):
            ax = axes[mi * rows_per_model + j // columns][j % columns]
            ax.axis("off")
            if j < len(top):
                _show(ax, train_images[j], f"{model[0]} #{top[j]} ({int(labels[j])})")
    fig.suptitle("Highest self-influence training examples (t: teacher, s: student; train index (label))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class ImageSource:
    """Displayable images ([n, H, W] or [n, H, W, 3] in [0, 1]) and labels of a datamodule's split by index."""

    def __init__(self, datamodule: KDDataModule) -> None:
        self.datamodule = datamodule

    def __call__(self, split: str, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        images, labels = self.datamodule.raw_images(split, indices)
        return images.float() / 255.0, labels
