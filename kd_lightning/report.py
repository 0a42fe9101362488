"""Tables and plots of a sweep: `python -m kd_lightning.report <multirun dir>` (also run by Hydra at the end of
every multirun, see `ReportOnMultirunEnd`).

Every result is labelled by the config recorded with it (the job's metrics.json / failed.json / job.json), and
the columns come from those configs: besides method, group, T, alpha and seed, every setting whose value differs
between the jobs gets a column. Left out: where a job reads and writes and how it prints (NOT_SETTINGS, and any
value naming the job's own dir), and a setting that repeats another one in every job (module.T is distill.T,
data.seed is seed): it shows once, under the first.

Writes into the multirun dir:
- results.csv: one row per job (its number and dir, status, method, group, T, alpha, the other settings that
  differ between jobs, seed, best epoch, val/test accuracy and loss, teacher agreement, wall time, its model
  card, its error); a setting is empty where it does not act (T outside the soft and hard_soft groups, a
  method's own `distill.<method>.*` keys for the other methods);
- results.md: one row per setting: jobs identical in every setting but the seed, mean ± std over their seeds; the
  best (by validation accuracy) marked; jobs failed, unfinished or with a damaged record listed; links to the
  model cards;
- heatmap.png: mean test accuracy over T × alpha of the hard_soft students, one panel per value of any other
  setting that differs between them (refused, in one line, past MAX_HEATMAP_PANELS panels);
- curves.png: train loss and val loss per epoch, one line per setting (mean over its seeds), from each job's
  TensorBoard logs, or its CSV logs (Lightning's CSVLogger) when it has no TensorBoard dir.
Test metrics are those of the checkpoint chosen by validation loss, never of the best test epoch.
"""

import csv
import io
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure  # figures without pyplot: no backend or global state, in scripts and notebooks
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from kd_lightning.checkpoints import atomic_write_text
from kd_lightning.config import is_distillation
from kd_lightning.sweeps import DamagedRecord, job_dirs, job_number, read_record

log = logging.getLogger(__name__)
logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader logs every file it opens

HEADLINE = {"distill.method": "method", "distill.group": "group", "distill.T": "T", "distill.alpha": "alpha"}
RESULTS = ["seed", "best_epoch", "epochs", "val_acc", "val_loss", "test_acc", "test_loss", "test_agreement",
           "teacher_acc", "wall_seconds", "card", "error"]
KD_GROUP_METHODS = ("kd", "multi_teacher")  # the methods that distill.group, T and alpha act on
# Keys (and their sub-keys) that never change a job's result: where it reads and writes, what it prints, how it
# was started. Dir names leave them out too (conf/hydra/default.yaml: override_dirname.exclude_keys).
NOT_SETTINGS = ("paths", "logger", "task_name", "ckpt_path", "resume", "data.download", "trainer.enable_progress_bar",
                "trainer.enable_model_summary", "callbacks.progress_bar", "extras")
MAX_HEATMAP_PANELS = 12
_MISSING = "<missing>"


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _is_student(config: dict[str, Any]) -> bool:
    try:
        return is_distillation(config)
    except (KeyError, TypeError, ImportError, AttributeError, ValueError):  # no module, or a class gone since
        return False


