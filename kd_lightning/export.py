"""Export a trained net for deployment: `python -m kd_lightning.export ckpt_path=<checkpoint> formats=[onnx,torchscript]`.

The net alone is exported (a student checkpoint holds no teacher; `load_net` rebuilds the net from the checkpoint),
in eval mode, with a dynamic batch axis, as
- onnx: `<ckpt stem>.onnx`, by torch's dynamo-based exporter (`dynamo=True`, the default of `torch.onnx.export` in torch 2.14;
  it needs onnxscript), weights inside the one file;
- torchscript: `<ckpt stem>.ts.pt`, traced (torch 2.14 deprecates TorchScript, but C++ libtorch and older runtimes
  load it);
- pt2: `<ckpt stem>.pt2`, a `torch.export` ExportedProgram (load with `torch.export.load(path).module()`).

Each file is verified before it is put in place: the exported net, run by onnxruntime (onnx) or loaded back by torch
(torchscript, pt2), must give the same top-1 class as the PyTorch net on every example of the test split and logits
within `atol + rtol * |logit|`. The check is printed in one line; a file that fails it is not written (exit 1).
The test split is the one the checkpoint's run trained on (its run dir's `.hydra/config.yaml`), else `data=`.
"""

import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from kd_lightning import config
from kd_lightning.checkpoints import atomic_write, load_net
from kd_lightning.errors import ConfigError, exit_on_error

log = logging.getLogger(__name__)
for name in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs each of its optimization passes at INFO
    logging.getLogger(name).setLevel(logging.WARNING)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts.pt", "pt2": ".pt2"}
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportMismatch(RuntimeError):
    """An exported net does not reproduce the PyTorch net within the tolerance."""


def require_deploy_packages() -> None:
    if missing := [name for name in DEPLOY_PACKAGES if importlib.util.find_spec(name) is None]:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install -e \".[deploy]\"")


# ---- which run, which data --------------------------------------------------------------------------------
def run_dir_of(ckpt: Path) -> Path | None:
    """The train.py run dir a checkpoint belongs to: `<run>/checkpoints/<name>.ckpt`, or `<cache>/<key>/run` for a
    cached `teacher.ckpt`; None when neither holds a `.hydra/config.yaml`."""
    for candidate in (ckpt.parent.parent, ckpt.parent / "run"):
        if (candidate / ".hydra" / "config.yaml").is_file():
            return candidate
    return None


def run_config(run_dir: Path) -> DictConfig:
    """The saved config of a run dir, resolvable outside its Hydra job (its output dir set to that dir)."""
    return config.saved_run_config(run_dir)


def data_config_for(ckpt: Path, cfg: DictConfig) -> tuple[DictConfig, str]:
    """The data of the checkpoint's own run, unless `data=`/`data.*=` was given on the command line; and where it
    came from, as eval.py records it (`run <dir>`, `data= given on the command line`, or the entry config's default
    when the checkpoint has no run dir)."""
    overridden = HydraConfig.initialized() and any(
        o.lstrip("+~").startswith(("data=", "data.")) for o in HydraConfig.get().overrides.task
    )
    run_dir = run_dir_of(ckpt)
    if overridden:
        return cfg.data, "data= given on the command line"
    if run_dir is None:
        return cfg.data, "the default data= (the checkpoint is in no train.py run dir)"
    return run_config(run_dir).data, f"the checkpoint's run {run_dir}"


def load_test_split(datamodule: Any) -> tuple[Tensor, Tensor]:
    """Inputs and labels of the whole test split, in dataset order."""
    datamodule.prepare_data()
    datamodule.setup("test")
    xs, ys = zip(*[(x, y) for x, y, _ in datamodule.eval_loader("test")])
    return torch.cat(xs), torch.cat(ys)


