"""Released CIFAR-100 teachers as `teacher.ckpt_path=`: the `ckpt_epoch_240.pth` files of mdistiller's
`cifar_teachers.tar` and RepDistiller's `save/models/<net>_vanilla/` (docs/benchmark.md).

Their layout is a dict holding the net's state_dict under `model` (RepDistiller's train_teacher.py also stores
`epoch`, `accuracy`, `optimizer`) or `net`. Its keys are the reference code's, which the nets of
kd_lightning.models.cifar100 keep, so the weights load strictly: every key and shape must match. Two mappings
are applied, both tested:
- a `module.` prefix on every key (saved from nn.DataParallel) is removed;
- `*.num_batches_tracked` buffers missing (files written before PyTorch 0.4.1 have none) are set to 0; they
  only count batches and change nothing unless a BatchNorm has momentum=None, which none here has.

`released_as_checkpoint` converts such a file once into a kd-lightning teacher checkpoint (the net's weights
under `net.*` and its `net_config`) in `<cache_dir>/released/`, so that every tool that loads teachers (the
logit cache, the model card, tracin) reads it as it reads a trained teacher; the source file's sha256 is
kept beside it and recorded in the run's metrics.json.
"""

import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.checkpoints import atomic_torch_save, atomic_write_text, read_checkpoint_file
from kd_lightning.errors import CheckpointError

STATE_KEYS = ("model", "net")  # where a released file keeps the state_dict
DATA_PARALLEL_PREFIX = "module."


def read_released(path: str | Path) -> dict[str, Any] | None:
    """The released file's dict, or None when `path` is a Lightning checkpoint (it has `state_dict`). Read as every
    checkpoint is (weights_only=True, `read_checkpoint_file`); a file that is neither is a one-line CheckpointError."""
    content = read_checkpoint_file(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        return None
    if not isinstance(content, dict) or not any(isinstance(content.get(k), dict) for k in STATE_KEYS):
        found = sorted(map(str, content))[:8] if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path} is not accepted: expected a Lightning checkpoint (state_dict) or a released "
                              f"teacher (a dict with 'model' or 'net' holding the weights); found {found}")
    return content


def released_state_dict(content: dict[str, Any]) -> dict[str, Tensor]:
    state = next(content[k] for k in STATE_KEYS if isinstance(content.get(k), dict))
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        state = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def load_released(path: str | Path, net: nn.Module) -> nn.Module:
    """Load the released file at `path` into `net`, strictly: the first missing or unexpected key or wrong
    shape is a one-line CheckpointError naming the file, the net and the key."""
    content = read_released(path)
    if content is None:
        raise CheckpointError(f"{path} is a Lightning checkpoint, not a released teacher file")
    state, expected = released_state_dict(content), net.state_dict()
    name = type(net).__name__
    for key in expected:
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(expected[key])
    if missing := [k for k in expected if k not in state]:
        raise CheckpointError(f"{path} does not fit {name}: missing key {missing[0]} ({len(missing)} missing); "
                              "is teacher.overrides' model= the net this file was trained as?")
    if unexpected := [k for k in state if k not in expected]:
        raise CheckpointError(f"{path} does not fit {name}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected)")
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor) or tensor.shape != expected[key].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise CheckpointError(f"{path} does not fit {name}: {key} has shape {shape}, the net expects "
                                  f"{tuple(expected[key].shape)}")
    net.load_state_dict(state, strict=True)
    return net


def released_as_checkpoint(path: str | Path, model_cfg: DictConfig, cache_dir: str | Path, sha256: str) -> Path:
    """A kd-lightning checkpoint of the released teacher at `path` (sha256 `sha256`) as the net `model_cfg`:
    made once in `<cache_dir>/released/<sha256[:16]>-<net>/teacher.ckpt` (written atomically, then
    source.json), reused while source.json names the same file contents and net."""
    net_config = OmegaConf.to_container(model_cfg, resolve=True)
    entry = Path(cache_dir) / "released" / f"{sha256[:16]}-{str(net_config.get('_target_', 'net')).rsplit('.', 1)[-1]}"
    ckpt, record = entry / "teacher.ckpt", entry / "source.json"
    source = {"source": str(Path(path).resolve()), "source_sha256": sha256, "net_config": net_config}
    if ckpt.is_file() and record.is_file():
        stored = json.loads(record.read_text())
        if stored.get("source_sha256") == sha256 and stored.get("net_config") == net_config:
            return ckpt
    net = load_released(path, instantiate(net_config))
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    atomic_torch_save({"state_dict": state, "net_config": net_config, "released_source": source}, ckpt)
    atomic_write_text(record, json.dumps(source, indent=2))
    return ckpt
