"""What distillation bought: `python -m kd_lightning.card student_run=<run dir>` writes MODEL_CARD.md and card.png
into a distillation run's dir, teacher and student side by side (conf/card.yaml, docs/export.md).

Both nets are rebuilt from their checkpoints (the student's best.ckpt; the teacher named by the run's metrics.json,
as tracin.py finds it) and run on the whole test split of the run's data. The card holds parameters, mult-adds per
example, checkpoint and ONNX file sizes, CPU latency at batch 1 and 256 (torch.utils.benchmark: median and IQR,
threads stated) and the student's speed-up, test accuracy, NLL, expected calibration error, top-1 agreement,
per-class accuracy, the data source and the command that produced each model. card.png: reliability diagrams,
confusion matrices, accuracy against latency, per-class accuracy (drawn with Pillow: kd_lightning/drawing.py).

Every distillation run writes the cheap part of the card (`write_card(run_dir, ..., timing=False)`: no latency, no
ONNX export) when it ends, so each job dir of a sweep holds one. It is cheap: a caller that holds the run's test-split
DataModule or the nets' test logits passes them (`run_outputs(trainer)` gathers a training run's), and the teacher's
test logits otherwise come from the verified teacher-logit cache (kd_lightning/teacher.py) when it has this teacher
and data; only what is missing is computed.
"""

import hashlib
import io
import json
import logging
import math
import platform
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from kd_lightning import config
from kd_lightning.checkpoints import atomic_write, load_net
from kd_lightning.drawing import (
    BLACK,
    GREY,
    RED,
    STUDENT_COLOUR,
    TEACHER_COLOUR,
    WHITE,
    Chart,
    font,
    superscript,
    tick_classes,
    tinted,
    vertical_text,
)
from kd_lightning.errors import InputError, exit_on_error
from kd_lightning.models.stats import mult_adds
from kd_lightning.run_dir import resolve_recorded, teacher_ckpts_of
from kd_lightning.teacher import _logit_cache_problem, file_sha256
from kd_lightning.tensorboard_figures import confusion_image

log = logging.getLogger(__name__)

ECE_BINS = 15
LATENCY_BATCHES = (1, 256)
MIN_BLOCKS = 5  # latency measurements (each a block of calls) behind a median and an IQR


# ---- what each net does on the test split -----------------------------------------------------------------
@torch.inference_mode()
def test_logits(net: nn.Module, datamodule: Any, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Logits, labels and inputs of the whole test split, in dataset order, on the CPU (the net runs on `device`)."""
    net.eval().to(device)
    xs, ys, outs = [], [], []
    for x, y, _ in datamodule.eval_loader("test"):
        xs.append(x.cpu())
        ys.append(y.cpu())
        outs.append(net(x.to(device)).float().cpu())
    net.cpu()
    return torch.cat(outs), torch.cat(ys), torch.cat(xs)


def cached_test_logits(teacher_ckpt: Path, teacher: nn.Module, datamodule: Any, cache_dir: Path,
                       device: torch.device | str = "cpu") -> Tensor | None:
    """The teacher's test logits from the teacher-logit cache (teacher.py `cached_teacher_logits`) when it holds an
    entry for this checkpoint and data that passes every check that function makes (checkpoint sha256, data
    identity, shapes, dtypes, checksums, the teacher reproducing the first validation batch); else None. Nothing is
    computed into the cache or written here. The entry's path is the one `cached_teacher_logits` names it by."""
    data_identity = json.loads(json.dumps(datamodule.cache_identity()))  # as stored: lists, not tuples
    data_key = hashlib.sha256(json.dumps(data_identity, sort_keys=True).encode()).hexdigest()
    teacher_sha = file_sha256(teacher_ckpt)
    path = Path(cache_dir) / "logits" / f"{teacher_sha[:16]}-{data_key[:16]}.pt"
    if not path.is_file():
        return None
    splits = ["val", "test"] if datamodule.random_augmentation else ["train", "val", "test"]  # as it stores them
    try:  # written atomically (renamed into place): readable without its lock
        cached = torch.load(path, map_location="cpu", weights_only=True)
        problem = _logit_cache_problem(cached, teacher_sha, data_identity, splits, teacher, datamodule, str(device))
    except Exception as err:  # noqa: BLE001 - truncated or not a torch file: computed instead
        problem = f"is unreadable ({type(err).__name__})"
    if problem is not None:
        log.warning("Teacher-logit cache %s %s: the card runs the teacher on the test split", path, problem)
        return None
    log.info("Card: the teacher's test logits from the verified cache %s", path)
    return cached["logits"]["test"]


def calibration_error(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by
    the bin's share of examples (torchmetrics, l1 norm)."""
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probs, labels))


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin (as the ECE bins them): mean confidence, accuracy and number of examples."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    bins = torch.clamp((confidence * n_bins).long(), max=n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).float()
    mean = lambda v: (torch.bincount(bins, v, minlength=n_bins) / count.clamp(min=1)).tolist()  # noqa: E731
    return {"confidence": mean(confidence), "accuracy": mean(correct), "count": count.tolist()}


