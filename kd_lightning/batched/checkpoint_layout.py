"""What a Lightning fit of DistillModule saves in a checkpoint, written for one student of a stacked group
(kd_lightning/batched/stacked.py): the weights, the callback states, the student's own share of the stacked
optimizer's state and Lightning's loop counters. With them eval.py, tracin.py (its learning rate) and
`train.py resume=<job dir>` read a batched job's checkpoints as a separate run's; test_batched.py compares
every field with a separate run's checkpoints.
"""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor


def checkpoint(callbacks: list[Callback | None], epoch: int, steps: int, state: dict[str, Tensor], net_config: Any,
               val_metrics: dict[str, float], seconds: tuple[float, float], optimizer_state: dict[str, Any],
               batches: tuple[int, int]) -> dict:
    """The checkpoint a Lightning fit of DistillModule writes at the end of `epoch` after `steps` optimizer steps:
    weights, the states of the student's `callbacks` (None: absent) as they are now, the student's optimizer state,
    the loop counters (`batches`: training and validation batches an epoch), so that eval.py, tracin.py and
    `train.py resume=<job dir>` read it as a separate run's. No `rng_states`: a batchable run draws no global
    random numbers (no dropout; its data order has its own generator)."""
    states = {cb.state_key: cb.state_dict() for cb in callbacks if cb is not None}
    elapsed = {"train": seconds[0], "sanity_check": 0, "validate": seconds[1], "test": 0, "predict": 0}
    states["Timer"] = {"time_elapsed": elapsed}
    return {
        "epoch": epoch, "global_step": steps, "pytorch-lightning_version": pl.__version__,
        "state_dict": state, "net_config": net_config, "val_metrics": dict(val_metrics),
        "callbacks": states, "loops": lightning_loops(epoch, steps, *batches),
        "optimizer_states": [optimizer_state], "lr_schedulers": [],
        "batched": True,  # written by the batched launcher
    }


def student_optimizer_state(group_state: dict[str, Any], i: int) -> dict[str, Any]:
    """Student i's optimizer state_dict, cut from the stacked optimizer's (`optimizer.state_dict()`): its state
    is elementwise, so each tensor shaped like a stacked parameter is the students' states stacked; 0-dim ones
    (Adam's step count) are shared by the students that step together."""
    return {
        "state": {k: {name: (v[i] if v.dim() else v).detach().clone().cpu() if isinstance(v, Tensor) else v
                      for name, v in param_state.items()} for k, param_state in group_state["state"].items()},
        "param_groups": [dict(group) for group in group_state["param_groups"]],
    }


def lightning_loops(epoch: int, steps: int, train_batches: int, val_batches: int) -> dict[str, Any]:
    """The `loops` entry of the checkpoint that Lightning's fit (automatic optimization, no scheduler, validation
    every epoch, started from scratch) saves at the end of `epoch` after `steps` optimizer steps: its progress
    counters, which `resume=` continues from (test_batched.py compares them with a separate run's)."""
    def progress(total: int, current: int, counters: tuple[str, ...]) -> dict[str, dict[str, int]]:
        return {"total": dict.fromkeys(counters, total), "current": dict.fromkeys(counters, current)}

    def batches(total: int, current: int, last: bool) -> dict[str, Any]:
        return {**progress(total, current, ("ready", "completed", "started", "processed")), "is_last_batch": last}

    epochs = {"ready": epoch + 1, "completed": epoch, "started": epoch + 1, "processed": epoch + 1}
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": steps},
        "epoch_loop.batch_progress": batches(steps, train_batches, True),
        "epoch_loop.scheduler_progress": progress(0, 0, ("ready", "completed")),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
            "step": progress(steps, train_batches, ("ready", "completed")),
            "zero_grad": progress(steps, train_batches, ("ready", "completed", "started")),
        }},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": progress(0, 0, ("ready", "completed")),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": batches(val_batches, val_batches, True),
        "epoch_progress": {"total": epochs, "current": dict(epochs)},
    }
    idle = ("ready", "completed", "started", "processed")
    return {"fit_loop": fit_loop,
            **{name: {"state_dict": {}, "batch_progress": batches(0, 0, False)} for name in ("validate_loop", "test_loop")},
            "predict_loop": {"state_dict": {}, "batch_progress": progress(0, 0, idle)}}
