"""The teacher-logit cache: rows aligned with dataset indices under shuffling, identical losses and gradients,
rebuilt when the teacher or the data changes, or when the file is damaged or not what it claims."""

import logging
from functools import partial
from pathlib import Path

import pytest
import torch

from kd_lightning.data import MNISTDataModule
from kd_lightning.models import MLP, MnistCNN
from kd_lightning.modules import DistillModule
from kd_lightning.teacher import cached_teacher_logits, tensor_sha256


def save_teacher(path: Path, seed: int) -> MnistCNN:
    torch.manual_seed(seed)
    teacher = MnistCNN().eval()
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()},
                "net_config": {"_target_": "kd_lightning.models.MnistCNN"}}, path)
    return teacher


@pytest.fixture(scope="module")
def datamodule() -> MNISTDataModule:
    dm = MNISTDataModule(data_dir="/nonexistent", download=False, seed=3)  # the offline sample
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.slow  # a teacher over the whole sample
def test_cached_rows_match_the_teacher_under_shuffling(tmp_path: Path, datamodule: MNISTDataModule) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt", 0)
    cache = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    assert set(cache) == {"train", "val", "test"}
    assert cache["train"].shape == (len(datamodule.splits["train"][1]), 10)
    loader = datamodule.train_dataloader()
    seen = 0
    with torch.no_grad():
        for x, _, idx in loader:
            assert not torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))  # really shuffled
            torch.testing.assert_close(cache["train"][idx], teacher(x), rtol=1e-5, atol=1e-5)
            seen += len(idx)
            if seen > 500:
                break
        x, _, idx = next(iter(datamodule.val_dataloader()))
        torch.testing.assert_close(cache["val"][idx], teacher(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", ["soft", "hard_soft"])
@pytest.mark.slow  # full runs online and cached
def test_losses_and_gradients_equal_online(tmp_path: Path, datamodule: MNISTDataModule, group: str) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt", 0)
    cache = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    torch.manual_seed(1)
    student = MLP([16])
    online = DistillModule(student, teacher, optimizer=partial(torch.optim.Adam), group=group, T=4.0, alpha=0.3)
    cached = DistillModule(student, teacher, optimizer=partial(torch.optim.Adam), group=group, T=4.0, alpha=0.3)
    cached.use_cached_teacher_logits(cache)
    for x, y, idx in list(datamodule.train_dataloader())[:3]:
        losses, grads = [], []
        for module in (online, cached):
            student.zero_grad()
            terms = module.loss_fn(student(x), module.teacher_soft_targets(x, idx), y, module.T, module.alpha)
            terms["loss"].backward()
            losses.append(terms["loss"].detach())
            grads.append([p.grad.clone() for p in student.parameters()])
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for g_online, g_cached in zip(*grads):
            torch.testing.assert_close(g_online, g_cached, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # several full runs
def test_cache_is_reused_and_rebuilt_when_teacher_or_data_change(tmp_path: Path, datamodule: MNISTDataModule) -> None:
    cache_dir = tmp_path / "cache"
    teacher = save_teacher(tmp_path / "t.ckpt", 0)
    first = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, cache_dir)
    (path,) = (cache_dir / "logits").glob("*.pt")
    stamp = path.stat().st_mtime_ns
    again = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, cache_dir)
    assert path.stat().st_mtime_ns == stamp and torch.equal(first["train"], again["train"])

    other = save_teacher(tmp_path / "t.ckpt", 1)  # same path, new content
    rebuilt = cached_teacher_logits(tmp_path / "t.ckpt", other, datamodule, cache_dir)
    assert len(list((cache_dir / "logits").glob("*.pt"))) == 2
    assert not torch.allclose(rebuilt["train"], first["train"])

    resplit = MNISTDataModule(data_dir="/nonexistent", download=False, train_val_split=(0.5, 0.5))
    resplit.prepare_data()
    resplit.setup("fit")
    cached_teacher_logits(tmp_path / "t.ckpt", other, resplit, cache_dir)
    assert len(list((cache_dir / "logits").glob("*.pt"))) == 3


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_no_train_cache_with_random_augmentation(tmp_path: Path, datamodule: MNISTDataModule,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datamodule, "random_augmentation", True)
    teacher = save_teacher(tmp_path / "t.ckpt", 0)
    assert set(cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")) == {"val", "test"}


def damage(path: Path, how: str) -> None:
    """Replace a logit cache by what a bug, a full disk or a user could leave there."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    cached = torch.load(path, weights_only=True)
    if how == "plain_random":  # the old format: {split: logits}, random values of the right shape
        torch.save({s: torch.randn_like(t) for s, t in cached["logits"].items()}, path)
        return
    if how == "random_with_valid_checksums":
        cached["logits"] = {s: torch.randn_like(t) for s, t in cached["logits"].items()}
    elif how == "wrong_shape":
        cached["logits"]["train"] = cached["logits"]["train"][:-5]
    elif how == "other_teacher":
        cached["teacher_sha256"] = "0" * 64
    for split, logits in cached["logits"].items():
        cached["checks"][split] = {"shape": list(logits.shape), "dtype": str(logits.dtype), "sha256": tensor_sha256(logits)}
    torch.save(cached, path)


@pytest.mark.parametrize("how", ["truncated", "plain_random", "random_with_valid_checksums", "wrong_shape",
                                 "other_teacher"])
def test_a_damaged_or_foreign_logit_cache_is_named_and_rebuilt(tmp_path: Path, datamodule: MNISTDataModule,
                                                                caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Issue 11 item 5: what identifies and checks the cache is stored and verified on every load."""
    torch.manual_seed(0)
    teacher = MLP([16]).eval()  # small: the cache is built twice
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "t.ckpt")
    first = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "logits").glob("*.pt")
    damage(path, how)
    caplog.set_level(logging.INFO)
    again = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"Teacher-logit cache {path} ")
    assert warnings[0].endswith(": computing it again") and "\n" not in warnings[0]
    for split in ("train", "val", "test"):
        torch.testing.assert_close(again[split], first[split])
    caplog.clear()
    cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")  # the rebuilt file is good
    assert "Using cached teacher logits" in caplog.text and "computing it again" not in caplog.text


