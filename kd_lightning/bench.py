"""Training throughput: `python -m kd_lightning.bench [--student mlp_784_16_10] [--device cpu|cuda] [--data-dir DIR]`.

In one process, on the same training examples, times a fixed number of training samples (after a warm-up) for
  (a) the student with the hard loss,
  (b) KD running the teacher every step,
  (c) KD with cached teacher logits,
all three through this project's real stack (configs, DataModule, DistillModule, Lightning Trainer), and
  (d) a plain hand-written PyTorch loop like the public walk-throughs: torchvision MNIST with per-item
      ToTensor + Normalize, DataLoader batch 64, teacher forward every step.
It prints samples/s for each, the ratios c/a and c/d, and teacher training samples/s for this stack and for the
hand-written loop (the PyTorch MNIST example's Adadelta loop). Full MNIST is used when it is in `data_dir`,
else the offline 5,000-digit sample; the training split is written as IDX files for torchvision's dataset in (d).
`--data image_folder --data-root DIR` times data=image_folder's loader against torchvision's ImageFolder instead
(kd_lightning/data/folder_bench.py). `--only soft,default_live,default_log` times the default run: (e) experiment=soft on the stripped stack, (f) as
`python train.py experiment=soft` runs it with the live bar, (g) with the log-file lines; these three run on
full-size data (the fake full-size MNIST of --full-size when full MNIST is absent; --default-run-on-sample: the
sample), and the output names their data.
Weights do not change speed: the teacher is a freshly initialized MnistCNN saved as a checkpoint.
"""

import argparse
import contextlib
import io
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from kd_lightning import config
from kd_lightning.config import compose_train_config, is_distillation
from kd_lightning.data import folder_bench
from kd_lightning.data.mnist import SAMPLE_SOURCE, load_mnist_sample
from kd_lightning.losses import kd_loss
from kd_lightning.models import MnistCNN
from kd_lightning.train import build, ensure_teacher, prepare_data

BATCH = 64
NAMES = {
    "a": "(a) student, hard loss", "b": "(b) KD, teacher every step", "c": "(c) KD, cached teacher logits",
    "d": "(d) hand-written loop, teacher every step", "teacher": "teacher training, this stack",
    "teacher_ref": "teacher training, hand-written loop",
    "soft": "(e) experiment=soft, stripped stack", "default_live": "(f) experiment=soft as run, live bar",
    "default_log": "(g) experiment=soft as run, log-file lines",
}


class ThroughputMeter(pl.Callback):
    """Samples per second over the training batches after `warmup` batches (epoch ends included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.batches, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.batches == self.warmup:
            self.start = time.perf_counter()
        self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples_per_s = (self.batches - self.warmup) * BATCH / (time.perf_counter() - self.start)


def build_run(cfg: Any) -> Any:
    """A run as train.py builds it: data, the teacher (cached, or trained now), then pure construction."""
    datamodule = prepare_data(cfg)
    return build(cfg, datamodule, [ensure_teacher(cfg, datamodule)] if is_distillation(cfg) else [])


def stack_throughput(experiment: str, steps: int, warmup: int, overrides: list[str]) -> float:
    cfg = compose_train_config([
        f"experiment={experiment}", *overrides, f"+trainer.max_steps={steps + warmup}", "trainer.max_epochs=-1",
        "+trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0", "~callbacks",
        "+trainer.enable_checkpointing=false", "+trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", f"data.batch_size={BATCH}",
    ])
    run = build_run(cfg)
    meter = ThroughputMeter(warmup)
    run.trainer.callbacks.append(meter)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return meter.samples_per_s


def default_run_throughput(epochs: int, overrides: list[str], live_bar: bool) -> float:
    """Training samples/s of `python train.py experiment=soft` as a user runs it: every default callback
    (checkpoints best/last/every 2 epochs, early stopping, LR monitor, timer, progress bar), TensorBoard logging,
    validation every epoch. Whole epochs, validation and checkpoint writes included; `epochs` after one warm-up
    epoch. `live_bar`: the bar a person at a terminal gets (tqdm, output discarded), else the log-file line."""
    cfg = compose_train_config(["experiment=soft", *overrides, f"trainer.max_epochs={epochs + 1}",
                                "callbacks.early_stopping.patience=1000"])  # time all epochs
    with contextlib.redirect_stdout(io.StringIO()) as out:
        if live_bar:
            out.isatty = lambda: True  # type: ignore[method-assign] # the bar a terminal gets, drawn into memory
        run = build_run(cfg)
        meter = EpochMeter()
        run.trainer.callbacks.append(meter)
        run.trainer.fit(run.module, datamodule=run.datamodule)
    return meter.samples_per_s(len(run.datamodule.splits["train"][0]))


class EpochMeter(pl.Callback):
    """Wall time of whole epochs after the first (training, validation, checkpoints, logging, progress bar)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter())  # after the last epoch's validation and checkpoints

    def samples_per_s(self, train_size: int) -> float:
        epochs = len(self.times) - 2
        return epochs * train_size / (self.times[-1] - self.times[1])