def quality(logits: Tensor, labels: Tensor) -> dict[str, Any]:
    num_classes = logits.shape[1]
    probs = logits.softmax(1)
    return {
        "acc": float(MulticlassAccuracy(num_classes, average="micro")(logits, labels)),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": calibration_error(probs, labels),
        "per_class_acc": MulticlassAccuracy(num_classes, average=None)(logits, labels).tolist(),
        "class_counts": torch.bincount(labels, minlength=num_classes).tolist(),
        "confusion": MulticlassConfusionMatrix(num_classes)(logits, labels).tolist(),
        "reliability": reliability_bins(probs, labels),
    }


def _benchmark() -> Any:
    """torch.utils.benchmark, imported on first use and without its import-time note: it imports
    torch.utils.cpp_extension, which logs "No CUDA runtime is found, using CUDA_HOME=..." on a machine with a CUDA
    toolkit dir but no GPU. That note is about compiling C++ extensions, which nothing here does."""
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_extension_log.setLevel(level)
    return benchmark


def latency(net: nn.Module, example: Tensor, batch_size: int, threads: int, min_run_time: float) -> dict[str, float]:
    """Milliseconds per forward pass at `batch_size` on the CPU: median and interquartile range of torch.utils.benchmark's
    blocked measurements (each block averages its calls), over at least MIN_BLOCKS blocks."""
    x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    timer = _benchmark().Timer(stmt="forward(x)", globals={"forward": torch.inference_mode()(net.eval()), "x": x},
                            num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < MIN_BLOCKS:  # a slow net fills min_run_time with too few blocks for a spread
        times += timer.timeit(m.number_per_run).times
    q1, median, q3 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median_ms": float(median) * 1e3, "iqr_ms": float(q3 - q1) * 1e3, "blocks": len(times),
            "calls_per_block": m.number_per_run}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform reports: latencies mean little without it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def onnx_size(net: nn.Module, inputs: Tensor) -> int:
    """Bytes of the net's ONNX file, written (and verified, see export.py) into a temporary dir."""
    from kd_lightning.export import export_net

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        export_net(net, inputs, path, "onnx")
        return path.stat().st_size


# ---- the two runs -----------------------------------------------------------------------------------------
def run_config(run_dir: Path) -> DictConfig:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise InputError(f"{run_dir} has no .hydra/config.yaml: pass a train.py run dir (logs/train/runs/<time>)")
    return config.saved_run_config(run_dir)


def recorded_overrides(run_dir: Path | None) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    return list(OmegaConf.load(path)) if path and path.is_file() else None


def commands(run_dir: Path, cfg: DictConfig, teacher_run: Path | None) -> dict[str, str]:
    """The command that produced each model: the run's recorded overrides; for a teacher trained and cached by the
    student's run (its run dir records a config, not a command line), the equivalent command of that recipe."""
    student = recorded_overrides(run_dir)
    result = {"student": "python train.py " + shlex.join(student) if student is not None
              else "not recorded (the run was not started from the command line)"}
    teacher = recorded_overrides(teacher_run)
    if teacher is not None:
        result["teacher"] = "python train.py " + shlex.join(teacher)
    elif cfg.teacher.get("ckpt_path"):
        result["teacher"] = f"given as teacher.ckpt_path={cfg.teacher.ckpt_path} (no run record found)"
    else:  # compose_teacher_config: the teacher experiment on the student's data, paths and trainer
        inherited = [o for o in student or [] if o.startswith(("data=", "data.", "paths.", "trainer="))]
        result["teacher"] = ("python train.py " + shlex.join([f"experiment={cfg.teacher.experiment}",
                                                             *cfg.teacher.overrides, *inherited])
                             + "  (trained and cached by the student's run; the equivalent command)")
    return result


