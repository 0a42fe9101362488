"""Lightning callbacks of this project (the stock ones are configured in conf/callbacks/)."""

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import callbacks as pl_callbacks
from pytorch_lightning.callbacks import Callback, OnExceptionCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.profilers import PassThroughProfiler
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_lightning.checkpoints import AtomicCheckpointIO

# ---- the per-batch cost of callbacks ------------------------------------------------------------------------------
# Lightning calls every hook of every callback on every batch (6 hooks a training step), each call inside
# `trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook}")`: a generator context manager and, for
# ModelCheckpoint and EarlyStopping, a state key built by repr() of a dict, even when nothing is profiled. With the
# default run's 10 callbacks that was ~0.2-0.4 ms a step on this CPU (a student's whole step is ~1.6 ms). The
# classes below keep Lightning's behaviour and state keys (so checkpoints are unchanged) without that cost.


class NoProfiler(PassThroughProfiler):
    """Lightning's default (no profiling), with `profile()` a shared no-op context instead of a new generator
    context manager per call. ModelCheckpoint below puts it in place of Lightning's PassThroughProfiler at setup
    (not `trainer.profiler` in conf/trainer: the batched launcher accepts the trainer keys it knows only);
    `trainer.profiler=simple` (or advanced, pytorch) still profiles."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return self._nothing


class _CachedStateKey:
    """`state_key` computed once per set of the values it is made of (Lightning rebuilds it on every hook call)."""

    _state_key_cache: tuple[tuple, str] | None = None

    def _cached_state_key(self, **values: Any) -> str:
        key = tuple(values.values())
        cached = self._state_key_cache
        if cached is None or cached[0] != key:
            cached = self._state_key_cache = (key, self._generate_state_key(**values))  # type: ignore[attr-defined]
        return cached[1]


class ModelCheckpoint(_CachedStateKey, pl_callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint (same class name, hence the same state key in checkpoints), cheaper per batch:
    the state key is cached, and `on_train_batch_end` returns at once when no step- or time-based saving is
    configured (where Lightning's own would check the trainer's state and the clock, then return), and an unprofiled
    trainer gets NoProfiler. With AtomicCheckpointIO (conf/trainer), a save returns once the file is written: its
    fsyncs and atomic rename finish on a background thread (kd_lightning/checkpoints.py)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.profiler) is PassThroughProfiler:  # nothing is profiled: the same, without per-hook cost
            trainer.profiler = NoProfiler()

    @property
    def state_key(self) -> str:
        return self._cached_state_key(monitor=self.monitor, mode=self.mode,
                                      every_n_train_steps=self._every_n_train_steps,
                                      every_n_epochs=self._every_n_epochs,
                                      train_time_interval=self._train_time_interval)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, for a run dir that was moved or copied since the checkpoint was written: the saved paths are
        moved along into this dir (Lightning would forget the best score and keep the original's best_model_path,
        so the copy would test the original's best checkpoint and write its own next best as best-v1.ckpt)."""
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def moved(path: Any) -> Any:
                inside = isinstance(path, str) and path and Path(path).is_relative_to(old)
                return str(Path(self.dirpath) / Path(path).relative_to(old)) if inside else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{k: moved(state_dict[k]) for k in ("best_model_path", "kth_best_model_path",
                                                               "last_model_path") if k in state_dict}}
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {moved(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        if not isinstance(checkpoint_io, AtomicCheckpointIO):
            return super()._save_checkpoint(trainer, filepath)
        with checkpoint_io.deferred_sync():  # the fsyncs and the rename on a background thread, in order
            super()._save_checkpoint(trainer, filepath)


class EarlyStopping(_CachedStateKey, pl_callbacks.EarlyStopping):
    """Lightning's EarlyStopping (same class name and state key), with the state key cached."""

    @property
    def state_key(self) -> str:
        return self._cached_state_key(monitor=self.monitor, mode=self.mode)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption), save a checkpoint to resume from.

    Lightning turns SIGTERM into an exception at the next batch boundary and Ctrl-C into KeyboardInterrupt;
    both reach `on_exception`. Other exceptions (a NaN loss, a bug) save nothing: the state may be bad, and the
    last good checkpoint must stay the newest. `ckpt_path=last` picks this file when it is the newest.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            super().on_exception(trainer, pl_module, exception)
            if trainer.is_global_zero:
                print(f"\nInterrupted: checkpoint saved to {Path(self.ckpt_path)}", flush=True)


class ChannelsLast(Callback):
    """Keep the LightningModule's 4-D weights in channels_last (NHWC) memory format, enabled by `trainer=gpu`.

    The whole module is converted, a DistillModule's teacher included. Inputs need no conversion: a
    convolution whose weight is channels_last returns channels_last output for an NCHW input, so every layer
    after the first runs in NHWC, the layout tensor cores use without transposes under bf16 autocast.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy moves the module to its device; `.to(device)` keeps the memory format.
        pl_module.to(memory_format=torch.channels_last)


class EpochLineProgressBar(ProgressBar):
    """One plain line per epoch (epoch, the progress-bar metrics, seconds): for log files and cluster jobs,
    where a live bar writes thousands of carriage-return updates nobody sees."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._epoch_started = True, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch-end validation before this hook: the line carries this epoch's val metrics.
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        seconds = time.perf_counter() - self._epoch_started
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}  ({seconds:.1f} s)", flush=True)


def progress_bar(enabled: bool = True, refresh_rate: int = 50) -> ProgressBar | None:
    """The progress bar of conf/callbacks/default.yaml: None when `trainer.enable_progress_bar=false` (so that
    override just works), a live tqdm bar redrawn every `refresh_rate` batches on a terminal (redrawing every
    batch costs a small student ~45% of its epoch), else one line per epoch."""
    if not enabled:
        return None
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return EpochLineProgressBar()
