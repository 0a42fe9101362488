"""Library nets as teachers or students: `model=timm model.name=<timm name>` and `model=torchvision model.name=<name>`.

Both return the library's own module (parameter names as the library writes them), with the classifier head
made for `num_classes`, the stem made for `in_chans` (the data's channels; pretrained stem kernels are averaged
or repeated, as timm's `adapt_input_conv` does), and the attributes every net of this project keeps
(docs/models.md): `num_classes` and `feature_layers` (module paths of the feature maps, for fitnet and at).

Initial weights, in order:
- `weights_path=FILE`: a plain state_dict (`.pth`, `.pt`, `.bin`, `.safetensors`), a timm or torchvision weights
  file, or a Lightning checkpoint of this project (its `net.*` weights). Keys are checked strictly, except the
  classifier head when its shape differs (it is replaced for `num_classes`): one line names the missing and
  unexpected keys;
- timm `pretrained=true` / torchvision `weights=<enum name>, e.g. IMAGENET1K_V1`: downloaded once into the
  Hugging Face cache (timm) or `$TORCH_HOME/hub/checkpoints` (torchvision). Without network access and without
  the file there, one line says which file to put where;
- otherwise the library's random initialization.

A checkpoint of this project rebuilds these nets with `initial_weights_off` (no download, no file): its own
weights replace them anyway.
"""

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

WEIGHT_KEYS = ("pretrained", "weights", "weights_path")  # the keys that bring initial weights into a net config
# torchvision classification nets whose stages are resnet-style `layer1..layer4`
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def initial_weights_off(net_config: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides that build a net config without its initial weights (those of a checkpoint replace them)."""
    off = {"pretrained": False, "weights": None, "weights_path": None}
    return {k: off[k] for k in WEIGHT_KEYS if k in net_config}


# ---- timm -------------------------------------------------------------------------------------------------------
def timm_net(name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3,
             weights_path: str | None = None, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name)` for `num_classes` and `in_chans`, from `weights_path`, timm's pretrained weights
    or a random initialization."""
    import timm

    check_num_classes(num_classes)
    if name not in timm.list_models(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={name!r} is not a timm model; e.g. {', '.join(close) or 'resnet18, mobilenetv3_small_100'}"
                          " (timm.list_models() lists them)")
    if pretrained and not weights_path:
        with _timm_download(name):
            net = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    else:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        if weights_path:
            load_weights(net, weights_path, head=_prefixes(net.get_classifier(), net))
    net.feature_layers = tuple(info["module"] for info in getattr(net, "feature_info", [])
                               if info.get("module") and info.get("reduction", 1) > 1)[-4:]
    return net


def _hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _timm_download(name: str) -> Iterator[None]:
    """timm's download from the Hugging Face hub, or one line naming the file to put in the HF cache."""
    import huggingface_hub
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cache = huggingface_hub.constants.HF_HUB_CACHE
    where = (f"the hub repo {hub_id} (its model.safetensors) into the Hugging Face cache {cache} (HF_HOME), e.g. "
             f"`huggingface-cli download {hub_id}` on a machine with network access and copy the cache"
             if hub_id else f"its weights file (url {getattr(cfg, 'url', None)})")
    hint = (f"timm's pretrained weights of {name} are not available offline: put {where}; or give the file as "
            f"model.weights_path=FILE (.safetensors/.pth), or set model.pretrained=false")
    offline = not _hub_reachable()
    if offline and hub_id and huggingface_hub.try_to_load_from_cache(hub_id, "model.safetensors") is None \
            and huggingface_hub.try_to_load_from_cache(hub_id, "pytorch_model.bin") is None:
        raise CheckpointError(hint)
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = offline or saved  # no retries against an unreachable hub
    try:
        yield
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, ConfigError | CheckpointError):
            raise
        raise CheckpointError(f"{hint} ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = saved


# ---- torchvision ------------------------------------------------------------------------------------------------
def torchvision_net(name: str, num_classes: int, weights: str | None = None, in_chans: int = 3,
                    weights_path: str | None = None, **kwargs: Any) -> nn.Module:
    """`torchvision.models.get_model(name)` with its last Linear replaced for `num_classes` and its first conv
    for `in_chans`, from `weights_path`, the named weights enum or a random initialization."""
    import torchvision

    check_num_classes(num_classes)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError(f"model.name={name!r} is not a torchvision classification model; e.g. "
                          f"{', '.join(n for n in available if n.startswith(name[:3]))[:200] or 'resnet18, mobilenet_v3_small'}")
    if weights and not weights_path:
        enum = torchvision.models.get_model_weights(name)
        if weights not in enum.__members__:
            raise ConfigError(f"model.weights={weights!r} is not accepted for {name}: one of "
                              f"{', '.join(enum.__members__)}, or null")
        url = enum[weights].url
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        try:
            net = torchvision.models.get_model(name, weights=weights, **kwargs)
        except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError; a truncated download a RuntimeError
            raise CheckpointError(
                f"torchvision's {name} weights {weights} are not available offline: put {Path(url).name} (from {url}) "
                f"in {file.parent} (TORCH_HOME), or give it as model.weights_path=FILE, or set model.weights=null "
                f"({type(err).__name__}: {' '.join(str(err).split())[:150]})") from None
        _replace_head(net, num_classes)
        _adapt_stem(net, in_chans)
    else:
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        _replace_head(net, num_classes)
        _adapt_stem(net, in_chans)
        if weights_path:
            load_weights(net, weights_path, head=_prefixes(_last_linear(net)[1], net))
    net.num_classes = num_classes
    net.feature_layers = RESNET_STAGES if all(hasattr(net, s) for s in RESNET_STAGES) else ()
    return net


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(net).__name__} has no nn.Linear classifier head to replace")
    return linears[-1]