def find_teacher(run_dir: Path, metrics: dict[str, Any]) -> tuple[Path, Path | None]:
    """The teacher checkpoint named by the student's metrics.json (checked against its recorded sha256) and its run
    dir (None if not found)."""
    from kd_lightning.influence.cli import teacher_run_of  # as tracin.py finds it

    teachers = teacher_ckpts_of(run_dir, metrics)
    if not teachers:
        raise InputError(f"student_run={run_dir} names no teacher (no teacher_ckpt in its metrics.json): "
                         "pass a distillation run dir")
    if len(teachers) > 1:
        raise InputError(f"student_run={run_dir} was distilled from {len(teachers)} teachers (multi_teacher): "
                         "multi-teacher cards are not supported; the card compares one teacher with its student")
    try:
        return teachers[0], teacher_run_of(run_dir)
    except InputError:
        return teachers[0], None


def teacher_net_config(cfg: DictConfig) -> Any:
    """The teacher's net config, for a `teacher.ckpt_path` that is a plain weights file (no net_config inside)."""
    from kd_lightning.teacher import compose_teacher_config

    return compose_teacher_config(cfg).model


# ---- the card ---------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One model's column of the card."""

    net_name: str
    ckpt: Path
    params: int
    mult_adds: int
    ckpt_bytes: int
    quality: dict[str, Any]
    onnx_bytes: int | None = None
    latency: dict[int, dict[str, float]] = field(default_factory=dict)


