"""`data=image_folder data.root=DIR`: a folder of images, one sub-folder per class, as a KDDataModule.

Layout: `DIR/train/<class>/...` (required; files in nested folders of a class folder belong to that class),
`DIR/val/<class>/...` and `DIR/test/<class>/...` (optional). Classes are train's sub-folder names, sorted; a
missing val split is cut from train with `train_val_split` and `split_seed` (as MNIST's), a missing test split
is cut the same way with a warning, or refused with `require_test=true`. Dotfiles and files that are not images
(by extension) are skipped and counted in one log line. Every problem with the folder is one line naming the
path, raised by `setup()` before anything trains.

Images are decoded with Pillow in the DataLoader workers and converted to `channels` (grey, RGBA, palette and
16-bit images included); then the config's transforms (lists of torchvision `transforms.v2`, applied to the PIL
image), then scaled to [0, 1] and normalized. An image that cannot be decoded is named in one line when it is
first read (`verify_images=true` checks every file in `setup()`). `cache_decoded=true` decodes each image once
into a uint8 tensor (shorter side resized to the eval resize, centre-cropped square) kept in a file keyed by the
data identity, and the transforms run on that tensor.

Normalization: `imagenet` (ImageNet's statistics, for an ImageNet-pretrained teacher), `computed` (per-channel
mean and std of the eval views of up to `stats_sample` training images, computed once and cached under
`cache_dir/stats/` with the data identity), or `{mean: [...], std: [...]}`.

Identity: `data_files()` lists every image with its path relative to `root` (so its split and class), and
`content_fingerprint()` hashes their sizes and mtimes (content hashes with `hash_content=true`); `source` is
`image_folder:<fingerprint prefix>`, so the teacher cache key (which holds the source) and the teacher-logit cache
key (`cache_identity()`, which also holds the transforms, size, channels and normalization) change when one
image is added, removed, edited or moved to another class.
"""

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from kd_lightning.checkpoints import atomic_torch_save, atomic_write_text
from kd_lightning.data.cifar import worker_loader_settings
from kd_lightning.data.datamodule import SPLITS, KDDataModule
from kd_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("auto", "imagenet", "computed", "{mean: [...], std: [...]}")


class UnreadableImageError(DataError):
    """An image file that cannot be decoded. Raised in a DataLoader worker, it is re-raised in the main process
    by torch as `type(err)(<"Caught ... in DataLoader worker" and the worker's traceback>)`: the constructor keeps
    only the one line this project wrote, so the entry point still prints one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught "):
            marker = f"{type(self).__name__}: "
            lines = [line for line in message.splitlines() if marker in line]
            if lines:
                message = lines[-1].split(marker, 1)[1]
        super().__init__(message)


# ---- decoding ---------------------------------------------------------------------------------------------------
def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grey, RGB, RGBA, LA, palette, CMYK and 16/32-bit integer or float images as `channels` (1: L, 3: RGB)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(float(values.max(initial=1.0)), 1.0) if values.max(initial=0) > 1 else 1.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):  # transparent pixels over white, as a viewer shows them
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def open_image(path: Path, channels: int) -> Image.Image:
    """The decoded image at `path` as `channels`; one UnreadableImageError line (file and reason) otherwise."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_channels(image, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UnreadableImageError(
            f"{path} cannot be decoded as an image ({reason}): delete or replace it "
            f"(data.verify_images=true checks every file before training)"
        ) from None


# ---- transforms ---------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """A config value (DictConfig/ListConfig, or already plain) as plain JSON-able Python."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_transforms(specs: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """Instantiate a list of transform configs (`{_target_: torchvision.transforms.v2.Resize, size: 256}`)."""
    if not isinstance(specs, Sequence) or isinstance(specs, str):
        raise ConfigError(f"data.{key}={specs!r} is not accepted: a list of transforms, "
                          f"e.g. [{{_target_: torchvision.transforms.v2.CenterCrop, size: 224}}]")
    transforms = []
    for spec in specs:
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ConfigError(f"data.{key}: {spec!r} is not accepted: each entry needs a _target_, "
                              f"e.g. torchvision.transforms.v2.RandomHorizontalFlip")
        try:
            transforms.append(instantiate(spec))
        except Exception as err:  # noqa: BLE001 - Hydra's error names the class; one line of it
            raise ConfigError(f"data.{key}: {spec['_target_']} cannot be built ({' '.join(str(err).split())[:300]})") from None
    return transforms


