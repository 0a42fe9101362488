"""Reading checkpoints safely and writing files atomically.

Every checkpoint is read with `weights_only=True`: a file whose unpickling would run code is refused.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

NET_PREFIX = "net."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `net.*` weights of a Lightning checkpoint written by ClassifierModule/DistillModule, unprefixed."""
    state = checkpoint["state_dict"]
    return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}


def load_net(path: str | Path) -> nn.Module:
    """Rebuild the net stored in a checkpoint (from its `net_config`) and load its weights."""
    checkpoint = load_checkpoint(path)
    net = instantiate(checkpoint["net_config"])
    net.load_state_dict(net_state_dict(checkpoint))
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
