"""python -m kd_lightning.export: the net alone as ONNX / TorchScript / torch.export, each verified on the test split."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fake_data import write_cifar10
from helpers import run_script
from kd_lightning import export as export_mod
from kd_lightning.config import CONF_DIR
from kd_lightning.data import CIFAR10DataModule, MNISTDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.export import ExportMismatch, export, export_net, load_test_split
from kd_lightning.models import MLP, CifarResNet, MnistCNN

MLP_CONFIG = {"_target_": "kd_lightning.models.MLP", "hidden": [16]}
CNN_CONFIG = {"_target_": "kd_lightning.models.MnistCNN"}


def save_checkpoint(path: Path, net: torch.nn.Module, net_config: dict) -> Path:
    """A checkpoint as train.py writes one: `net.*` weights and the net's config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_config": net_config}, path)
    return path


def compose_export(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


@pytest.fixture(scope="module")
def mnist_test_inputs() -> torch.Tensor:
    inputs, _ = load_test_split(MNISTDataModule(data_dir="/nonexistent", download=False))  # the offline sample
    return inputs[:200]  # enough to check; the entry-point test below checks a whole split


# The MNIST student (MLP) as onnx and torchscript: test_entry_point_reads_the_data_of_the_checkpoints_run.
@pytest.mark.parametrize(("net_cls", "fmt"), [(MnistCNN, "onnx"), (MnistCNN, "torchscript"), (MLP, "pt2")])
@pytest.mark.slow  # exports and verifies three nets
def test_mnist_teacher_and_student_round_trip(tmp_path: Path, mnist_test_inputs: torch.Tensor, net_cls: type,
                                              fmt: str) -> None:
    torch.manual_seed(0)
    net = net_cls().eval()
    path = tmp_path / f"net{export_mod.SUFFIXES[fmt]}"
    check = export_net(net, mnist_test_inputs, path, fmt)
    assert check.passed and check.n == len(mnist_test_inputs) == check.top1_equal
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, no temporary or external-data file left
    # Run the written file on a batch size it was not traced with: the batch axis is dynamic.
    x = mnist_test_inputs[:3]
    got = export_mod.WRITERS[fmt][1](str(path))(x)
    torch.testing.assert_close(torch.as_tensor(got), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # exports and verifies a CIFAR net
def test_cifar_net_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in write_cifar10(tmp_path / "data", n_train=20, n_test=12).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)
    inputs, _ = load_test_split(CIFAR10DataModule(data_dir=tmp_path / "data", download=False, num_workers=0))
    torch.manual_seed(0)
    net = CifarResNet([1, 1, 1, 1], stages=2).eval()  # random weights: the export, not the accuracy, is under test
    for fmt in ("onnx", "torchscript"):
        check = export_net(net, inputs, tmp_path / f"resnet{export_mod.SUFFIXES[fmt]}", fmt)
        assert check.passed and check.n == 12


@pytest.mark.slow  # exports and verifies
def test_entry_point_reads_the_data_of_the_checkpoints_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    ckpt = save_checkpoint(run / "checkpoints" / "best.ckpt", MLP([16]), MLP_CONFIG)
    saved = compose_export("ckpt_path=x", "data.download=false", "data.data_dir=/nonexistent", "data.eval_batch_size=77")
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"data": saved.data, "paths": saved.paths, "seed": 0}), run / ".hydra" / "config.yaml")
    # The export app's own data (the default) would need MNIST files in a dir that does not exist here.
    cfg = compose_export(f"ckpt_path={ckpt}", "formats=[onnx,torchscript]", f"paths.data_dir={tmp_path}/nothing")
    checks = export(cfg)
    assert [c.fmt for c in checks] == ["onnx", "torchscript"] and all(c.passed for c in checks)
    assert (run / "checkpoints" / "best.onnx").is_file() and (run / "checkpoints" / "best.ts.pt").is_file()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("onnx verified: top-1 equal on") and "mnist-sample-5k" in lines[0]


def test_out_dir_and_a_single_format(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "a" / "s.ckpt", MLP([16]), MLP_CONFIG)
    cfg = compose_export(f"ckpt_path={ckpt}", "formats=torchscript", f"out_dir={tmp_path / 'out'}",
                         "data.download=false", "data.data_dir=/nonexistent")
    export(cfg)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.ts.pt"]


def test_a_mismatching_export_fails_and_leaves_no_file(tmp_path: Path, mnist_test_inputs: torch.Tensor,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = MLP([16]).eval()
    write, run = export_mod.WRITERS["torchscript"]

    def run_with_one_flipped_row(path: str):
        loaded = run(path)

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = loaded(x).clone()
            y[0] = -y[0]  # the top-1 class of the first example changes
            return y
        return forward

    monkeypatch.setitem(export_mod.WRITERS, "torchscript", (write, run_with_one_flipped_row))
    with pytest.raises(ExportMismatch, match=r"torchscript FAILED: top-1 equal on \d+/\d+"):
        export_net(net, mnist_test_inputs[:50], tmp_path / "net.ts.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_bad_format_and_missing_packages_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = save_checkpoint(tmp_path / "s.ckpt", MLP([16]), MLP_CONFIG)
    with pytest.raises(ConfigError, match=r"formats=\['tflite'\] is not accepted: a non-empty list of onnx, "):
        export(compose_export(f"ckpt_path={ckpt}", "formats=[tflite]"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r'needs onnxruntime: pip install -e "\.\[deploy\]"'):
        export(compose_export(f"ckpt_path={ckpt}", "formats=[onnx]"))


@pytest.mark.slow
def test_cli_prints_one_line_per_format_and_exits_2_on_bad_input(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", MnistCNN(), CNN_CONFIG)
    common = [f"paths.log_dir={tmp_path / 'logs'}", "data.download=false", "data.data_dir=/nonexistent"]
    proc = run_script("export.py", f"ckpt_path={ckpt}", *common)
    assert "onnx verified: top-1 equal on" in proc.stdout and "torchscript verified" in proc.stdout
    proc = run_script("export.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", *common, expect_rc=2)
    assert "checkpoint not found" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