def eval_resize(transform_specs: Sequence[Mapping[str, Any]], image_size: int) -> int:
    """The size the eval pipeline resizes the shorter side to (its first Resize), else `image_size`."""
    for spec in transform_specs:
        if str(spec.get("_target_", "")).endswith(".Resize") and isinstance(spec.get("size"), int):
            return int(spec["size"])
    return image_size


# ---- datasets ------------------------------------------------------------------------------------------------
class ImageItems(Dataset):
    """Items `(normalize(transform(image)), label, i)` for the i-th `(path, label)` of a split; `i`, the position
    in the split, is the index batches carry (per-example caches are looked up by it). With `decoded` (a uint8
    [N, C, S, S] tensor of the split) the transforms run on its rows instead of on decoded files."""

    def __init__(self, items: Sequence[tuple[Path, int]], channels: int, transform: Any,
                 decoded: Tensor | None = None) -> None:
        self.items, self.channels, self.transform, self.decoded = list(items), channels, transform, decoded

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        path, label = self.items[i]
        image = self.decoded[i] if self.decoded is not None else open_image(path, self.channels)
        return self.transform(image), label, i


class ImageFolderDataModule(KDDataModule):
    name = "image_folder"
    num_classes: int = 0  # set by setup() from the folder
    hash_content: bool = False

    def __init__(
        self,
        root: str | Path | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        train_val_split: Sequence[float] = (0.8, 0.2),
        split_seed: int = 42,
        seed: int = 0,
        channels: int = 3,
        image_size: int = 224,
        train_transforms: Sequence[Mapping[str, Any]] | None = None,
        eval_transforms: Sequence[Mapping[str, Any]] | None = None,
        normalization: str | Mapping[str, Sequence[float]] = "computed",
        stats_sample: int = 1000,
        require_test: bool = False,
        verify_images: bool = False,
        hash_content: bool = False,
        cache_decoded: bool = False,
        cache_dir: str | Path | None = None,
        num_classes: int | None = None,  # the config's count (model configs read it); checked against the folder
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        if root is None or str(root).strip() == "":
            raise ConfigError("data.root=null is not accepted: give the image folder, data.root=DIR "
                              "(DIR/train/<class>/<images>, optional DIR/val and DIR/test)")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels!r} is not accepted: 1 (grey) or 3 (RGB)")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
            raise ConfigError(f"data.image_size={image_size!r} is not accepted: an integer >= 8 (pixels)")
        self.root = Path(root).expanduser()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_val_split = tuple(train_val_split)
        self.split_seed, self.seed = split_seed, seed
        self.channels, self.image_size = channels, image_size
        self.input_shape = (channels, image_size, image_size)
        default_train = [{"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": image_size},
                         {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}]
        default_eval = [{"_target_": "torchvision.transforms.v2.Resize", "size": round(image_size / 0.875)},
                        {"_target_": "torchvision.transforms.v2.CenterCrop", "size": image_size}]
        self.train_transform_specs = plain(train_transforms) if train_transforms is not None else default_train
        self.eval_transform_specs = plain(eval_transforms) if eval_transforms is not None else default_eval
        self.train_transforms = build_transforms(self.train_transform_specs, "train_transforms")
        self.eval_transforms = build_transforms(self.eval_transform_specs, "eval_transforms")
        # Training inputs are eval views (teacher logits cacheable) only when both pipelines are the same.
        self.random_augmentation = self.train_transform_specs != self.eval_transform_specs
        self.normalization = plain(normalization)
        self._check_normalization()
        self.stats_sample, self.require_test, self.verify_images = stats_sample, require_test, verify_images
        self.hash_content, self.cache_decoded = hash_content, cache_decoded
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".kd-cache"
        self.expected_classes = num_classes
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.source: str | None = None
        self.class_names: list[str] = []
        self.items: dict[str, list[tuple[Path, int]]] = {}
        self.cut: list[str] = []  # splits cut from train
        self._decoded: dict[str, Tensor] = {}

    def _check_normalization(self) -> None:
        n = self.normalization
        if n == "auto":  # train.py and saved runs resolve it (kd_lightning/config.py resolve_auto_normalization)
            raise ConfigError("data.normalization=auto is not accepted here: train.py resolves it from the teacher's "
                              "weights; give imagenet, computed or {mean: [...], std: [...]}")
        if n in ("imagenet", "computed"):
            if n == "imagenet" and self.channels != 3:
                raise ConfigError("data.normalization=imagenet is not accepted with data.channels=1: "
                                  "ImageNet statistics are per RGB channel; use computed")
            return
        if isinstance(n, Mapping) and set(n) == {"mean", "std"}:
            mean, std = list(n["mean"]), list(n["std"])
            if len(mean) == len(std) == self.channels and all(s > 0 for s in std):
                return
        raise ConfigError(f"data.normalization={n!r} is not accepted: one of {', '.join(NORMALIZATIONS)} "
                          f"(with {self.channels} values each, std > 0)")

    # ---- the folder ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.items:
            return
        train_dir = self.root / "train"
        if not self.root.is_dir():
            raise DataError(f"data.root={self.root} is not a folder: expected DIR/train/<class>/<images>")
        if not train_dir.is_dir():
            raise DataError(f"{train_dir} does not exist: data.root needs a train/ folder with one sub-folder per "
                            f"class (DIR/train/<class>/<images>)")
        self.class_names = class_folders(train_dir)
        if len(self.class_names) < 2:
            raise DataError(f"{train_dir} has {len(self.class_names)} class folder(s) "
                            f"({', '.join(self.class_names) or 'none'}): at least 2 are needed")
        if self.expected_classes is not None and self.expected_classes != len(self.class_names):
            raise ConfigError(f"data.num_classes={self.expected_classes} is not accepted: {train_dir} has "
                              f"{len(self.class_names)} class folders")
        self.num_classes = len(self.class_names)
        skipped: dict[str, int] = {}
        found = {split: self._scan_split(split, skipped) for split in SPLITS if (self.root / split).is_dir()}
        if skipped:
            log.info("Skipped %d file(s) of %s that are not images (%s)", sum(skipped.values()), self.root,
                     ", ".join(f"{n} {ext or 'without extension'}" for ext, n in sorted(skipped.items())))
        train = found["train"]
        if "test" not in found:
            if self.require_test:
                raise DataError(f"{self.root} has no test/ folder and data.require_test=true: add "
                                f"{self.root / 'test'}/<class>/<images>, or set data.require_test=false to cut "
                                f"test from train")
            log.warning("%s has no test/ folder: the test split is cut from train (a %.0f%% share, "
                        "data.split_seed=%d); put held-out images in %s/<class>/ for a real test split",
                        self.root, 100 * self.train_val_split[1], self.split_seed, self.root / "test")
            train, found["test"] = self._cut(train, "test")
            self.cut.append("test")
        if "val" not in found:
            train, found["val"] = self._cut(train, "val")
            self.cut.append("val")
        found["train"] = train
        self.items = found
        if self.verify_images:
            self._verify()
        self.source = f"{self.name}:{self.content_fingerprint()[:12]}"
        self.mean, self.std = self._statistics()
        log.info("%s: %d classes, %s images (train/val/test), normalized with mean %s std %s", self.root,
                 self.num_classes, "/".join(str(len(self.items[s])) for s in SPLITS),
                 [round(m, 4) for m in self.mean], [round(s, 4) for s in self.std])

    def _scan_split(self, split: str, skipped: dict[str, int]) -> list[tuple[Path, int]]:
        split_dir = self.root / split
        names = class_folders(split_dir)
        if not names:
            raise DataError(f"{split_dir} is an empty split: it needs one sub-folder per class with images, "
                            f"or remove it")
        if extra := [n for n in names if n not in self.class_names]:
            raise DataError(f"{split_dir / extra[0]} is a class folder that {self.root / 'train'} lacks: every class "
                            f"of {split}/ needs training images (train classes: {', '.join(self.class_names)})")
        items = []
        for name in names:
            files = image_files(split_dir / name, skipped)
            if not files:
                raise DataError(f"{split_dir / name} is an empty class folder (no images): add images or remove it")
            label = self.class_names.index(name)
            items.extend((path, label) for path in files)
        return items

    def _cut(self, items: list[tuple[Path, int]], split: str) -> tuple[list, list]:
        """Cut `split` off `items` with the train_val_split share, seeded by split_seed (as MNIST's split)."""
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_cut = int(round(self.train_val_split[1] * len(items)))
        if n_cut == 0 or n_cut == len(items):
            raise DataError(f"{self.root / 'train'} has {len(items)} images: too few to cut a {split} split of "
                            f"{self.train_val_split[1]:g} from (add images, or a {self.root / split}/ folder)")
        keep, cut = sorted(perm[n_cut:]), sorted(perm[:n_cut])
        return [items[i] for i in keep], [items[i] for i in cut]

    def _verify(self) -> None:
        bad = []
        for split in SPLITS:
            for path, _ in self.items[split]:
                try:
                    open_image(path, self.channels)
                except UnreadableImageError as err:
                    bad.append(str(err).split(": delete")[0])
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UnreadableImageError(f"{bad[0]}{more}: delete or replace it (data.verify_images=true)")
        log.info("Verified %d images of %s", sum(len(v) for v in self.items.values()), self.root)

    # ---- normalization --------------------------------------------------------------------------------------
    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        n = self.normalization
        if n == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        if isinstance(n, Mapping):
            return tuple(float(v) for v in n["mean"]), tuple(float(v) for v in n["std"])
        key = self._digest({"content": self.content_fingerprint(), "eval": self.eval_transform_specs,
                            "channels": self.channels, "stats_sample": self.stats_sample,
                            "split_seed": self.split_seed, "train_val_split": list(self.train_val_split),
                            "cut": self.cut})
        path = self.cache_dir / "stats" / f"{key}.json"
        try:
            stored = json.loads(path.read_text())
            return tuple(stored["mean"]), tuple(stored["std"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        train = self.items["train"]
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        sample = ImageItems([train[i] for i in sorted(perm[: self.stats_sample])], self.channels,
                            self._pipeline(self.eval_transforms, normalize=False))
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for x, _, _ in DataLoader(sample, batch_size=64, **self.loader_settings()):
            x = x.double()
            total += x.sum((0, 2, 3))
            squares += (x * x).sum((0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)
        stats = (tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std))
        atomic_write_text(path, json.dumps({"mean": stats[0], "std": stats[1], "images": len(sample)}))
        log.info("Computed the normalization of %s on %d training images: mean %s, std %s (cached in %s)",
                 self.root, len(sample), list(stats[0]), list(stats[1]), path)
        return stats

    @staticmethod
    def _digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ---- the KDDataModule contract -------------------------------------------------------------------------
    def data_files(self) -> list[tuple[str, Path]]:
        return sorted({(path.relative_to(self.root).as_posix(), path)
                       for split in SPLITS for path, _ in self.items[split]})

    def cache_identity(self) -> dict:
        return {
            **super().cache_identity(),
            "class_names": list(self.class_names),
            "cut": list(self.cut),
            "channels": self.channels,
            "image_size": self.image_size,
            "eval_transforms": self.eval_transform_specs,
            "train_transforms": self.train_transform_specs,
            "cache_decoded": self.cache_decoded,  # decoded tensors are resampled from a square: other pixels
        }

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self.items[split])

    def split_labels(self, split: str) -> Tensor:
        """The labels of `split` in dataset order, from the scanned folder (no image is decoded)."""
        self.check_split(split)
        return torch.tensor([label for _, label in self.items[split]], dtype=torch.long)

    def raw_images(self, split: str, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
        """The eval views (resized, centre-cropped) as uint8 [n, H, W] (grey) or [n, H, W, 3], with labels."""
        self.check_split(split)
        dataset = self._dataset(split, self._pipeline(self.eval_transforms, normalize=False, scale=False))
        images, labels = [], []
        for i in indices:
            x, y, _ = dataset[i]
            images.append(x.permute(1, 2, 0).squeeze(-1) if self.channels == 1 else x.permute(1, 2, 0))
            labels.append(y)
        return torch.stack(images).to(torch.uint8), torch.tensor(labels, dtype=torch.long)

    # ---- pipelines and loaders -----------------------------------------------------------------------------
    def _pipeline(self, transforms: list[Any], normalize: bool = True, scale: bool = True) -> v2.Compose:
        steps = [*transforms, v2.ToImage()]
        if scale:
            steps.append(v2.ToDtype(torch.float32, scale=True))
        if normalize:
            steps.append(v2.Normalize(list(self.mean), list(self.std)))
        return v2.Compose(steps)

    def _dataset(self, split: str, transform: Any) -> ImageItems:
        decoded = self._decoded_split(split) if self.cache_decoded else None
        return ImageItems(self.items[split], self.channels, transform, decoded)

    def _decoded_split(self, split: str) -> Tensor:
        """The split's images decoded once (shorter side to the eval resize, centre-cropped square), as uint8
        [N, C, S, S], from `cache_dir/decoded/<identity>.pt` or decoded now and stored there."""
        if split in self._decoded:
            return self._decoded[split]
        size = eval_resize(self.eval_transform_specs, self.image_size)
        key = self._digest({"content": self.content_fingerprint(), "channels": self.channels, "size": size,
                            "split": split, "files": [p.relative_to(self.root).as_posix() for p, _ in self.items[split]]})
        path = self.cache_dir / "decoded" / f"{split}-{key}.pt"
        tensor = None
        if path.is_file():
            try:
                tensor = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a damaged cache file is decoded again
                log.warning("Decoded-image cache %s is unreadable (%s): decoding again", path, type(err).__name__)
            if tensor is not None and tuple(tensor.shape) != (len(self.items[split]), self.channels, size, size):
                tensor = None
        if tensor is None:
            square = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.ToImage()])
            dataset = ImageItems(self.items[split], self.channels, square)
            loader = DataLoader(dataset, batch_size=64, **self.loader_settings())
            tensor = torch.empty(len(dataset), self.channels, size, size, dtype=torch.uint8)
            for x, _, idx in loader:
                tensor[idx] = x
            atomic_torch_save(tensor, path)
            log.info("Decoded the %s split (%d images) into %s", split, len(tensor), path)
        self._decoded[split] = tensor
        return tensor

    def loader_settings(self) -> dict[str, Any]:
        return worker_loader_settings(self)  # as CIFAR's: every available core, shared by the machine's processes

    def _loader(self, dataset: Dataset, batch_size: int, train: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train and len(dataset) > batch_size,  # no ragged last batch (batch norm); a tiny set keeps one
            **self.loader_settings(),
        )

    def eval_loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """`split` in dataset order, through the eval pipeline (for teacher-logit caches and influence)."""
        self.check_split(split)
        return self._loader(self._dataset(split, self._pipeline(self.eval_transforms)), batch_size or self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", self._pipeline(self.train_transforms)), self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

    # ---- what checkpoints keep (Lightning stores a DataModule's state_dict in every checkpoint) ------------
    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels, "image_size": self.image_size,
                "eval_transforms": self.eval_transform_specs, "source": self.source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("class_names")
        if stored is not None and self.class_names and list(stored) != self.class_names:
            raise DataError(f"the checkpoint was trained on the classes {stored}, but {self.root / 'train'} has "
                            f"{self.class_names}: resume on the same folder")


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the non-hidden sub-folders of `split_dir`."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path, skipped: dict[str, int]) -> list[Path]:
    """The image files under `class_dir` (nested folders included), sorted; dotfiles and dot-folders are skipped,
    other non-images counted in `skipped` by extension."""
    files = []
    for path in sorted(class_dir.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(class_dir).parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        else:
            skipped[path.suffix.lower()] = skipped.get(path.suffix.lower(), 0) + 1
    return files


def folder_num_classes(root: Any) -> int | None:
    """The number of class folders in `root/train` (the `${kd_folder_classes:${data.root}}` resolver), None when
    it cannot be read yet: the DataModule then reports the folder's problem in its own line."""
    try:
        return len(class_folders(Path(str(root)).expanduser() / "train")) if root else None
    except OSError:
        return None