def _replace_head(net: nn.Module, num_classes: int) -> None:
    name, head = _last_linear(net)
    if head.out_features == num_classes:
        return
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _adapt_stem(net: nn.Module, in_chans: int) -> None:
    name, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_chans:
        return
    from timm.models import adapt_input_conv

    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


# ---- weights files ----------------------------------------------------------------------------------------------
def _prefixes(head: nn.Module, net: nn.Module) -> tuple[str, ...]:
    """The state_dict key prefixes of the classifier head module `head` of `net`."""
    return tuple(f"{n}." for n, m in net.named_modules() if m is head and n)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The weights in a `.safetensors` file, a plain or wrapped (`state_dict`, `model`) torch state_dict, or a
    Lightning checkpoint of this project (`net.*`); one CheckpointError line otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip or safetensors header errors: one line naming the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable weights file ({first}): give a state_dict .pth/.pt, a "
                              f".safetensors file or a Lightning checkpoint of this project") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        if any(k.startswith("net.") for k in state):  # a checkpoint of this project: the net's weights
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        obj = state
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors: give a state_dict .pth/.pt, a .safetensors "
                              f"file or a Lightning checkpoint of this project")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(net: nn.Module, path: str | Path, head: tuple[str, ...] = (), in_chans_adapt: bool = True) -> None:
    """Load `path` into `net` strictly, except the keys under `head` whose shapes differ (a head replaced for
    another number of classes keeps its fresh initialization). A stem kernel for other input channels is
    adapted (averaged/repeated). Mismatches are one CheckpointError line naming the keys."""
    state, expected = read_state_dict(path), net.state_dict()
    name = type(net).__name__
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {name}: missing keys {_few(missing)}; unexpected keys {_few(unexpected)}")
    load = {}
    for key, tensor in state.items():
        target = expected[key].shape
        if tensor.shape == target:
            load[key] = tensor
        elif key.startswith(head):
            log.info("%s: %s has shape %s, the head for this data %s: kept fresh", path, key, tuple(tensor.shape),
                     tuple(target))
        elif in_chans_adapt and tensor.ndim == 4 and tensor.shape[0] == target[0] and tensor.shape[2:] == target[2:]:
            from timm.models import adapt_input_conv

            load[key] = adapt_input_conv(target[1], tensor)
        else:
            raise CheckpointError(f"{path} does not fit {name}: {key} has shape {tuple(tensor.shape)}, the net "
                                  f"expects {tuple(target)}")
    net.load_state_dict({**expected, **load})


def _few(keys: list[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_num_classes(num_classes: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"model.num_classes={num_classes!r} is not accepted: an integer >= 2 (the data's "
                          f"number of classes; with data=image_folder, data.root must hold DIR/train/<class>/)")


# ---- the contract of a net ------------------------------------------------------------------------------------
def check_net(net: nn.Module, what: str = "model") -> None:
    """The attribute every net keeps (docs/models.md): `num_classes`, one line naming what is missing."""
    if not isinstance(getattr(net, "num_classes", None), int):
        raise ConfigError(f"{what}: {type(net).__name__} has no integer attribute num_classes: set "
                          f"self.num_classes in its __init__ (docs/models.md, the net contract)")


os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
