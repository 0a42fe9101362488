"""model=timm / model=torchvision: heads for the data's classes, stems for its channels, weights from files saved
here (plain state_dicts, safetensors, this project's checkpoints), strict keys but the head, one-line errors for a
file that does not fit and for weights that cannot be downloaded; the net contract and feature paths."""

import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kd_lightning.checkpoints import load_net
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.methods.base import find_module
from kd_lightning.models import timm_net, torchvision_net
from kd_lightning.models.library import check_net


def one_line(err: BaseException) -> str:
    assert "\n" not in str(err) and "Traceback" not in str(err), str(err)
    return str(err)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_timm_net_keeps_the_contract() -> None:
    net = timm_net("test_resnet", num_classes=3)
    assert net.num_classes == 3 and net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert net.feature_layers == ("layer1", "layer2", "layer3", "layer4")
    for spec in (*net.feature_layers, "fc:input"):
        find_module(net, spec, "student")
    grey = timm_net("test_resnet", num_classes=3, in_chans=1)
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])
def test_timm_weights_file_is_loaded_strictly_with_a_new_head(tmp_path: Path, suffix: str) -> None:
    source = timm_net("test_resnet", num_classes=5)  # "pretrained" on 5 classes
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif suffix == ".ckpt":  # a Lightning checkpoint of this project: net.* weights
        torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "net_config": {}}, path)
    else:
        torch.save(state, path)
    net = timm_net("test_resnet", num_classes=3, weights_path=str(path))
    loaded = net.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            assert loaded[key].shape[0] == 3  # replaced for the data's 3 classes, freshly initialized
        else:
            assert torch.equal(loaded[key], value), key
    grey = timm_net("test_resnet", num_classes=3, in_chans=1, weights_path=str(path))
    stem = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    torch.testing.assert_close(grey.state_dict()[stem], state[stem].sum(1, keepdim=True))  # timm's adapt: summed


def test_a_weights_file_of_another_net_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm_net("test_efficientnet", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        timm_net("test_resnet", num_classes=3, weights_path=str(path))
    message = one_line(info.value)
    assert message.startswith(f"{path} does not fit ResNet: missing keys conv1.0.weight") and "unexpected keys" in message
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as info:
        timm_net("test_resnet", num_classes=3, weights_path=str(tmp_path / "junk.pt"))
    assert one_line(info.value).startswith(f"{tmp_path / 'junk.pt'} is not a readable weights file")
    with pytest.raises(CheckpointError, match="weights file not found"):
        timm_net("test_resnet", num_classes=3, weights_path=str(tmp_path / "missing.pth"))


def test_torchvision_net_head_stem_and_weights_file(tmp_path: Path) -> None:
    source = torchvision_net("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = torchvision_net("resnet18", num_classes=4, in_chans=1, weights_path=str(path))
    assert net.num_classes == 4 and net.fc.out_features == 4 and net.conv1.in_channels == 1
    assert net.feature_layers == ("layer1", "layer2", "layer3", "layer4")
    torch.testing.assert_close(net.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    small = torchvision_net("mobilenet_v3_small", num_classes=3)
    assert small.classifier[-1].out_features == 3 and small.feature_layers == ()


def test_offline_downloads_are_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from kd_lightning.models import library

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError) as info:
        torchvision_net("resnet18", num_classes=3, weights="IMAGENET1K_V1")
    message = one_line(info.value)
    assert f"put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) in " \
           f"{tmp_path / 'torch' / 'hub' / 'checkpoints'} (TORCH_HOME)" in message and "model.weights_path=FILE" in message

    monkeypatch.setattr(library, "_hub_reachable", lambda host="huggingface.co": False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(CheckpointError) as info:
        timm_net("test_resnet", num_classes=3, pretrained=True)
    message = one_line(info.value)
    assert "hub repo timm/test_resnet.r160_in1k" in message and "model.weights_path=FILE" in message

    with pytest.raises(ConfigError, match=r"model.weights='NOPE' is not accepted for resnet18: one of IMAGENET1K_V1"):
        torchvision_net("resnet18", num_classes=3, weights="NOPE")
    with pytest.raises(ConfigError, match=r"model.name='resnet_nope' is not a timm model"):
        timm_net("resnet_nope", num_classes=3)
    with pytest.raises(ConfigError, match=r"model.num_classes=None is not accepted"):
        timm_net("test_resnet", num_classes=None)


def test_checkpoints_rebuild_pretrained_nets_without_downloading(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint of a pretrained student rebuilds the net from its own weights: no download is tried."""
    net = timm_net("test_resnet", num_classes=3)
    path = tmp_path / "best.ckpt"
    config = {"_target_": "kd_lightning.models.timm_net", "name": "test_resnet", "num_classes": 3,
              "pretrained": True, "weights_path": None, "in_chans": 3}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_config": config}, path)
    from kd_lightning.models import library

    monkeypatch.setattr(library, "_timm_download", None)  # would fail if called
    rebuilt = load_net(path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))
    plain = tmp_path / "teacher.pth"  # teacher.ckpt_path: a state_dict trained elsewhere, with the config's net
    torch.save(net.state_dict(), plain)
    assert torch.equal(load_net(plain, config).fc.weight, net.fc.weight)


def test_a_net_without_num_classes_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        check_net(nn.Linear(3, 3), "model")
    assert one_line(info.value) == ("model: Linear has no integer attribute num_classes: set self.num_classes in "
                                    "its __init__ (docs/models.md, the net contract)")


def test_a_wrong_layer_path_lists_the_nearest_valid_ones() -> None:
    net = timm_net("test_resnet", num_classes=3)
    with pytest.raises(ConfigError) as info:
        find_module(net, "layer5", "student")
    message = one_line(info.value)
    assert message == ("student layer 'layer5' is not a module of ResNet; accepted: module paths such as layer4, layer3, "
                       "layer2, layer1, layer4.0, layer3.0, layer2.0, layer1.0")


def test_a_plain_weights_file_is_a_teacher(tmp_path: Path) -> None:
    """teacher.ckpt_path=<.pth or .safetensors>: converted once into a teacher checkpoint of the configured net,
    every key strict; a file of another net is one line."""
    from kd_lightning.teacher import given_teacher

    config = {"_target_": "kd_lightning.models.timm_net", "name": "test_resnet", "num_classes": 3,
              "pretrained": True, "weights_path": None, "in_chans": 3}
    net = timm_net("test_resnet", num_classes=3)
    for path in (tmp_path / "t.pth", tmp_path / "t.safetensors"):
        if path.suffix == ".pth":
            torch.save(net.state_dict(), path)
        else:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        ckpt = given_teacher(path, config, tmp_path / "cache")
        assert ckpt.parent.parent == tmp_path / "cache" / "weights" and given_teacher(path, config, tmp_path / "cache") == ckpt
        assert torch.equal(load_net(ckpt).fc.weight, net.fc.weight)
    other = tmp_path / "other.pth"
    torch.save(timm_net("test_resnet", num_classes=5).state_dict(), other)
    with pytest.raises(CheckpointError) as info:
        given_teacher(other, config, tmp_path / "cache")
    assert one_line(info.value) == f"{other} does not fit ResNet: fc.weight has shape (5, 96), the net expects (3, 96)"
