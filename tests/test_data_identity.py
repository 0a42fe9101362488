"""Issue 25 item 4: the data's content is part of its identity. Other images of the same count and shape in a
split's files train another teacher and rebuild the teacher logits; the content hashes are memoized by path,
size and mtime, and the memo is only ever a speed-up."""

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from torch import nn

from fake_data import write_cifar10, write_idx, write_mnist
from kd_lightning.checkpoints import load_net
from kd_lightning.config import compose_train_config
from kd_lightning.data import CIFAR10DataModule, MNISTDataModule, fingerprint
from kd_lightning.data.mnist import load_mnist_sample
from kd_lightning.teacher import TeacherCache, cached_teacher_logits, compose_teacher_config, compute_teacher_logits
from kd_lightning.train import train

PAST = time.time() - 3600  # an mtime older than fingerprint.RACY_S: the file may be memoized


@pytest.fixture
def memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "memo" / "fingerprints.json"
    monkeypatch.setenv("KD_FINGERPRINT_MEMO", str(path))
    return path


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose content fingerprint.file_sha256 reads, in order."""
    calls: list[Path] = []
    real = fingerprint.file_sha256

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(fingerprint, "file_sha256", counting)
    return calls


def old_files(folder: Path, contents: dict[str, bytes]) -> list[tuple[str, Path]]:
    """Files written an hour ago (mtime set back), as `(name, path)` pairs."""
    files = []
    for name, data in contents.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (PAST, PAST))
        files.append((name, path))
    return files


# ---- the fingerprint and its memo ---------------------------------------------------------------------------
def test_memo_avoids_hashing_again(tmp_path: Path, memo: Path, hashed: list[Path]) -> None:
    files = old_files(tmp_path / "data", {"a": b"x" * 1000, "b": b"y" * 10})
    first = fingerprint.files_digest(files)
    assert sorted(hashed) == sorted(p for _, p in files) and memo.is_file()
    hashed.clear()
    assert fingerprint.files_digest(files) == first
    assert hashed == []  # every file was found in the memo by path, size and mtime


def test_an_edit_of_the_same_size_is_hashed_again(tmp_path: Path, memo: Path, hashed: list[Path]) -> None:
    files = old_files(tmp_path / "data", {"a": b"x" * 1000, "b": b"y" * 10})
    first = fingerprint.files_digest(files)
    hashed.clear()
    (tmp_path / "data" / "a").write_bytes(b"z" * 1000)  # same size, new content (and mtime)
    second = fingerprint.files_digest(files)
    assert hashed == [tmp_path / "data" / "a"] and second != first
    (tmp_path / "data" / "a").write_bytes(b"x" * 1000)
    assert fingerprint.files_digest(files) == first  # the digest is of the content, not of the stamps


def test_a_file_modified_just_now_is_not_memoized(tmp_path: Path, memo: Path, hashed: list[Path]) -> None:
    """A second edit within the file system's timestamp granularity could keep the size and the mtime: a file
    younger than RACY_S is hashed on every run until it is older."""
    path = tmp_path / "data" / "a"
    path.parent.mkdir()
    path.write_bytes(b"x" * 100)
    fingerprint.files_digest([("a", path)])
    fingerprint.files_digest([("a", path)])
    assert hashed == [path, path]
    os.utime(path, (PAST, PAST))
    fingerprint.files_digest([("a", path)])
    fingerprint.files_digest([("a", path)])
    assert len(hashed) == 3


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"/x": 5}', b""])
def test_a_damaged_memo_only_costs_a_hash(tmp_path: Path, memo: Path, hashed: list[Path], damage: bytes) -> None:
    files = old_files(tmp_path / "data", {"a": b"x" * 1000})
    expected = fingerprint.files_digest(files)
    memo.write_bytes(damage if damage != b'{"/x": 5}' else json.dumps({str(files[0][1].resolve()): 5}).encode())
    hashed.clear()
    assert fingerprint.files_digest(files) == expected and len(hashed) == 1
    hashed.clear()
    assert fingerprint.files_digest(files) == expected and hashed == []  # the memo was rewritten whole


def test_a_memo_entry_with_a_wrong_hash_is_not_caught_but_a_new_stamp_is(tmp_path: Path, memo: Path) -> None:
    """The memo is trusted for a file whose size and mtime it records (that is what it is for); any change
    of either makes it hash the file again."""
    files = old_files(tmp_path / "data", {"a": b"x" * 1000})
    expected = fingerprint.files_digest(files)
    stored = json.loads(memo.read_text())
    (key,) = stored
    stored[key][1] += 1  # another mtime: the entry does not match the file
    stored[key][2] = "0" * 64
    memo.write_text(json.dumps(stored))
    assert fingerprint.files_digest(files) == expected


def test_an_unwritable_memo_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            hashed: list[Path]) -> None:
    files = old_files(tmp_path / "data", {"a": b"x" * 1000})
    monkeypatch.setenv("KD_FINGERPRINT_MEMO", str(tmp_path / "m1.json"))
    expected = fingerprint.files_digest(files)

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("KD_FINGERPRINT_MEMO", str(blocker / "fingerprints.json"))  # its parent is a file
    hashed.clear()
    assert fingerprint.files_digest(files) == expected and len(hashed) == 1

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "m2.json"))

    monkeypatch.setenv("KD_FINGERPRINT_MEMO", str(tmp_path / "m2.json"))
    monkeypatch.setattr(fingerprint, "atomic_write_text", read_only)
    assert fingerprint.files_digest(files) == expected
    assert not (tmp_path / "m2.json").exists()


# ---- MNIST (IDX files): the teacher and its logits follow the content ---------------------------------------
def swap_mnist_test_images(root: Path, n_train: int, n_test: int) -> None:
    """Replace the test images by other real digits of the same count and shape (the labels stay)."""
    images, _ = load_mnist_sample()
    others = images.numpy()[-n_test:]
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    before = path.stat().st_size
    write_idx(path, others)
    assert path.stat().st_size == before


def small_mnist(root: Path) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=root, download=False, eval_batch_size=64)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def save_teacher(path: Path, seed: int = 0) -> nn.Module:
    from kd_lightning.models import MnistCNN

    torch.manual_seed(seed)
    teacher = MnistCNN().eval()
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()},
                "net_config": {"_target_": "kd_lightning.models.MnistCNN"}}, path)
    return teacher


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_swapped_mnist_images_change_the_identity_and_rebuild_the_logits(
        tmp_path: Path, memo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    root = write_mnist(tmp_path / "data", n_train=200, n_test=60)
    before = small_mnist(root)
    assert before.source == "mnist"
    teacher = save_teacher(tmp_path / "t.ckpt")
    cached_teacher_logits(tmp_path / "t.ckpt", teacher, before, tmp_path / "cache")

    swap_mnist_test_images(root, 200, 60)
    after = small_mnist(root)
    assert after.split_size("test") == before.split_size("test")
    assert not torch.equal(after.raw_images("test", range(60))[0], before.raw_images("test", range(60))[0])
    assert after.cache_identity()["content"] != before.cache_identity()["content"]
    assert {k: v for k, v in after.cache_identity().items() if k != "content"} == \
           {k: v for k, v in before.cache_identity().items() if k != "content"}  # only the content tells them apart

    # The same teacher checkpoint on the new files: the logits are computed again, and are the teacher's now.
    caplog.clear()
    logits = cached_teacher_logits(tmp_path / "t.ckpt", teacher, after, tmp_path / "cache")
    assert "Using cached teacher logits" not in caplog.text and "Computing the teacher's logits" in caplog.text
    for split in ("train", "val", "test"):
        torch.testing.assert_close(logits[split], compute_teacher_logits(teacher, after.eval_loader(split)))
    assert len(list((tmp_path / "cache" / "logits").glob("*.pt"))) == 2

    # The teacher cache: another entry for the other content, the same for the same.
    tcfg = compose_teacher_config(compose_train_config(["experiment=soft"]))
    key_before = TeacherCache(tmp_path, tcfg, before.source, before.content_fingerprint()).key
    key_after = TeacherCache(tmp_path, tcfg, after.source, after.content_fingerprint()).key
    assert key_before != key_after
    assert TeacherCache(tmp_path, tcfg, after.source, small_mnist(root).content_fingerprint()).key == key_after


def tiny_run(tmp_path: Path, name: str) -> dict:
    teacher = ",".join(f"'{o}'" for o in ("model=mlp_784_20_20_10", "trainer.max_epochs=1",
                                          "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"))
    cfg = compose_train_config([
        "experiment=soft", "model=mlp_784_20_20_10", f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / name}", "data.download=false",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2", "distill.cache_teacher_logits=true",
        f"teacher.overrides=[{teacher}]",
    ])
    return train(cfg)


@pytest.mark.slow  # three small distillation runs with their teachers, in-process
def test_swapped_mnist_images_train_another_teacher_end_to_end(
        tmp_path: Path, memo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 25.4 as reported: replacing a split's files by other images of the same count gave "Using cached
    teacher logits" and the old logits. Now the teacher is trained again, its logits computed again, and the
    cached logits are the new teacher's outputs on the new images."""
    caplog.set_level(logging.INFO)
    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    first = tiny_run(tmp_path, "a")
    caplog.clear()
    again = tiny_run(tmp_path, "b")  # nothing changed: both caches are used
    assert "Using the cached teacher" in caplog.text and "Using cached teacher logits" in caplog.text
    assert again["teacher_ckpt"] == first["teacher_ckpt"]

    swap_mnist_test_images(root, 300, 100)
    caplog.clear()
    swapped = tiny_run(tmp_path, "c")
    assert "Using the cached teacher" not in caplog.text and "Training the teacher" in caplog.text
    assert "Using cached teacher logits" not in caplog.text and "Computing the teacher's logits" in caplog.text
    assert Path(swapped["teacher_ckpt"]).parent != Path(first["teacher_ckpt"]).parent

    dm = small_mnist(root)
    teacher = load_net(swapped["teacher_ckpt"])
    caplog.clear()
    logits = cached_teacher_logits(Path(swapped["teacher_ckpt"]), teacher, dm, tmp_path / "logs" / "teachers")
    assert "Using cached teacher logits" in caplog.text  # the entry the run wrote
    for split in ("train", "val", "test"):
        torch.testing.assert_close(logits[split], compute_teacher_logits(teacher, dm.eval_loader(split)))


