"""Reading checkpoints safely and writing files atomically.

Every checkpoint is read with `weights_only=True`: a file whose unpickling would run code is refused.
"""

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from kd_lightning.errors import CheckpointError

NET_PREFIX = "net."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True, on the CPU; every failure is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any GLOBAL but tensors' and plain data's: a class, a function such as os.system.
        if unsafe := re.search(r"GLOBAL (\S+)", str(err)):
            raise CheckpointError(
                f"{path} was refused: loading it would run code ({unsafe.group(1)});"
                " only checkpoints of tensors and plain data are loaded"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({first_line})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it has no state_dict")
    return checkpoint


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `net.*` weights of a Lightning checkpoint written by ClassifierModule/DistillModule, unprefixed."""
    state = checkpoint["state_dict"]
    return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}


def load_net(path: str | Path, net_config: Any = None) -> nn.Module:
    """Build the net described by `net_config` (default: the checkpoint's own) and load the checkpoint's weights.

    Weights that do not fit the net are an error naming the first missing or unexpected key or shape mismatch.
    """
    checkpoint = load_checkpoint(path)
    if net_config is None:
        net_config = checkpoint.get("net_config")
        if net_config is None:
            raise CheckpointError(f"{path} has no net_config (not written by kd-lightning): pass the model config")
    net = instantiate(net_config)
    state, expected = net_state_dict(checkpoint), net.state_dict()
    name = type(net).__name__
    if missing := [k for k in expected if k not in state]:
        raise CheckpointError(f"{path} does not fit {name}: missing key net.{missing[0]} ({len(missing)} missing)")
    if unexpected := [k for k in state if k not in expected]:
        raise CheckpointError(f"{path} does not fit {name}: unexpected key net.{unexpected[0]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path} does not fit {name}: net.{key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    net.load_state_dict(state)
    return net


def atomic_write(dst: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `dst`, then rename: readers see the old file or the whole new one."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_torch_save(obj: Any, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: torch.save(obj, tmp))
