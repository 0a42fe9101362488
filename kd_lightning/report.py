"""Tables and plots of a sweep: `python -m kd_lightning.report <multirun dir>` (also run by Hydra at the end of
every multirun, see `ReportOnMultirunEnd`).

Writes into the multirun dir:
- results.csv: one row per job (method, group, T, alpha, seed, status, best epoch, val/test accuracy and loss,
  teacher agreement, wall time, its model card), from each job's own metrics.json / failed.json, labelled by the
  config recorded there;
- results.md: mean ± std over seeds per setting (method, group, T, alpha), the best setting (by validation
  accuracy) marked, links to the jobs' model cards;
- heatmap.png: mean test accuracy over T × alpha of the hard_soft jobs (when there are any);
- curves.png: train loss and val loss per epoch for each group, from the jobs' TensorBoard logs.
Test metrics are those of the checkpoint chosen by validation loss, never of the best test epoch.
"""

import csv
import io
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure  # figures without pyplot: no backend or global state, in scripts and notebooks
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from kd_lightning.checkpoints import atomic_write_text
from kd_lightning.config import is_distillation

log = logging.getLogger(__name__)
logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader logs every file it opens

COLUMNS = ["job", "status", "method", "group", "T", "alpha", "seed", "best_epoch", "epochs", "val_acc", "val_loss",
           "test_acc", "test_loss", "test_agreement", "teacher_acc", "wall_seconds", "card", "error"]
