"""Images per second of `data=image_folder`'s training loader against torchvision's `datasets.ImageFolder`:
`python -m kd_lightning.bench --data image_folder --data-root DIR [--image-size 224] [--workers N]`.

On the same folder and with the same transforms and DataLoader settings (batch size, workers, shuffling), it times
full passes over the training split after one warm-up pass, for
  (1) ImageFolderDataModule as configured (decoded with Pillow in the workers),
  (2) the same with `cache_decoded=true` (each image decoded and resized once into a uint8 tensor file),
  (3) torchvision's `datasets.ImageFolder` over DIR/train with the same train transforms,
and prints images/s for each, best of `--repeats`. Without `--data-root`, `--fake N` writes N JPEG images
(320x240) of 10 classes into a temporary folder first.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from kd_lightning.data.image_folder import ImageFolderDataModule


def write_fake_folder(root: Path, n: int, classes: int = 10, size: tuple[int, int] = (320, 240)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % classes
        base = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)  # smooth-ish content
        image = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        path = root / "train" / f"class_{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return root


def images_per_second(loader: DataLoader, repeats: int) -> float:
    for _ in loader:  # warm-up: workers started, files in the page cache
        pass
    best = 0.0
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch[0])
        best = max(best, n / (time.perf_counter() - start))
    return best


def run(args: argparse.Namespace) -> dict[str, float]:
    root = Path(args.data_root) if args.data_root else write_fake_folder(Path(tempfile.mkdtemp()) / "images", args.fake)
    settings = {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": args.workers,
                "normalization": "imagenet", "cache_dir": Path(tempfile.mkdtemp()), "persistent_workers": True}
    results = {}
    for name, extra in (("image_folder", {}), ("image_folder, cache_decoded", {"cache_decoded": True})):
        dm = ImageFolderDataModule(root, **settings, **extra)
        dm.setup()
        results[name] = images_per_second(dm.train_dataloader(), args.repeats)
        workers = dm.loader_settings()["num_workers"]
    # torchvision's ImageFolder on train/ with the same transforms (ImageFolder reads RGB with Pillow)
    transform = v2.Compose([*dm.train_transforms, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(dm.mean), list(dm.std))])
    reference = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(reference, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    results["torchvision ImageFolder"] = images_per_second(loader, args.repeats)
    print(f"{root}: {dm.split_size('train')} training images, {args.image_size}px, batch {args.batch_size}, "
          f"{workers} workers, best of {args.repeats} passes")
    for name, value in results.items():
        ratio = value / results["torchvision ImageFolder"]
        print(f"  {name:<30} {value:9.1f} images/s  ({ratio:.2f}x torchvision's ImageFolder)")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="mnist", choices=["mnist", "image_folder"],
                        help="image_folder: time data=image_folder's loader against torchvision's ImageFolder")
    parser.add_argument("--data-root", default=None, help="with --data image_folder: DIR (DIR/train/<class>/...)")
    parser.add_argument("--fake", type=int, default=2000, help="without --data-root: JPEG images to write first")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the data default)")