def write_card(run_dir: str | Path, cfg: DictConfig | None = None, *, timing: bool = False,
               threads: int | None = None, min_run_time: float = 1.0, device: torch.device | str = "cpu",
               datamodule: Any = None, teacher_logits: Tensor | None = None, student_logits: Tensor | None = None,
               labels: Tensor | None = None) -> dict[str, Any]:
    """Write MODEL_CARD.md and card.png into the distillation run `run_dir`; return the card's numbers.

    `cfg` defaults to the run's saved config. The test split runs on `device` (a training run's: a CIFAR teacher
    is slow on a CPU). `timing` adds the ONNX sizes and the CPU latencies (`threads`: default torch's).

    What the caller already holds, so that nothing is loaded or run twice (each optional; what is missing is
    computed as `python -m kd_lightning.card` does):
    - `datamodule`: the run's data, set up, whose `eval_loader("test")` yields the whole test split (not one DDP
      rank's shard); default: `cfg.data` instantiated afresh;
    - `teacher_logits`, `student_logits`: float32 logits [n_test, classes] of the whole test split in dataset order,
      of the teacher checkpoint named by metrics.json and the student's best.ckpt, in eval mode. Without
      `teacher_logits` they come from the verified teacher-logit cache when it holds them (`cached_test_logits`),
      else the teacher runs; without `student_logits` the student runs (it is small);
    - `labels`: the test split's labels [n_test] in dataset order (default: read with the logits, or from the data).
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else run_config(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"student_run={run_dir} has no metrics.json: pass the dir of a finished train.py run")
    metrics = json.loads(metrics_path.read_text())
    teacher_ckpt, teacher_run = find_teacher(run_dir, metrics)
    student_ckpt = resolve_recorded(run_dir, metrics["best_ckpt"], metrics.get("output_dir"))  # this dir's own
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("test")
    threads = threads or torch.get_num_threads()
    ckpts = {"teacher": teacher_ckpt, "student": student_ckpt}
    nets = {role: load_net(ckpt, teacher_net_config(cfg) if role == "teacher" and ckpt.suffix != ".ckpt" else None).eval()
            for role, ckpt in ckpts.items()}
    logits: dict[str, Tensor | None] = {"teacher": teacher_logits, "student": student_logits}
    if logits["teacher"] is None and cfg.get("paths", {}).get("cache_dir"):
        logits["teacher"] = cached_test_logits(teacher_ckpt, nets["teacher"], datamodule, Path(cfg.paths.cache_dir),
                                               device)
    inputs = None
    for role in ("teacher", "student"):
        if logits[role] is None:
            logits[role], labels, inputs = test_logits(nets[role], datamodule, device)
    n_test = datamodule.split_size("test")
    if labels is None:
        labels = datamodule.raw_images("test", range(n_test))[1]
    labels = labels.cpu()
    for role, values in logits.items():
        if values.ndim != 2 or len(values) != n_test or len(labels) != n_test:
            raise ValueError(f"write_card: {role} logits {tuple(values.shape)} and labels {tuple(labels.shape)} "
                             f"are not the whole test split ({n_test} examples)")
        logits[role] = values.detach().float().cpu()
    if timing and inputs is None:
        inputs = torch.cat([x.cpu() for x, _, _ in datamodule.eval_loader("test")])

    sides: dict[str, Side] = {}
    for role, net in nets.items():
        ckpt = ckpts[role]
        side = Side(type(net).__name__, ckpt, sum(p.numel() for p in net.parameters()),
                    mult_adds(net, tuple(datamodule.input_shape)), ckpt.stat().st_size, quality(logits[role], labels))
        if timing:
            side.onnx_bytes = onnx_size(net, inputs)
            side.latency = {b: latency(net, inputs, b, threads, min_run_time) for b in LATENCY_BATCHES}
        sides[role] = side
    agreement = float((logits["student"].argmax(1) == logits["teacher"].argmax(1)).float().mean())

    card = {
        "run_dir": str(run_dir), "data_source": datamodule.source, "n_test": len(labels), "agreement": agreement,
        "class_names": list(getattr(datamodule, "class_names", None) or []) or None,  # image_folder: by name
        "threads": threads if timing else None, "cpu": cpu_name() if timing else None,
        "commands": commands(run_dir, cfg, teacher_run),
        **{role: {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()} for role, s in sides.items()},
    }
    atomic_write(run_dir / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(markdown(card)))
    atomic_write(run_dir / "card.png", lambda tmp: Path(tmp).write_bytes(plot_png(card)))
    return card


def run_outputs(trainer: Any) -> dict[str, Any]:
    """What a finished training run holds for `write_card`, as its keyword arguments: the DataModule and, when
    the module looked the teacher's test logits up in the verified cache (`distill.cache_teacher_logits`), those.
    Nothing when the run was split over processes (the DataModule then yields one rank's shard)."""
    if trainer.world_size != 1 or trainer.datamodule is None:
        return {}
    found: dict[str, Any] = {"datamodule": trainer.datamodule}
    module = trainer.lightning_module
    cached = getattr(module, "cached_teacher_logits_test", None) if "test" in getattr(module, "cached_splits", ()) \
        else None
    if isinstance(cached, Tensor) and cached.dtype == torch.float32:  # not cast by a bf16-true/16-true precision
        found["teacher_logits"] = cached
    return found


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"


def markdown(card: dict[str, Any]) -> str:
    t, s = card["teacher"], card["student"]
    tq, sq = t["quality"], s["quality"]
    names = card.get("class_names")
    not_timed = "not measured (`python -m kd_lightning.card student_run=<this dir>`)"

    def lat(side: dict, b: int) -> str:
        m = side["latency"].get(b)
        return f"{m['median_ms']:.3f} ms (IQR {m['iqr_ms']:.3f})" if m else "-"

    rows = [
        ("net", t["net_name"], s["net_name"], ""),
        ("parameters", f"{t['params']:,}", f"{s['params']:,}", f"{s['params'] / t['params']:.3f}×"),
        ("mult-adds per example", _count(t["mult_adds"]), _count(s["mult_adds"]),
         f"{s['mult_adds'] / t['mult_adds']:.3f}×"),
        ("checkpoint file", _size(t["ckpt_bytes"]), _size(s["ckpt_bytes"]), f"{s['ckpt_bytes'] / t['ckpt_bytes']:.3f}×"),
    ]
    if card["threads"]:
        rows.append(("ONNX file", _size(t["onnx_bytes"]), _size(s["onnx_bytes"]),
                     f"{s['onnx_bytes'] / t['onnx_bytes']:.3f}×"))
        for b in LATENCY_BATCHES:
            speedup = t["latency"][b]["median_ms"] / s["latency"][b]["median_ms"]
            rows.append((f"CPU latency, batch {b} ({_threads(card['threads'])}), median", lat(t, b), lat(s, b),
                         f"speed-up {speedup:.1f}×"))
    else:
        rows.append(("ONNX file, CPU latency", not_timed, not_timed, ""))
    rows += [
        ("test accuracy", f"{tq['acc']:.4f}", f"{sq['acc']:.4f}", f"{sq['acc'] - tq['acc']:+.4f}"),
        ("test NLL (cross-entropy)", f"{tq['nll']:.4f}", f"{sq['nll']:.4f}", f"{sq['nll'] - tq['nll']:+.4f}"),
        (f"expected calibration error ({ECE_BINS} bins, l1)", f"{tq['ece']:.4f}", f"{sq['ece']:.4f}",
         f"{sq['ece'] - tq['ece']:+.4f}"),
        ("top-1 agreement with the teacher", "", f"{card['agreement']:.4f}", ""),
    ]
    lines = [
        f"# Model card: {s['net_name']} distilled from {t['net_name']}",
        "",
        f"Run `{card['run_dir']}`. Test split: {card['n_test']:,} examples of {card['data_source']}."
        + (f" Latency measured on {card['cpu']}, {_threads(card['threads'])}." if card["threads"] else ""),
        "",
        "| | teacher | student | student vs teacher |",
        "|---|---:|---:|---:|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        "## Per-class test accuracy",
        "",
        "| class | examples | teacher | student |",
        "|---:|---:|---:|---:|",
        *[f"| {f'{c} {names[c]}' if names else c} | {n} | {a:.4f} | {b:.4f} |" for c, (n, a, b) in
          enumerate(zip(tq["class_counts"], tq["per_class_acc"], sq["per_class_acc"]))],
        "",
        "## How each model was made",
        "",
        f"- teacher: `{card['commands']['teacher']}`; checkpoint `{t['ckpt']}`",
        f"- student: `{card['commands']['student']}`; checkpoint `{s['ckpt']}`",
        "",
        "## How the numbers are computed",
        "",
        "Both nets are rebuilt from their checkpoints and run in eval mode, in float32, on the whole test split.",
        "Accuracy: top-1. NLL: mean cross-entropy of the labels. ECE: torchmetrics' MulticlassCalibrationError "
        f"({ECE_BINS} equal-width confidence bins, l1): the examples' share in each bin times |accuracy - mean "
        "confidence| there, summed. Agreement: share of test examples where both nets predict the same class. "
        "Mult-adds: torch's FlopCounterMode on one example (convolutions and matrix products; FLOPs / 2). "
        "Checkpoint file: the training checkpoint (weights and, for a trained run, the optimizer state). "
        "ONNX file: the net exported by `python -m kd_lightning.export` and verified. Latency: "
        "torch.utils.benchmark's blocked_autorange on the PyTorch net (inference mode), median and interquartile "
        "range over its measurements; speed-up = teacher median / student median. card.png: reliability "
        "diagrams, confusion matrices, accuracy vs latency, per-class accuracy.",
        "",
    ]
    return "\n".join(lines)


PANEL = (600, 480)  # pixels of each chart panel; card.png is 3 x 2 panels under a title line


def plot(card: dict[str, Any]) -> Image.Image:
    """card.png: for teacher and student, the reliability diagram and the confusion matrix; accuracy against latency
    (mult-adds in the cheap card) and per-class accuracy of both. Drawn with Pillow (kd_lightning/drawing.py): the
    same six matplotlib panels cost ~0.4 s, and every distillation run draws one."""
    confusions = [confusion_image(torch.tensor(card[role]["quality"]["confusion"]),
                                  f"{role} ({card[role]['net_name']}): test confusion (counts; colour: row share)",
                                  card.get("class_names"))
                  for role in ("teacher", "student")]
    column = max(PANEL[0], *(c.shape[1] for c in confusions))
    row = [PANEL[1], max(PANEL[1], *(c.shape[0] for c in confusions))]
    title_height = 44
    image = Image.new("RGB", (3 * column, title_height + sum(row)), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((image.width // 2, 12), f"{card['student']['net_name']} distilled from {card['teacher']['net_name']} · "
              f"{card['data_source']}", fill=BLACK, font=font(17), anchor="ma")

    def chart(col: int, xlim: tuple[float, float], ylim: tuple[float, float], *, log_x: bool = False,
              bottom_row: bool = False) -> Chart:
        left = col * column + (column - PANEL[0]) // 2
        top = title_height + (row[0] + (row[1] - PANEL[1]) // 2 if bottom_row else 0)
        return Chart(image, (left + 78, top + 40, left + PANEL[0] - 22, top + PANEL[1] - 62), xlim, ylim, log_x=log_x)

    unit = [0, 0.25, 0.5, 0.75, 1]
    for col, (role, confusion) in enumerate(zip(("teacher", "student"), confusions)):
        side = card[role]
        q = side["quality"]
        bins = q["reliability"]
        n_bins = len(bins["count"])
        ax = chart(col, (0, 1), (0, 1))
        bar_colour = tinted(TEACHER_COLOUR, 0.7)
        for k, n in enumerate(bins["count"]):
            if n:
                ax.bar((k + 0.5) / n_bins, 1 / n_bins, bins["accuracy"][k], bar_colour, outline=BLACK)
        ax.dashed_line((0, 1e-9), (1, 1), GREY)
        for k, n in enumerate(bins["count"]):
            if n:
                ax.marker(bins["confidence"][k], bins["accuracy"][k], "o", 4, RED)
                vertical_text(image, (round(ax.x((k + 0.5) / n_bins)), round(ax.y(0)) - 18), f"{n:.0f}", 9)
        ax.axes(f"{role} ({side['net_name']}): ECE {q['ece']:.4f}", "confidence (max softmax)", "accuracy", unit, unit)
        ax.legend([("dash", GREY, "perfect calibration"), ("o", RED, "bin: (mean confidence, accuracy)"),
                   ("bar", bar_colour, "accuracy (bin's examples at its foot)")], "upper left",
                  avoid=[(c, a) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n])
        left = col * column + (column - confusion.shape[1]) // 2
        image.paste(Image.fromarray(confusion), (left, title_height + row[0] + (row[1] - confusion.shape[0]) // 2))

    timed = bool(card["threads"])
    cost = {role: card[role]["latency"][LATENCY_BATCHES[0]]["median_ms"] if timed else card[role]["mult_adds"]
            for role in ("teacher", "student")}
    lo, hi = (math.log10(v) for v in sorted(cost.values()))
    margin = 0.3 * (hi - lo) if hi > lo else 0.5  # the two points clear of the frame
    ax = chart(2, (10 ** (lo - margin), 10 ** (hi + margin)), (0, 1.05), log_x=True)
    decades = range(math.ceil(lo - margin), math.floor(hi + margin) + 1)
    for role, shape, colour in (("teacher", "s", TEACHER_COLOUR), ("student", "o", STUDENT_COLOUR)):
        acc = card[role]["quality"]["acc"]
        ax.marker(cost[role], acc, shape, 8, colour)
        draw.text((ax.x(cost[role]) + 13, ax.y(acc)), f"{acc:.3f}", fill=BLACK, font=font(12), anchor="lm")
    ax.axes("accuracy vs " + ("latency" if timed else "cost"),
            f"CPU latency at batch 1, ms ({_threads(card['threads'])})" if timed
            else "mult-adds per example (latency not measured)", "test accuracy",
            [10.0 ** d for d in decades], unit, [f"10{superscript(d)}" for d in decades])
    ax.legend([("s", TEACHER_COLOUR, f"teacher ({card['teacher']['net_name']})"),
               ("o", STUDENT_COLOUR, f"student ({card['student']['net_name']})")], "lower right",
              avoid=[(cost[role], card[role]["quality"]["acc"]) for role in cost])

    n = len(card["teacher"]["quality"]["per_class_acc"])
    ax = chart(2, (-0.6, n - 0.4), (0, 1.22), bottom_row=True)  # room for the key above the bars
    for offset, role, colour in ((-0.2, "teacher", TEACHER_COLOUR), (0.2, "student", STUDENT_COLOUR)):
        for c, acc in enumerate(card[role]["quality"]["per_class_acc"]):
            ax.bar(c + offset, 0.4, acc, colour)
    ax.axes("per-class accuracy", "class", "test accuracy", tick_classes(n), unit)
    ax.legend([("bar", TEACHER_COLOUR, "teacher"), ("bar", STUDENT_COLOUR, "student")], "upper right")
    return image


def plot_png(card: dict[str, Any]) -> bytes:
    """card.png's bytes (zlib level 1: a third of level 6's time for a slightly larger file)."""
    buffer = io.BytesIO()
    plot(card).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="card")
def main(cfg: DictConfig) -> None:
    with exit_on_error(log):
        card = write_card(Path(cfg.student_run), timing=cfg.timing, threads=cfg.threads,
                          min_run_time=cfg.min_run_time)
    print(markdown(card))
    print(f"Written to {Path(cfg.student_run) / 'MODEL_CARD.md'} and card.png")


if __name__ == "__main__":
    main()