def disk_full_after(n_bytes: int):
    """A writer that puts `n_bytes` into its file, then fails as a full disk does."""
    import errno

    def write(_obj_or_src, dst, *args, **kwargs) -> None:
        if hasattr(dst, "write"):  # torch.save into an open file (kd_lightning.checkpoints' atomic writer)
            dst.write(b"x" * n_bytes)
        else:
            with open(dst, "wb") as out:
                out.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_a_failed_logit_cache_write_leaves_no_file(tmp_path: Path, datamodule: MNISTDataModule,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The disk fills while the logit cache is written: no file and no temporary stay, the next run computes it."""
    torch.manual_seed(0)
    teacher = MLP([16]).eval()
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "t.ckpt")
    monkeypatch.setattr(torch, "save", disk_full_after(1000))
    with pytest.raises(OSError, match="No space left"):
        cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "cache" / "logits").iterdir() if not p.name.endswith(".lock")] == []
    caplog.set_level(logging.INFO)
    logits = cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")
    assert "Computing the teacher's logits" in caplog.text and "computing it again" not in caplog.text
    torch.testing.assert_close(logits["test"], teacher(datamodule.normalize(datamodule.splits["test"][0].float())))


@pytest.mark.parametrize("failing", ["teacher.ckpt", "teacher.json"])
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_failed_teacher_store_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """TeacherCache.store on a full disk, while copying the checkpoint or writing the record: the entry does not
    verify (nothing half-written is reused), no temporary file stays, and a later store completes it."""
    import shutil

    from kd_lightning.config import compose_train_config
    from kd_lightning.teacher import TeacherCache, compose_teacher_config

    cache = TeacherCache(tmp_path / "cache", compose_teacher_config(compose_train_config(["experiment=soft"])), "mnist")
    best = save_teacher(tmp_path / "best.ckpt", seed=0) and tmp_path / "best.ckpt"
    if failing == "teacher.ckpt":
        monkeypatch.setattr(shutil, "copyfile", disk_full_after(1000))
    else:
        write = disk_full_after(10)
        monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: write(text, self))
    with pytest.raises(OSError, match="No space left"):
        cache.store(best)
    monkeypatch.undo()
    assert not cache.record.exists()
    assert not [p for p in cache.dir.iterdir() if p.name.endswith(".tmp")]
    assert not cache.verified()  # an unfinished entry is removed, to be trained again
    cache.store(best)
    assert cache.verified()
