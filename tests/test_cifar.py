"""CIFAR: fake pickled batches read through torchvision, the ResNets, the configs, and cifar10_soft via train.py."""

import json
import os
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision.datasets
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.data import random_split

from fake_data import write_checksum_sitecustomize, write_cifar10
from helpers import ROOT, run_script
from kd_lightning.callbacks import ChannelsLast
from kd_lightning.config import compose_train_config
from kd_lightning.data import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from kd_lightning.errors import ConfigError, DataError
from kd_lightning.models import CifarResNet
from kd_lightning.models.stats import mult_adds, table
from kd_lightning.modules import ClassifierModule, DistillModule

N_TRAIN, N_TEST = 50, 20  # per dataset, as conftest's cifar_root writes them; split 45 train / 5 val


def make(dm_cls: type[CIFARDataModule], root: Path, **kwargs) -> CIFARDataModule:
    dm = dm_cls(data_dir=root, **{"download": False, "num_workers": 0, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def read_file(root: Path, dm_cls: type[CIFARDataModule], train: bool) -> tuple[Tensor, Tensor]:
    """Images (uint8 N x 3 x 32 x 32) and labels of the official train or test file, unpickled directly."""
    cls = dm_cls.dataset_cls
    entries = []
    for name, _ in cls.train_list if train else cls.test_list:
        with open(root / cls.base_folder / name, "rb") as f:
            entries.append(pickle.load(f, encoding="latin1"))
    images = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
    labels = [label for e in entries for label in e.get("labels", e.get("fine_labels"))]
    return torch.from_numpy(images), torch.tensor(labels)


def normalized(images: Tensor, dm: CIFARDataModule) -> Tensor:
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


# ---- data --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dm_cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_reads_pickled_batches_through_torchvision(cifar_root: Path, dm_cls: type[CIFARDataModule]) -> None:
    dm = make(dm_cls, cifar_root, batch_size=8, eval_batch_size=100)
    assert dm.source == dm.name and dm.num_classes == {"cifar10": 10, "cifar100": 100}[dm.name]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 45, "val": 5, "test": N_TEST}
    images, labels = read_file(cifar_root, dm_cls, train=True)
    train_idx, val_idx = random_split(range(N_TRAIN), [0.9, 0.1], generator=torch.Generator().manual_seed(42))

    x, y, idx = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(idx, torch.arange(5))
    torch.testing.assert_close(x, normalized(images[list(val_idx)], dm))
    assert torch.equal(y, labels[list(val_idx)])  # CIFAR-100: the fine labels

    test_images, test_labels = read_file(cifar_root, dm_cls, train=False)
    x, y, idx = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x, normalized(test_images, dm))
    assert torch.equal(y, test_labels)

    seen = torch.cat([torch.cat([y for _, y, _ in dm.eval_loader(split)]) for split in ("train", "val", "test")])
    assert 0 <= seen.min() and seen.max() < dm.num_classes
    if dm.num_classes == 10:
        assert set(seen.tolist()) == set(range(10))
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 45 // 8 and all(x.shape == (8, 3, 32, 32) for x, _, _ in train_batches)
    assert all(torch.equal(y, labels[list(train_idx)][i]) for _, y, i in train_batches)


def test_val_split_not_augmented_train_split_is(cifar_root: Path) -> None:
    dm = make(CIFAR10DataModule, cifar_root)
    images, _ = read_file(cifar_root, CIFAR10DataModule, train=True)
    train_idx, val_idx = (list(s) for s in random_split(range(N_TRAIN), [0.9, 0.1], generator=torch.Generator().manual_seed(42)))
    torch.testing.assert_close(dm.splits["val"][3][0], normalized(images[val_idx[3]], dm))  # eval_loader("val")
    torch.testing.assert_close(dm.splits["train"][7][0], normalized(images[train_idx[7]], dm))  # eval_loader("train")

    # The augmented view of the same example: crops of the zero-padded image (32 of 40), flipped or not.
    padded = F.pad(images[train_idx[7]], (4, 4, 4, 4))
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    candidates = torch.stack([normalized(c, dm) for crop in crops for c in (crop, crop.flip(-1))])
    torch.manual_seed(0)
    draws = [dm.train_set[7][0] for _ in range(10)]
    for draw in draws:
        assert (draw - candidates).abs().amax(dim=(1, 2, 3)).min() < 1e-5
    assert any(not torch.equal(draw, draws[0]) for draw in draws[1:])
    assert dm.train_set[7][1:] == dm.splits["train"][7][1:]  # same label, same index


def test_shuffle_order_follows_seed(cifar_root: Path) -> None:
    def order(seed: int) -> list[int]:
        return torch.cat([i for _, _, i in make(CIFAR10DataModule, cifar_root, batch_size=8, seed=seed).train_dataloader()]).tolist()

    assert order(1) == order(1) != order(2)
    assert len(set(order(1))) == 40 and set(order(1)) <= set(range(45))  # 5 batches of 8, no repeats


