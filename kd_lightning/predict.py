"""Classify images: `python predict.py ckpt_path=<best.ckpt or .onnx> input=<image file or folder> [top_k=5]`.

The net is a train.py checkpoint (rebuilt with `load_net`) or an ONNX file written by export.py (run by
onnxruntime). How an image becomes an input comes with it: a checkpoint of a `data=image_folder` run holds the
DataModule's state (class names, channels, eval transforms, mean and std), an exported ONNX file the same in its
metadata; a checkpoint of a built-in dataset takes its run's data config (classes named by index).

`predictions.csv`: one row per image, `path, class_1, prob_1, ..., class_k, prob_k` (softmax probabilities,
most probable first), written atomically. A bad path is one line (exit 2); each unreadable image is one line,
the others are still predicted, and the command exits 2 after writing the file.
"""

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torchvision.transforms import v2

from kd_lightning import config
from kd_lightning.checkpoints import atomic_write_text, load_checkpoint, load_net
from kd_lightning.data.image_folder import IMAGE_EXTENSIONS, UnreadableImageError, build_transforms, open_image
from kd_lightning.errors import CheckpointError, ConfigError, InputError, exit_on_error

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A net and what turns an image file into its input."""

    run: Callable[[Tensor], Tensor]  # inputs [B, C, H, W] -> logits [B, classes]
    transform: Callable[[Any], Tensor]
    channels: int
    class_names: list[str]


def preprocessing(state: dict[str, Any]) -> tuple[v2.Compose, int, list[str]]:
    """The eval pipeline, channels and class names of an ImageFolderDataModule's stored state."""
    transforms = build_transforms(state["eval_transforms"], "eval_transforms")
    pipeline = v2.Compose([*transforms, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(state["mean"]), list(state["std"]))])
    return pipeline, int(state["channels"]), list(state["class_names"])


def from_checkpoint(path: Path) -> Predictor:
    checkpoint = load_checkpoint(path)
    net = load_net(path).eval()
    state = checkpoint.get("ImageFolderDataModule")
    if state is None:  # a built-in dataset: its run's data config gives size and statistics
        from kd_lightning.export import run_config, run_dir_of

        run_dir = run_dir_of(path)
        if run_dir is None:
            raise CheckpointError(f"{path} holds no image_folder data state and has no run dir with "
                                  f".hydra/config.yaml: predict needs how its inputs were made")
        datamodule = instantiate(run_config(run_dir).data)
        channels, size = datamodule.input_shape[0], datamodule.input_shape[-1]
        mean, std = datamodule.mean, datamodule.std
        state = {"eval_transforms": [{"_target_": "torchvision.transforms.v2.Resize", "size": size},
                                     {"_target_": "torchvision.transforms.v2.CenterCrop", "size": size}],
                 "mean": [mean] * channels if isinstance(mean, float) else mean,
                 "std": [std] * channels if isinstance(std, float) else std,
                 "channels": channels, "class_names": [str(i) for i in range(net.num_classes)]}
    transform, channels, names = preprocessing(state)

    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:
        return net(x).float()

    return Predictor(run, transform, channels, names)


def from_onnx(path: Path) -> Predictor:
    from kd_lightning.export import require_deploy_packages

    require_deploy_packages()
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors for a bad file: one line naming it
        raise CheckpointError(f"{path} is not a readable ONNX file ({' '.join(str(err).split())[:200]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "class_names" not in meta:
        raise CheckpointError(f"{path} has no class names in its metadata: export it from a data=image_folder "
                              f"checkpoint with `python export.py ckpt_path=<best.ckpt> formats=[onnx]`")
    state = {key: json.loads(value) for key, value in meta.items()}
    transform, channels, names = preprocessing(state)
    input_name = session.get_inputs()[0].name
    return Predictor(lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0]).float(),
                     transform, channels, names)


def image_paths(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not paths:
            raise InputError(f"input={source} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return paths
    raise InputError(f"input={source} does not exist: give an image file or a folder of images")


def predict(cfg: DictConfig) -> Path:
    """Write the predictions of `cfg.ckpt_path` on `cfg.input` to predictions.csv; return its path."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise InputError(f"ckpt_path={ckpt} does not exist: give a train.py checkpoint (.ckpt) or an exported .onnx")
    paths = image_paths(Path(str(cfg.input)).expanduser())
    predictor = from_onnx(ckpt) if ckpt.suffix == ".onnx" else from_checkpoint(ckpt)
    k = cfg.top_k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"top_k={k!r} is not accepted: a positive integer")
    k = min(k, len(predictor.class_names))
    rows, failed = [], []
    for start in range(0, len(paths), cfg.batch_size):
        batch, kept = [], []
        for path in paths[start : start + cfg.batch_size]:
            try:
                batch.append(predictor.transform(open_image(path, predictor.channels)))
                kept.append(path)
            except UnreadableImageError as err:
                log.error("%s", str(err).split(": delete")[0])
                failed.append(path)
        if not batch:
            continue
        probs = torch.softmax(predictor.run(torch.stack(batch)), dim=1)
        top = probs.topk(k, dim=1)
        for path, p, i in zip(kept, top.values.tolist(), top.indices.tolist()):
            rows.append([str(path), *[v for c, q in zip(i, p) for v in (predictor.class_names[c], f"{q:.6f}")]])
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "predictions.csv"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", *[f"{name}_{j}" for j in range(1, k + 1) for name in ("class", "prob")]])
    writer.writerows(rows)
    atomic_write_text(out, text.getvalue())
    print(f"{len(rows)} of {len(paths)} images predicted (top {k}) -> {out}", flush=True)
    if failed:
        raise InputError(f"{len(failed)} of {len(paths)} images could not be read (named above); the others are in {out}")
    return out


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_error(log):
        predict(cfg)


if __name__ == "__main__":
    main()