def sweep_seconds(launcher: str, overrides: list[str], sweep_dir: Path) -> float:
    """Wall seconds of `python train.py sweep=t_alpha hydra/launcher=<launcher>` (25 students), as a user runs it."""
    command = [sys.executable, str(config.PACKAGE_DIR.parent / "train.py"), "sweep=t_alpha", *overrides,
               f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the {launcher} sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    failed = list(sweep_dir.glob("*/failed.json"))
    if failed or len(list(sweep_dir.glob("*/metrics.json"))) != 25:
        raise SystemExit(f"the {launcher} sweep did not finish its 25 jobs (failed: {failed})")
    where = [line.split("] ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if "Group of" in line]
    print(f"  {launcher} launcher: {seconds:.1f} s wall" + (f" ({'; '.join(where)})" if where else ""), flush=True)
    return seconds


def warm_teacher_logit_cache(overrides: list[str]) -> None:
    """Compute the teacher's logits into the cache before timing: both launchers then find them cached."""
    build_run(compose_train_config(["experiment=hard_soft", *overrides]))  # build() fills the logit cache


def reference_loop(root: Path, steps: int, warmup: int, device: str, teacher_training: bool,
                   student: torch.nn.Module | None = None) -> float:
    """The public walk-throughs' loop: per-item PIL -> tensor transforms, DataLoader, teacher every step."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root, train=True, download=False, transform=transform)
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    teacher = MnistCNN().to(device)
    if teacher_training:
        model, optimizer = teacher.train(), torch.optim.Adadelta(teacher.parameters(), lr=1.0)
    else:
        model = student.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        teacher.eval()
    done, start = 0, 0.0
    while done < steps + warmup:
        for x, y in loader:
            if done == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            x, y = x.to(device), y.to(device)
            if teacher_training:
                loss = F.cross_entropy(model(x), y)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                student_logits = model(x)
                loss = 0.8 * kd_loss(student_logits, teacher_logits, 2.0) + 0.2 * F.cross_entropy(student_logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # as the walk-throughs do, to print the running loss
            done += 1
            if done == steps + warmup:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def write_full_size_mnist(data_dir: Path, n_train: int = 60_000, n_test: int = 10_000, seed: int = 0) -> None:
    """A fake MNIST of full size in torchvision's IDX layout: the offline 5k sample tiled, each copy shifted by
    up to 2 pixels and noised, so the timing sees full-size epochs without the real files."""
    images, labels = load_mnist_sample()
    generator = torch.Generator().manual_seed(seed)
    total = n_train + n_test
    reps = -(-total // len(images))
    tiled, tiled_labels = images.repeat(reps, 1, 1)[:total].clone(), labels.repeat(reps)[:total]
    for start in range(len(images), total, len(images)):  # the first copy stays the real sample
        block = tiled[start:start + len(images)]
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
        noise = torch.randint(-20, 21, block.shape, generator=generator)
        block.copy_((block.roll((dy, dx), dims=(1, 2)).int() + noise).clamp(0, 255).to(torch.uint8))
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(0, n_train)), ("t10k", slice(n_train, total))):
        for kind, array in (("images-idx3", tiled[part].numpy()), ("labels-idx1", tiled_labels[part].numpy())):
            array = np.ascontiguousarray(array, dtype=np.uint8)
            with open(raw / f"{prefix}-{kind}-ubyte", "wb") as f:
                f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
                f.write(array.tobytes())


def write_training_split_as_idx(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Our training split as torchvision-readable IDX files, so the hand-written loop sees the same examples."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images.numpy()), ("labels-idx1", labels.numpy())):
            array = np.ascontiguousarray(array, dtype=np.uint8)
            with open(raw / f"{prefix}-{kind}-ubyte", "wb") as f:
                f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
                f.write(array.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12_800, help="training samples timed per configuration")
    parser.add_argument("--teacher-samples", type=int, default=3_200, help="samples timed for teacher training")
    parser.add_argument("--warmup", type=int, default=10, help="batches run before timing starts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each is shown")
    parser.add_argument("--student", default="mlp_784_16_10", help="student model config (conf/model/) of (a)-(d)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=None, help="where MNIST is looked for (default: the project's data/)")
    parser.add_argument("--full-size", action="store_true",
                        help="a full-size fake MNIST (60,000 + 10,000 images: the 5k sample tiled, shifted and noised)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed of the default run (after one warm-up)")
    parser.add_argument("--default-run-on-sample", action="store_true",
                        help="time (e)-(g) on the 5k sample; without it they run on full-size data (the fake one "
                             "when full MNIST is absent)")
    parser.add_argument("--sweep", action="store_true",
                        help="time sweep=t_alpha with the basic and the batched launcher, and the default run")
    parser.add_argument("--teacher-online", action="store_true",
                        help="with --sweep: the sweep with distill.cache_teacher_logits=false (the teacher runs on "
                             "every training batch) instead of cached teacher logits")
    parser.add_argument("--only", default=None, help=f"comma-separated configurations to run, of: {', '.join(NAMES)}")
    folder_bench.add_arguments(parser)  # --data image_folder --data-root DIR: the image-folder loader's images/s
    args = parser.parse_args()
    if args.data == "image_folder":
        folder_bench.run(args)
        return
    steps, teacher_steps = args.samples // BATCH, args.teacher_samples // BATCH

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        teacher_ckpt = tmp_path / "teacher.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in MnistCNN().state_dict().items()},
                    "net_config": {"_target_": "kd_lightning.models.MnistCNN", "num_classes": 10}}, teacher_ckpt)
        data_overrides = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}", "data.download=false"]
        if args.full_size:
            args.data_dir = tmp_path / "data"
            write_full_size_mnist(args.data_dir)
        if args.data_dir:
            data_overrides.append(f"paths.data_dir={args.data_dir}")
        accelerator = "gpu" if args.device == "cuda" else "cpu"
        run_dirs = iter(range(1_000_000))

        def fresh_run_dir() -> list[str]:  # every default run writes its own checkpoints and TensorBoard run
            return [f"paths.output_dir={tmp_path / 'runs' / str(next(run_dirs))}"]

        common = [*data_overrides, f"teacher.ckpt_path={teacher_ckpt}", f"trainer.accelerator={accelerator}"]
        if args.device == "cuda":
            common.append("+trainer.precision=bf16-mixed")
        students = [*common, f"model={args.student}"]

        # The same training examples for the hand-written loop, read through torchvision's MNIST dataset.
        cfg = compose_train_config(["experiment=hard", *data_overrides])
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        idx_root = tmp_path / "idx"
        write_training_split_as_idx(idx_root, *dm.splits["train"])

        # The default run (e)-(g) on full-size epochs, as users run it: without full MNIST, on the full-size fake
        # one (the 5k sample's 50 steps an epoch would weigh its per-epoch costs ~15x more than full MNIST's 750).
        data_name = "full-size fake MNIST (--full-size: the 5k sample tiled, shifted, noised)" if args.full_size else dm.source
        default_data = f"{data_name} ({len(dm.splits['train'][0]):,} training images)"
        full_size_dir = None
        if dm.source == SAMPLE_SOURCE and not args.default_run_on_sample:
            full_size_dir = tmp_path / "full_size"
            default_data = "full-size fake MNIST (48,000 training images: the 5k sample tiled, shifted, noised)"

        def default_students() -> list[str]:
            if full_size_dir is None:
                return students
            if not full_size_dir.exists():  # written once, when a configuration (e)-(g) first runs
                write_full_size_mnist(full_size_dir)
            return [*(o for o in students if not o.startswith("paths.data_dir=")), f"paths.data_dir={full_size_dir}"]

        configurations = {
            "a": lambda: stack_throughput("hard", steps, args.warmup, students),
            "b": lambda: stack_throughput("hard_soft", steps, args.warmup, [*students, "distill.cache_teacher_logits=false"]),
            "c": lambda: stack_throughput("hard_soft", steps, args.warmup, students),
            "d": lambda: reference_loop(idx_root, steps, args.warmup, args.device, teacher_training=False,
                                       student=instantiate(compose_train_config([f"model={args.student}"]).model)),
            "teacher": lambda: stack_throughput("teacher", teacher_steps, args.warmup, common),
            "teacher_ref": lambda: reference_loop(idx_root, teacher_steps, args.warmup, args.device, True),
            "soft": lambda: stack_throughput("soft", steps, args.warmup, default_students()),
            "default_live": lambda: default_run_throughput(args.epochs, [*default_students(), *fresh_run_dir()], live_bar=True),
            "default_log": lambda: default_run_throughput(args.epochs, [*default_students(), *fresh_run_dir()], live_bar=False),
        }
        if args.sweep:  # the sweep as a user runs it: its own process, its dirs in tmp, the teacher's logits cached
            sweep_overrides = [*common, "model=mlp_784_16_10"]
            if args.teacher_online:
                sweep_overrides.append("distill.cache_teacher_logits=false")
            else:
                warm_teacher_logit_cache(sweep_overrides)
            sweeps = iter(range(1_000_000))
            for launcher in ("basic", "batched"):
                configurations[f"sweep_{launcher}"] = lambda launcher=launcher: 25 * 3600 / sweep_seconds(
                    launcher, [o for o in sweep_overrides if not o.startswith("paths.output_dir")],
                    tmp_path / "sweeps" / f"{launcher}-{next(sweeps)}")
            args.only = args.only or "soft,default_log,sweep_basic,sweep_batched"
        if args.only:
            configurations = {k: configurations[k] for k in args.only.split(",")}
        # Interleaved repeats, best kept: the least disturbed measurement of each (other processes only slow down).
        runs: dict[str, list[float]] = {key: [] for key in configurations}
        for _ in range(args.repeats):
            for key, measure in configurations.items():
                runs[key].append(measure())
        results = {key: max(values) for key, values in runs.items()}

    if "sweep_basic" in results and "sweep_batched" in results:
        data = "full-size fake MNIST" if args.full_size else (f"MNIST from {args.data_dir}" if args.data_dir else
                                                               "MNIST in data/, else the 5k sample")
        teacher = "teacher run on every batch" if args.teacher_online else "teacher logits cached"
        print(f"\npython train.py sweep=t_alpha (25 jobs, {teacher}, {data}), jobs per hour, best of "
              f"{args.repeats}: basic launcher {results['sweep_basic']:,.0f} ({', '.join(f'{v:,.0f}' for v in runs['sweep_basic'])}), "
              f"batched launcher {results['sweep_batched']:,.0f} ({', '.join(f'{v:,.0f}' for v in runs['sweep_batched'])})")
        print(f"speed-up batched / basic launcher (target >= 10x on a 2-core CPU): "
              f"{results['sweep_batched'] / results['sweep_basic']:.1f}x")
        results = {k: v for k, v in results.items() if not k.startswith("sweep_")}
    if not results:  # --only sweep_basic,sweep_batched
        return
    print(f"\nTraining throughput on {args.device} ({torch.get_num_threads()} threads), data: {data_name}, batch {BATCH}, "
          f"student {args.student}")
    if {"soft", "default_live", "default_log"} & set(results):
        print(f"(e)-(g), the default run and its stripped stack: data {default_data}")
    print(f"best of {args.repeats} interleaved repeats (all: samples/s per repeat)")
    print("| configuration | samples/s | all |\n|---|---:|---|")
    for key, name in NAMES.items():
        if key in results:
            print(f"| {name} | {results[key]:,.0f} | {', '.join(f'{v:,.0f}' for v in runs[key])} |")
    ratios = [
        ("a", "c", "time ratio c/a (KD cached vs hard, lower is better; target <= 1.15)", "{:.2f}"),
        ("c", "d", "speed-up c/d (KD cached vs hand-written loop; target >= 20)", "{:.1f}x"),
        ("teacher", "teacher_ref", "teacher training speed-up vs hand-written loop", "{:.2f}x"),
        ("soft", "default_live", "time ratio default run (live bar) / stripped stack (target <= 1.3)", "{:.2f}"),
        ("soft", "default_log", "time ratio default run (log-file lines) / stripped stack (target <= 1.3)", "{:.2f}"),
    ]
    print()
    for fast, slow, label, fmt in ratios:
        if fast in results and slow in results:
            ratio = results[fast] / results[slow] if label.startswith("time") else results[slow] / results[fast]
            print(f"{label}: {fmt.format(ratio)}")

if __name__ == "__main__":
    main()