@torch.inference_mode()
def batched(fn: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([fn(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


# ---- writers and runners ----------------------------------------------------------------------------------
def write_onnx(net: nn.Module, example: Tensor, path: str) -> None:
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(net, (example,), path, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)


def run_onnx(path: str) -> Callable[[Tensor], Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def write_torchscript(net: nn.Module, example: Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript (see the docstring)
        torch.jit.save(torch.jit.trace(net, example), path)


def run_torchscript(path: str) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval()


def write_pt2(net: nn.Module, example: Tensor, path: str) -> None:
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with open(path, "wb") as f:  # a file object: torch.export checks names for ".pt2", and the temporary one is not
        torch.export.save(program, f)


def run_pt2(path: str) -> Callable[[Tensor], Tensor]:
    with open(path, "rb") as f:
        return torch.export.load(f).module()


WRITERS = {"onnx": (write_onnx, run_onnx), "torchscript": (write_torchscript, run_torchscript),
           "pt2": (write_pt2, run_pt2)}


# ---- the check --------------------------------------------------------------------------------------------
@dataclass
class Check:
    """How an exported net's logits compare with the PyTorch net's over a split."""

    fmt: str
    n: int
    top1_equal: int
    max_abs_diff: float
    within_tolerance: bool
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.top1_equal == self.n and self.within_tolerance

    def line(self, path: Path, source: str) -> str:
        verdict = "verified" if self.passed else "FAILED"
        return (f"{self.fmt} {verdict}: top-1 equal on {self.top1_equal}/{self.n} test examples of {source}, "
                f"max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.atol:g} + {self.rtol:g}*|logit|) -> {path}")


def compare(fmt: str, reference: Tensor, exported: Tensor, atol: float, rtol: float) -> Check:
    exported = exported.float()
    diff = (exported - reference).abs()
    return Check(fmt, len(reference), int((exported.argmax(1) == reference.argmax(1)).sum()), float(diff.max()),
                 bool((diff <= atol + rtol * reference.abs()).all()), atol, rtol)


def add_onnx_metadata(path: str, metadata: dict[str, str]) -> None:
    """Store `metadata` (e.g. class_names as JSON) in the ONNX file's metadata_props, read back by predict.py."""
    import onnx

    model = onnx.load(path)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def input_metadata(datamodule: Any) -> dict[str, str]:
    """What a deployed file needs besides the net to read an image: class names and the eval pipeline
    (data=image_folder); empty for the built-in datasets."""
    if not getattr(datamodule, "class_names", None):
        return {}
    import json

    return {key: json.dumps(value) for key, value in datamodule.state_dict().items()}


def export_net(net: nn.Module, inputs: Tensor, path: Path, fmt: str, atol: float = 1e-4, rtol: float = 1e-4,
               source: str = "the given inputs", metadata: dict[str, str] | None = None) -> Check:
    """Write `net` as `fmt` to `path` if, run from the written file, it reproduces `net` on `inputs`; return the
    check. The file is written to a temporary name beside `path` and renamed only when it passes. `metadata`
    goes into an ONNX file's metadata_props."""
    if fmt not in WRITERS:
        raise ConfigError(f"formats: {fmt!r} is not accepted: any of {', '.join(SUFFIXES)}")
    if fmt == "onnx":
        require_deploy_packages()
    write, run = WRITERS[fmt]
    net = net.eval()
    reference = batched(net, inputs)
    result: list[Check] = []

    def write_and_check(tmp: str) -> None:
        write(net, inputs[: min(len(inputs), 8)], tmp)
        if metadata and fmt == "onnx":
            add_onnx_metadata(tmp, metadata)
        result.append(compare(fmt, reference, batched(run(tmp), inputs), atol, rtol))
        if not result[0].passed:
            raise ExportMismatch(result[0].line(path, source))

    atomic_write(path, write_and_check)
    return result[0]


def export(cfg: DictConfig) -> list[Check]:
    """Export `cfg.ckpt_path`'s net in each of `cfg.formats`, each verified on the test split of its run's data."""
    formats = [cfg.formats] if isinstance(cfg.formats, str) else list(cfg.formats or [])  # formats=onnx: one
    if not formats or any(f not in SUFFIXES for f in formats):
        raise ConfigError(f"formats={formats} is not accepted: a non-empty list of {', '.join(SUFFIXES)}")
    if "onnx" in formats:
        require_deploy_packages()  # before any work
    ckpt = Path(cfg.ckpt_path)
    net = load_net(ckpt)
    datamodule = instantiate(data_config_for(ckpt, cfg)[0])
    inputs, _ = load_test_split(datamodule)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt.parent
    checks = []
    for fmt in formats:
        path = out_dir / f"{ckpt.stem}{SUFFIXES[fmt]}"
        check = export_net(net, inputs, path, fmt, cfg.atol, cfg.rtol, datamodule.source, input_metadata(datamodule))
        print(check.line(path, datamodule.source), flush=True)
        checks.append(check)
    return checks


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_error(log, failures=(ExportMismatch,)):
        export(cfg)


if __name__ == "__main__":
    main()
