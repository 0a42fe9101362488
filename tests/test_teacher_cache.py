"""The teacher-logit cache: rows aligned with dataset indices under shuffling, identical losses and gradients,
rebuilt when the teacher or the data changes."""

from functools import partial
from pathlib import Path

import pytest
import torch

from kd_lightning.data import MNISTDataModule
from kd_lightning.models import MLP, MnistCNN
from kd_lightning.modules import DistillModule
from kd_lightning.teacher import cached_teacher_logits


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


def test_no_train_cache_with_random_augmentation(tmp_path: Path, datamodule: MNISTDataModule,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datamodule, "random_augmentation", True)
    teacher = save_teacher(tmp_path / "t.ckpt", 0)
    assert set(cached_teacher_logits(tmp_path / "t.ckpt", teacher, datamodule, tmp_path / "cache")) == {"val", "test"}