def test_loader_workers(cifar_root: Path) -> None:
    dm = make(CIFAR10DataModule, cifar_root, num_workers=None, eval_batch_size=4)
    settings = dm.loader_settings()
    assert settings["num_workers"] >= 1 and settings["persistent_workers"]
    assert settings["pin_memory"] == torch.cuda.is_available()
    with_workers = [b for b in dm.eval_loader("val")]
    without = [b for b in make(CIFAR10DataModule, cifar_root, eval_batch_size=4).eval_loader("val")]
    assert len(with_workers) == 2
    for a, b in zip(with_workers, without):
        assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_missing_data_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make(CIFAR10DataModule, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"data_dir={tmp_path}" in message and "download disabled (data.download=false)" in message
    expected = "cifar-10-batches-py/ with data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta"
    assert expected in message
    with pytest.raises(FileNotFoundError, match=r"data_dir=.* expected cifar-100-python/ with train, test, meta"):
        make(CIFAR100DataModule, tmp_path)


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self) -> None:
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: no route to host")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", fail)
    with pytest.raises(FileNotFoundError, match=r"no route to host.*missing: data_batch_1, .*, batches\.meta"):
        make(CIFAR10DataModule, tmp_path, download=True)


def test_files_failing_the_md5_check_are_an_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path, N_TRAIN, N_TEST)  # the fake files, without their md5 sums given to torchvision
    first = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError, match=rf"^{first} is corrupt or truncated \(fails torchvision's md5 check\): "
                                        r"delete it"):
        make(CIFAR10DataModule, tmp_path)


def test_num_classes_must_match_the_dataset() -> None:
    with pytest.raises(ConfigError, match=r"^data.num_classes=10 is not accepted: cifar100 has 100"):
        CIFAR100DataModule(num_classes=10)


# ---- models ------------------------------------------------------------------------------------------------------
def resnet_params(blocks: list[int], num_classes: int) -> int:
    """Parameters of a CIFAR ResNet of BasicBlocks, stage widths 64, 128, ...: a 3x3 stem conv and batch norm
    (weight and bias per channel); per block two 3x3 convs and two batch norms, plus a 1x1 conv and batch norm
    where the width changes; a linear head on the last stage's width."""
    total, width = 3 * 9 * 64 + 2 * 64, 64
    for stage, n in enumerate(blocks):
        out = 64 * 2**stage
        for b in range(n):
            inp = width if b == 0 else out
            total += inp * 9 * out + 2 * out + out * 9 * out + 2 * out
            if inp != out:
                total += inp * out + 2 * out
        width = out
    return total + width * num_classes + num_classes


def build(model: str, data: str) -> nn.Module:
    return instantiate(compose_train_config([f"model={model}", f"data={data}"]).model)


def test_resnet_params_formula_gives_the_known_sizes() -> None:
    assert resnet_params([3, 4, 6, 3], 10) == 21_282_122  # ResNet34 for CIFAR-10, as published (21.28 M)
    assert resnet_params([2, 2, 2, 2], 10) == 11_173_962  # ResNet18 for CIFAR-10 (11.17 M)


@pytest.mark.parametrize(
    ("model", "blocks"),
    [("cifar_resnet34", [3, 4, 6, 3]), ("cifar_resnet34_2stage", [3, 4]), ("cifar_resnet18", [2, 2, 2, 2])],
)
@pytest.mark.parametrize(("data", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_parameter_counts(model: str, blocks: list[int], data: str, num_classes: int) -> None:
    net = build(model, data)
    assert net.num_classes == num_classes
    assert sum(p.numel() for p in net.parameters()) == resnet_params(blocks, num_classes)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, num_classes)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_student_is_the_teachers_first_two_stages() -> None:
    teacher, student = CifarResNet([3, 4, 6, 3]).eval(), CifarResNet([3, 4, 6, 3], stages=2).eval()
    assert teacher.conv1.kernel_size == (3, 3) and teacher.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in [*teacher.modules(), *student.modules()])
    assert {k.split(".")[0] for k in student.state_dict()} == {"conv1", "bn1", "layer1", "layer2", "fc"}
    # The teacher's stem, layer1 and layer2 weights fit the student as they are, and compute the same features.
    kept = {k: v for k, v in teacher.state_dict().items() if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")}
    missing, unexpected = student.load_state_dict(kept, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    features = {}
    for name, net in (("teacher", teacher), ("student", student)):
        net.layer2.register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, o))
        net(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert features["student"].shape == (2, 128, 16, 16)
    torch.testing.assert_close(features["student"], features["teacher"])


def test_stages_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="stages=5 is not a number of ResNet stages; expected 1, 2, 3 or 4"):
        CifarResNet(stages=5)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_mult_adds_count_convolutions_and_linear_layers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    assert mult_adds(net) == 8 * 32 * 32 * 3 * 9 + 8 * 32 * 32 * 10

    student, macs = build("cifar_resnet34_2stage", "cifar10"), []
    for m in student.modules():  # every conv and linear layer, counted by hand from the shapes it sees
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]))
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_features))
    assert mult_adds(student) == sum(macs)