SETTING = ("method", "group", "T", "alpha")
KD_GROUP_METHODS = ("kd", "multi_teacher")  # the methods that distill.group, T and alpha act on


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job dirs of a multirun, in job order (Hydra names them 0, 1, ...)."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def job_settings(job: Path) -> dict[str, Any]:
    """The resolved config that produced the job's record: its metrics.json (done), failed.json (failed) or
    job.json (started), never `.hydra/config.yaml`, which Hydra rewrites when another sweep command reuses the
    dir. Sweeps recorded before records held the config fall back to it."""
    for name in ("metrics.json", "failed.json", "job.json"):
        if (job / name).is_file():
            record = json.loads((job / name).read_text())
            if "config" in record:
                return record["config"]
    return yaml.safe_load((job / ".hydra" / "config.yaml").read_text())


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of the multirun in `sweep_dir`, labelled by the settings recorded with its result."""
    rows = []
    for job in job_dirs(Path(sweep_dir)):
        config = job_settings(job)
        distill = config.get("distill", {})
        is_student = is_distillation(config)
        method = distill.get("method", "kd") if is_student else None
        group = (distill.get("group") if method in KD_GROUP_METHODS else None) if is_student else "teacher"
        row: dict[str, Any] = {
            "job": int(job.name),
            "method": method,
            "group": group,
            "T": distill.get("T") if group in ("soft", "hard_soft") else None,  # only where it acts
            "alpha": distill.get("alpha") if group == "hard_soft" else None,
            "seed": config.get("seed"),
            "card": f"{job.name}/MODEL_CARD.md" if (job / "MODEL_CARD.md").is_file() else None,
        }
        if (job / "metrics.json").is_file():
            m = json.loads((job / "metrics.json").read_text())
            row.update(status="done", best_epoch=m.get("best_epoch"), epochs=m.get("epochs"),
                       val_acc=m.get("val/acc"), val_loss=m.get("val/loss"), test_acc=m.get("test/acc"),
                       test_loss=m.get("test/loss"), test_agreement=m.get("test/agreement"),
                       teacher_acc=m.get("test/teacher_acc"), wall_seconds=m.get("wall_seconds"))
        elif (job / "failed.json").is_file():
            row.update(status="failed", error=json.loads((job / "failed.json").read_text())["error"])
        else:
            row.update(status="unfinished")
        rows.append({c: row.get(c) for c in COLUMNS})
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each setting (method, group, T, alpha), best validation accuracy first."""
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "done":
            by_setting[tuple(row[k] for k in SETTING)].append(row)
    summary = []
    for setting, runs in by_setting.items():
        entry: dict[str, Any] = dict(zip(SETTING, setting), n=len(runs))
        for metric in ("val_acc", "test_acc", "test_loss", "test_agreement"):
            values = [r[metric] for r in runs if r[metric] is not None]
            entry[metric] = mean_std(values) if values else None
        summary.append(entry)
    return sorted(summary, key=lambda e: -e["val_acc"][0])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    summary = summarize(rows)
    lines = ["| method | group | T | alpha | runs | val acc | test acc | test loss | agreement with teacher |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    for i, e in enumerate(summary):

        def fmt(value: tuple[float, float] | None, n: int = e["n"]) -> str:
            if value is None:
                return "-"
            return f"{value[0]:.4f}" if n == 1 else f"{value[0]:.4f} ± {value[1]:.4f}"

        mark = " **(best)**" if i == 0 else ""
        t, alpha = ("-" if v is None else f"{v:.4g}" for v in (e["T"], e["alpha"]))
        lines.append(f"| {e['method'] or '-'}{mark} | {e['group'] or '-'} | {t} | {alpha} | {e['n']} | {fmt(e['val_acc'])} | "
                     f"{fmt(e['test_acc'])} | {fmt(e['test_loss'])} | {fmt(e['test_agreement'])} |")
    failed = [r for r in rows if r["status"] != "done"]
    lines.append("")
    lines.append(f"Mean ± std over seeds (a single run: its value). Best = highest mean validation accuracy. Test metrics at the checkpoint "
                 f"chosen by validation loss. {len(rows) - len(failed)} of {len(rows)} jobs done.")
    for r in failed:
        lines.append(f"- job {r['job']} {r['status']}: {r['error'] or 'no result yet'}")
    if cards := [f"[job {r['job']}]({r['card']})" for r in rows if r.get("card")]:
        lines.append("")
        lines.append("Model cards (teacher vs student): " + " · ".join(cards))
    return "\n".join(lines) + "\n"


def plot_heatmap(rows: list[dict[str, Any]], path: Path | None = None) -> Figure:
    """Mean test accuracy of the hard_soft students over T × alpha."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r["group"] == "hard_soft" and r["method"] in ("kd", None):  # T and alpha act
            cells[(r["T"], r["alpha"])].append(r["test_acc"])
    temps, alphas = sorted({t for t, _ in cells}), sorted({a for _, a in cells})
    grid = [[statistics.fmean(cells[(t, a)]) if (t, a) in cells else float("nan") for a in alphas] for t in temps]
    fig = Figure(figsize=(1.2 * len(alphas) + 2.5, 0.8 * len(temps) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
    ax.set_yticks(range(len(temps)), [str(t) for t in temps])
    ax.set_xlabel("alpha (weight of the soft loss)")
    ax.set_ylabel("temperature T")
    middle = (image.norm.vmin + image.norm.vmax) / 2
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)")
    ax.set_title("Test accuracy over T × alpha")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def epoch_curves(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch train/loss and val/loss of one job, from its TensorBoard events, as (epoch, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "epoch" not in tags:
        return {}
    epoch_at_step = {e.step: int(e.value) for e in events.Scalars("epoch")}
    return {
        tag: [(epoch_at_step.get(e.step, i), e.value) for i, e in enumerate(events.Scalars(tag))]
        for tag in ("train/loss", "val/loss") if tag in tags
    }


def label(row: dict[str, Any]) -> str:
    """A job's line in the curves: its kd group, or its method."""
    return row["group"] if row["method"] in ("kd", None) else row["method"]


def plot_curves(sweep_dir: str | Path, rows: list[dict[str, Any]], path: Path | None = None) -> Figure:
    """Train loss and val loss per epoch, one line per group (mean over its jobs)."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r["status"] != "done":
            continue
        for tag, points in epoch_curves(Path(sweep_dir) / str(r["job"])).items():
            for epoch, value in points:
                curves[tag][label(r)][epoch].append(value)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, tag, title in zip(axes, ("train/loss", "val/loss"), ("train loss (each group's objective)",
                                                                "val loss (cross-entropy on labels)")):
        for group, by_epoch in sorted(curves[tag].items()):
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", label=group)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def write_report(sweep_dir: str | Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = load_results(sweep_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "results.csv", table.getvalue())
    atomic_write_text(sweep_dir / "results.md", markdown_table(rows))
    if any(r["status"] == "done" and r["group"] == "hard_soft" and r["method"] in ("kd", None) for r in rows):
        plot_heatmap(rows, sweep_dir / "heatmap.png")
    if any(r["status"] == "done" for r in rows):
        plot_curves(sweep_dir, rows, sweep_dir / "curves.png")
    log.info("Sweep report written to %s (results.csv, results.md, heatmap.png, curves.png)", sweep_dir)
    return rows


class ReportOnMultirunEnd(Callback):
    """Hydra callback: write the report of every multirun when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and job_dirs(sweep_dir):
            write_report(sweep_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m kd_lightning.report <multirun dir>")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(sys.argv[1])