def job_settings(job: Path) -> dict[str, Any]:
    """The resolved config that produced the job's record: its metrics.json (done), failed.json (failed) or
    job.json (started), never `.hydra/config.yaml`, which Hydra rewrites when another sweep command reuses the
    dir. Sweeps recorded before records held the config fall back to it; a damaged record is skipped."""
    for name in ("metrics.json", "failed.json", "job.json"):
        try:
            record = read_record(job / name)
        except DamagedRecord:
            continue
        if record is not None and isinstance(record.get("config"), dict):
            return record["config"]
    saved = job / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            config = yaml.safe_load(saved.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            config = None
        if isinstance(config, dict):
            return config
    return {}


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The job's settings as dotted keys: its config without what never changes a result (NOT_SETTINGS, values
    naming the job's own dir) and without the DistillModule's copy of the method's section."""
    output_dir = str((config.get("paths") or {}).get("output_dir") or "")
    module, distill = config.get("module") or {}, config.get("distill") or {}
    if isinstance(module, dict) and module.get("method_hparams") is not None and \
            module.get("method_hparams") == distill.get(distill.get("method")):
        config = {**config, "module": {k: v for k, v in module.items() if k != "method_hparams"}}
    return {key: value for key, value in _flat(config).items()
            if not any(key == k or key.startswith(f"{k}.") for k in NOT_SETTINGS)
            and not (output_dir and isinstance(value, str) and output_dir in value)}


def acting_keys(settings: dict[str, Any], student: bool) -> set[str]:
    """The settings that act on the job's training: a teacher run ignores distill.* and teacher.*; a student
    reads only its method's own section distill.<method>.*, and distill.group, T and alpha only for kd and
    multi_teacher (T in the soft and hard_soft groups, alpha in hard_soft)."""
    method, group = settings.get("distill.method", "kd"), settings.get("distill.group")
    acting = set()
    for key in settings:
        parts = key.split(".")
        if parts[0] not in ("distill", "teacher"):
            acting.add(key)
        elif not student:
            continue
        elif parts[0] == "teacher":
            acting.add(key)
        elif len(parts) > 2:  # a method's own section
            if parts[1] == method:
                acting.add(key)
        elif parts[1] in ("group", "T", "alpha"):
            if method in KD_GROUP_METHODS and (parts[1] == "group" or (parts[1] == "T" and group in ("soft", "hard_soft"))
                                               or (parts[1] == "alpha" and group == "hard_soft")):
                acting.add(key)
        else:
            acting.add(key)
    return acting


def _read_job(job: Path) -> dict[str, Any]:
    config = job_settings(job)
    student = _is_student(config)
    settings = settings_of(config)
    acting = acting_keys(settings, student)
    method = settings.get("distill.method", "kd") if student else None
    row: dict[str, Any] = {
        "job": job_number(job), "dir": job.name, "method": method,
        "group": (settings.get("distill.group") if "distill.group" in acting else None) if student else "teacher",
        "T": settings.get("distill.T") if "distill.T" in acting else None,
        "alpha": settings.get("distill.alpha") if "distill.alpha" in acting else None,
        "seed": config.get("seed"),
        "card": f"{job.name}/MODEL_CARD.md" if (job / "MODEL_CARD.md").is_file() else None,
        "settings": settings, "acting": acting, "student": student,
    }
    try:
        metrics = read_record(job / "metrics.json")
    except DamagedRecord as err:
        log.warning("%s: job %s is left out of the report (running the sweep command again trains it again)",
                    err, job.name)
        row.update(status="damaged", error=f"{err.path.name} is damaged: run the sweep command again to train it again")
        return row
    if metrics is not None:
        row.update(status="done", best_epoch=metrics.get("best_epoch"), epochs=metrics.get("epochs"),
                   val_acc=metrics.get("val/acc"), val_loss=metrics.get("val/loss"), test_acc=metrics.get("test/acc"),
                   test_loss=metrics.get("test/loss"), test_agreement=metrics.get("test/agreement"),
                   teacher_acc=metrics.get("test/teacher_acc"), wall_seconds=metrics.get("wall_seconds"))
        return row
    try:
        failure = read_record(job / "failed.json")
    except DamagedRecord as err:
        failure = {"error": f"{err.path.name} is damaged"}
    if failure is not None:
        row.update(status="failed", error=failure.get("error"))
    else:
        row.update(status="unfinished")
    return row


def _drop_repeats(rows: list[dict[str, Any]]) -> None:
    """A setting equal to another one in every job (module.T = distill.T, data.seed = seed) is kept once: under
    seed or a headline key, else under the key met first."""
    order: dict[str, int] = {}
    for row in rows:
        for key in row["settings"]:
            order.setdefault(key, len(order))
    by_signature: dict[tuple, list[str]] = defaultdict(list)
    for key in order:
        signature = tuple(canonical(r["settings"][key]) if key in r["settings"] else _MISSING for r in rows)
        if len(set(signature)) > 1:
            by_signature[signature].append(key)
    first = ["seed", *HEADLINE]
    for keys in by_signature.values():
        keys.sort(key=lambda k: (first.index(k) if k in first else len(first), order[k]))
        for row in rows:
            for repeat in keys[1:]:
                row["settings"].pop(repeat, None)
                row["acting"].discard(repeat)


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of the multirun in `sweep_dir`, in job order, labelled by the settings recorded with its
    result (row["settings"]: dotted keys; row["acting"]: those that act on its training)."""
    rows = [_read_job(job) for job in job_dirs(Path(sweep_dir))]
    _drop_repeats(rows)
    return rows


def setting_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The settings, besides the headline ones (method, group, T, alpha) and seed, in which jobs differ (in value,
    or some jobs have them and others not: `+trainer.gradient_clip_val=1`), in config order. Not a column: a
    difference that follows from another column, i.e. the keys of a node whose class (`_target_`) differs, unless
    they differ between jobs of one class (`model=mlp_784_16_10,mnist_conv_student` adds `model._target_`, not
    `model.hidden`), and distill.* / teacher.*, which teacher runs do not have (group says "teacher")."""
    recorded = [row for row in rows if row["settings"]]  # a job with no readable config says nothing here
    keys: dict[str, None] = {}
    for row in recorded:
        keys.update(dict.fromkeys(row["settings"]))

    def values(key: str, among: list[dict[str, Any]]) -> set[str]:
        return {canonical(r["settings"][key]) if key in r["settings"] else _MISSING for r in among}

    classes = {k for k in keys if k.endswith("._target_") and len(values(k, recorded)) > 1}

    def is_column(key: str) -> bool:
        parts = key.split(".")
        owners = [o for i in range(len(parts) - 1, 0, -1) if (o := ".".join(parts[:i]) + "._target_") in classes and o != key]
        if owners:
            by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in recorded:
                by_class[canonical(r["settings"].get(owners[0]))].append(r)
            return any(len(values(key, same)) > 1 for same in by_class.values())
        found = values(key, recorded)
        return len(found) > 1 and not (parts[0] in ("distill", "teacher") and _MISSING in found and len(found) == 2)

    return [k for k in keys if k not in HEADLINE and k != "seed" and is_column(k)]


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    return ["job", "dir", "status", *HEADLINE.values(), *setting_columns(rows), *RESULTS]


def csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of results.csv: each setting column holds the job's value where it acts, else nothing."""
    columns = csv_columns(rows)
    out = []
    for row in rows:
        line = {c: row.get(c) for c in columns}
        for key in setting_columns(rows):
            value = row["settings"].get(key) if key in row["acting"] else None
            line[key] = json.dumps(value) if isinstance(value, list | dict) else value
        out.append(line)
    return out


def setting_key(row: dict[str, Any]) -> str:
    """What a job computes, all but its seed: jobs with the same key are runs of one setting."""
    return canonical({k: v for k, v in row["settings"].items() if k != "seed"})


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting (the done jobs identical in every setting but the seed): mean and std over its
    seeds; best validation accuracy first."""
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "done":
            by_setting[setting_key(row)].append(row)
    summary = []
    for runs in by_setting.values():
        entry: dict[str, Any] = {"row": runs[0], "n": len(runs), "jobs": [r["job"] for r in runs],
                                 "seeds": [r["seed"] for r in runs]}
        for metric in ("val_acc", "test_acc", "test_loss", "test_agreement"):
            values = [r[metric] for r in runs if r[metric] is not None]
            entry[metric] = mean_std(values) if values else None
        summary.append(entry)
    return sorted(summary, key=lambda e: -e["val_acc"][0] if e["val_acc"] else math.inf)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


class Cells:
    """How the report writes a job's settings: the value where it acts; where it does not act, "-", or the value
    in parentheses when the jobs where it does not act differ in it (so that no two rows read the same)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.columns = [*HEADLINE, *setting_columns(rows)]
        idle: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            for key, value in row["settings"].items():
                if key not in row["acting"]:
                    idle[key].add(canonical(value))
        self.idle_differs = {k for k, v in idle.items() if len(v) > 1}

    def cell(self, row: dict[str, Any], key: str) -> str:
        if key == "distill.group" and not row["student"]:
            return "teacher"
        if key == "distill.method" and not row["student"]:
            return "-"
        if key not in row["settings"]:
            return "-"
        value = fmt_value(row["settings"][key])
        if key in row["acting"]:
            return value
        return f"({value})" if key in self.idle_differs else "-"

    @staticmethod
    def header(key: str) -> str:
        return HEADLINE.get(key, key)

    def label(self, row: dict[str, Any], among: list[dict[str, Any]]) -> str:
        """A setting's name in a legend or a panel title: the columns that differ among `among`."""
        varying = [k for k in self.columns if len({self.cell(r, k) for r in among}) > 1]
        parts = [f"{self.header(k)}={self.cell(row, k)}" for k in varying if self.cell(row, k) != "-"]
        return ", ".join(parts) or (row["group"] if row["method"] in ("kd", None) else row["method"]) or "all"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    summary, cells = summarize(rows), Cells(rows)
    head = [cells.header(k) for k in cells.columns]
    lines = ["| " + " | ".join([*head, "runs", "val acc", "test acc", "test loss", "agreement with teacher"]) + " |",
             "|" + "---|" * len(head) + "---:|---:|---:|---:|---:|"]
    for i, e in enumerate(summary):

        def fmt(value: tuple[float, float] | None, n: int = e["n"]) -> str:
            if value is None:
                return "-"
            return f"{value[0]:.4f}" if n == 1 else f"{value[0]:.4f} ± {value[1]:.4f}"

        settings = [cells.cell(e["row"], k) for k in cells.columns]
        settings[0] += " **(best)**" if i == 0 else ""
        lines.append("| " + " | ".join([*settings, str(e["n"]), fmt(e["val_acc"]), fmt(e["test_acc"]),
                                         fmt(e["test_loss"]), fmt(e["test_agreement"])]) + " |")
    not_done = [r for r in rows if r["status"] != "done"]
    lines.append("")
    lines.append(f"One row per setting: the runs of a row differ only in their seed, mean ± std over the seeds (a single "
                 f"run: its value). Best = highest mean validation accuracy. Test metrics at the checkpoint chosen "
                 f"by validation loss. {len(rows) - len(not_done)} of {len(rows)} jobs done.")
    if any("(" in c for e in summary for c in (cells.cell(e["row"], k) for k in cells.columns)):
        lines.append("A value in parentheses is recorded but does not act on that row's training loss.")
    for r in not_done:
        lines.append(f"- job {r['job']} {r['status']}: {r.get('error') or 'no result yet'} ({r['dir']})")
    if cards := [f"[job {r['job']}](./{quote(r['card'], safe='/:+@')})" for r in rows if r.get("card")]:
        lines.append("")
        lines.append("Model cards (teacher vs student): " + " · ".join(cards))
    return "\n".join(lines) + "\n"


def heatmap_panels(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[tuple, list[float]]] | None, str | None]:
    """The cells of the T × alpha heatmap: per panel (one per value of the other settings in which the hard_soft
    students differ), the test accuracies at each (T, alpha). With no panel: the one-line reason ({} when there
    is nothing to draw, None when it is refused)."""
    students = [r for r in rows if r["status"] == "done" and r["group"] == "hard_soft" and r["test_acc"] is not None]
    if not students:
        return {}, "no heatmap: no finished hard_soft students in this sweep"
    cells = Cells(students)
    others = [k for k in cells.columns if k not in ("distill.T", "distill.alpha")
              and len({cells.cell(r, k) for r in students}) > 1]
    titles = {", ".join(f"{cells.header(k)}={cells.cell(r, k)}" for k in others) for r in students}
    if len(titles) > MAX_HEATMAP_PANELS:
        return None, (f"no heatmap: the hard_soft students differ in {', '.join(others)} besides T, alpha and seed: "
                    f"{len(titles)} panels, more than {MAX_HEATMAP_PANELS} (plot_heatmap on a subset of rows draws one)")
    panels: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in students:
        title = ", ".join(f"{cells.header(k)}={cells.cell(r, k)}" for k in others)
        panels[title][(r["T"], r["alpha"])].append(r["test_acc"])
    return {t: dict(panels[t]) for t in sorted(panels)}, None