@pytest.mark.slow  # builds every CIFAR net
def test_docs_table_is_the_computed_one() -> None:
    assert table() in (ROOT / "docs" / "cifar.md").read_text(), "docs/cifar.md's table is stale: python -m kd_lightning.models.stats"


# ---- modules, callbacks, configs ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_label_smoothing_applies_to_the_training_loss() -> None:
    torch.manual_seed(0)
    net = CifarResNet([1, 1, 1, 1], stages=1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    module = ClassifierModule(net, optimizer=None, label_smoothing=0.1).eval()
    loss = module.training_step((x, y, torch.arange(4)), 0)
    torch.testing.assert_close(loss, F.cross_entropy(net(x), y, label_smoothing=0.1))
    assert not torch.isclose(loss, F.cross_entropy(net(x), y))


def test_channels_last_reaches_student_and_teacher(cifar_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    student, teacher = CifarResNet([1, 1, 1, 1], stages=2), CifarResNet([1, 1, 1, 1])
    layouts: list[bool] = []
    for net in (student, teacher):
        net.layer1.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), group="soft")
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=0, callbacks=[ChannelsLast()], default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=make(CIFAR10DataModule, cifar_root, batch_size=8))
    convs = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 * 9 and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert len(layouts) == 2 * 2 and all(layouts)  # student and teacher, two steps, NCHW inputs


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_trainer_configs() -> None:
    cpu = compose_train_config([])
    assert cpu.trainer.accelerator == "cpu" and "channels_last" not in cpu.callbacks
    gpu = compose_train_config(["trainer=gpu"])
    assert (gpu.trainer.accelerator, gpu.trainer.devices, gpu.trainer.precision, gpu.trainer.benchmark) == ("gpu", 1, "bf16-mixed", True)
    assert gpu.callbacks.channels_last._target_ == "kd_lightning.callbacks.ChannelsLast"
    assert gpu.callbacks.model_checkpoint is not None and gpu.trainer.max_epochs == cpu.trainer.max_epochs
    ddp = compose_train_config(["trainer=ddp"])  # ranks started by torchrun/srun (docs/cluster.md)
    assert (ddp.trainer.strategy, ddp.trainer.sync_batchnorm, ddp.trainer.precision) == ("ddp", True, "bf16-mixed")
    assert "channels_last" in ddp.callbacks
    spawn = compose_train_config(["trainer=ddp_spawn"])  # ranks started by the job
    assert (spawn.trainer.strategy, spawn.trainer.sync_batchnorm, spawn.trainer.precision) == ("ddp_spawn", True, "bf16-mixed")


@pytest.mark.parametrize("name", ["teacher", "hard", "soft", "hard_soft"])
def test_experiment_configs(name: str) -> None:
    cfg = compose_train_config([f"experiment=cifar10_{name}", "data=cifar100"])
    assert cfg.data._target_ == "kd_lightning.data.CIFAR100DataModule" and cfg.model.num_classes == 100
    optimizer = instantiate(cfg.module.optimizer)(params=[nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    assert {k: optimizer.defaults[k] for k in ("momentum", "nesterov", "weight_decay")} == {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    scheduler = instantiate(cfg.module.scheduler)(optimizer=optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == cfg.trainer.max_epochs
    assert cfg.callbacks.periodic_checkpoint.every_n_epochs == 2 and cfg.callbacks.early_stopping is None
    if name == "teacher":
        assert cfg.model.layers == [3, 4, 6, 3] and cfg.model.stages == 4
        assert cfg.module._target_ == "kd_lightning.modules.ClassifierModule"
    else:
        assert cfg.model.layers == [3, 4, 6, 3] and cfg.model.stages == 2
        assert cfg.module._target_ == "kd_lightning.modules.DistillModule" and cfg.distill.group == name
        assert cfg.teacher.experiment == "cifar10_teacher"


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # subprocess
def test_cifar10_soft_through_train_py(tmp_path: Path, offline_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    checksums = write_cifar10(tmp_path / "data", N_TRAIN, N_TEST)
    site = write_checksum_sitecustomize(tmp_path / "site", {"CIFAR10": checksums})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    loader = ["data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=8"]
    proc = run_script(
        "train.py", "experiment=cifar10_soft", *offline_overrides, *short,
        # The teacher's loader settings are its own recipe's (a student's never reach it): small batches for both.
        "teacher.overrides=[" + ",".join(f"'{o}'" for o in [*short, *loader]) + "]",
        *loader, f"hydra.run.dir={tmp_path / 'run'}",
    )
    out = proc.stdout + proc.stderr
    assert "Training the teacher (experiment=cifar10_teacher)" in out and "Run summary" in out

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data_source"] == "cifar10"
    assert metrics["params"] == resnet_params([3, 4], 10) and metrics["teacher_params"] == resnet_params([3, 4, 6, 3], 10)
    assert {"test/acc", "test/loss", "test/soft_loss", "test/agreement", "test/teacher_acc"} <= set(metrics)
    assert {"best.ckpt", "last.ckpt"} <= {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    (teacher_run,) = (tmp_path / "logs" / "teachers").glob("*/run")
    assert json.loads((teacher_run / "metrics.json").read_text())["data_source"] == "cifar10"