# ---- CIFAR (pickled batches) ---------------------------------------------------------------------------------
class TinyColourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_swapped_cifar_test_batch_changes_the_identity_and_rebuilds_the_logits(
        tmp_path: Path, cifar_root: Path, memo: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    def datamodule() -> CIFAR10DataModule:
        dm = CIFAR10DataModule(data_dir=cifar_root, download=False, num_workers=0, eval_batch_size=8)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    before = datamodule()
    torch.manual_seed(0)
    teacher = TinyColourNet().eval()
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes(b"a teacher checkpoint: the cache keys on its sha256")
    cached_teacher_logits(ckpt, teacher, before, tmp_path / "cache")

    # Other random images of the same shape in test_batch (written with another seed), md5 given to torchvision.
    other = write_cifar10(tmp_path / "other", 50, 20, seed=1)
    shutil.copyfile(tmp_path / "other" / "cifar-10-batches-py" / "test_batch",
                    cifar_root / "cifar-10-batches-py" / "test_batch")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", other["test_list"])
    after = datamodule()
    assert not np.array_equal(after.raw_images("test", range(20))[0], before.raw_images("test", range(20))[0])
    assert after.cache_identity()["content"] != before.cache_identity()["content"]

    caplog.clear()
    logits = cached_teacher_logits(ckpt, teacher, after, tmp_path / "cache")
    assert "Using cached teacher logits" not in caplog.text
    assert set(logits) == {"val", "test"}  # CIFAR's training inputs are augmented: the teacher runs online there
    for split in logits:
        torch.testing.assert_close(logits[split], compute_teacher_logits(teacher, after.eval_loader(split)))