def plot_heatmap(rows: list[dict[str, Any]], path: Path | None = None) -> Figure | None:
    """Mean test accuracy over seeds of the hard_soft students over T × alpha, one panel per value of the other
    settings they differ in; None (the reason logged in one line) when there is nothing, or too much, to draw."""
    panels, reason = heatmap_panels(rows)
    if reason:
        log.log(logging.WARNING if panels is None else logging.INFO, "%s", reason)
        return None
    temps = sorted({t for cells in panels.values() for t, _ in cells})
    alphas = sorted({a for cells in panels.values() for _, a in cells})
    grids = {title: [[statistics.fmean(cells[(t, a)]) if (t, a) in cells else math.nan for a in alphas] for t in temps]
             for title, cells in panels.items()}
    values = [v for grid in grids.values() for line in grid for v in line if not math.isnan(v)]
    vmin, vmax = min(values), max(values)
    ncols = min(3, len(grids))
    nrows = math.ceil(len(grids) / ncols)
    fig = Figure(figsize=(ncols * (1.2 * len(alphas) + 2.5), nrows * (0.8 * len(temps) + 1.8)))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(grids):]:
        ax.set_axis_off()
    middle = (vmin + vmax) / 2
    for ax, (title, grid) in zip(axes, grids.items()):
        image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_yticks(range(len(temps)), [str(t) for t in temps])
        ax.set_xlabel("alpha (weight of the soft loss)")
        ax.set_ylabel("temperature T")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                            color="black" if value > middle else "white")
        fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)")
        ax.set_title(title or "Test accuracy over T × alpha", fontsize=9 if title else None)
    if len(grids) > 1:
        fig.suptitle("Test accuracy over T × alpha")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def _tensorboard_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "epoch" not in tags:
        return {}
    epoch_at_step = {e.step: int(e.value) for e in events.Scalars("epoch")}
    return {
        tag: [(epoch_at_step.get(e.step, i), e.value) for i, e in enumerate(events.Scalars(tag))]
        for tag in ("train/loss", "val/loss") if tag in tags
    }


def _csv_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    with open(metrics_csv, newline="") as f:
        lines = list(csv.DictReader(f))
    return {tag: [(int(float(line["epoch"])), float(line[tag])) for line in lines
                  if line.get(tag) not in (None, "") and line.get("epoch") not in (None, "")]
            for tag in ("train/loss", "val/loss") if lines and tag in lines[0]}


def epoch_curves(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch train/loss and val/loss of one job as (epoch, value): from its TensorBoard events, else from
    the metrics.csv of Lightning's CSVLogger; {} when the job logged neither (another logger)."""
    runs = sorted({p.parent for p in (job / "tensorboard").rglob("events.out.tfevents.*")}) \
        if (job / "tensorboard").is_dir() else []
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for run in runs:
        for tag, points in _tensorboard_curves(run).items():
            curves[tag] += points
    if not curves:
        for metrics_csv in sorted(job.rglob("metrics.csv")):
            for tag, points in _csv_curves(metrics_csv).items():
                curves[tag] += points
    return dict(curves)


def plot_curves(sweep_dir: str | Path, rows: list[dict[str, Any]], path: Path | None = None) -> Figure | None:
    """Train loss and val loss per epoch, one line per setting (mean over its seeds); None when no finished job
    logged any."""
    done = [r for r in rows if r["status"] == "done"]
    cells = Cells(done)
    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in done:
        name = cells.label(r, done)
        for tag, points in epoch_curves(Path(sweep_dir) / r["dir"]).items():
            for epoch, value in points:
                curves[tag][name][epoch].append(value)
    if not curves:
        log.info("no curves: no finished job has TensorBoard or CSV logs")
        return None
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, tag, title in zip(axes, ("train/loss", "val/loss"), ("train loss (each setting's objective)",
                                                                "val loss (cross-entropy on labels)")):
        for name, by_epoch in sorted(curves[tag].items()):
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        if curves[tag]:
            ax.legend(fontsize="small" if len(curves[tag]) > 6 else None)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def write_report(sweep_dir: str | Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = load_results(sweep_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=csv_columns(rows))
    writer.writeheader()
    writer.writerows(csv_rows(rows))
    atomic_write_text(sweep_dir / "results.csv", table.getvalue())
    atomic_write_text(sweep_dir / "results.md", markdown_table(rows))
    written = ["results.csv", "results.md"]
    for name, draw in (("heatmap.png", lambda p: plot_heatmap(rows, p)), ("curves.png", lambda p: plot_curves(sweep_dir, rows, p))):
        if draw(sweep_dir / name) is not None:
            written.append(name)
        else:
            (sweep_dir / name).unlink(missing_ok=True)  # not one of an earlier report of other jobs
    log.info("Sweep report written to %s (%s)", sweep_dir, ", ".join(written))
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
