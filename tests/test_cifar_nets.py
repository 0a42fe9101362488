"""The CIFAR-100 benchmark nets (kd_lightning/models/cifar100): parameter counts, state-dict keys and shapes as the
reference code's (tests/data/cifar100_reference_keys.json, dumped from mdistiller's and RepDistiller's model
files), forward and feature shapes, the model configs, loading a checkpoint in the released `ckpt_epoch_240.pth`
layout, and each pair's feature-layer pairing under fitnet, at, rkd and crd."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kd_lightning.checkpoints import load_net
from kd_lightning.config import compose_train_config
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.methods import StepInputs, get_method
from kd_lightning.methods.base import capture
from kd_lightning.models.cifar100 import NETS
from kd_lightning.models.cifar100.released import load_released, read_released, released_as_checkpoint
from kd_lightning.teacher import compose_teacher_config, given_teacher

REFERENCE = json.loads((Path(__file__).parent / "data" / "cifar100_reference_keys.json").read_text())["nets"]

# The references' parameter counts with 100 classes, in millions as usually quoted (e.g. resnet8x4 1.23 M,
# resnet32x4 7.43 M): checked against the exact counts of the reference code (REFERENCE) below.
MILLIONS = {"resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23,
            "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.97, "vgg13": 9.46,
            "mobilenetv2": 0.81, "shufflev1": 0.95, "shufflev2": 1.36}

# (channels, height) of each declared stage output on a 32x32 image, and the embedding width: the references'
# feats[1:] and pooled_feat.
STAGES = {
    "resnet20": ([(16, 32), (32, 16), (64, 8)], 64), "resnet32": ([(16, 32), (32, 16), (64, 8)], 64),
    "resnet56": ([(16, 32), (32, 16), (64, 8)], 64), "resnet110": ([(16, 32), (32, 16), (64, 8)], 64),
    "resnet8x4": ([(64, 32), (128, 16), (256, 8)], 256), "resnet32x4": ([(64, 32), (128, 16), (256, 8)], 256),
    "wrn_16_2": ([(32, 32), (64, 16), (128, 8)], 128), "wrn_40_1": ([(16, 32), (32, 16), (64, 8)], 64),
    "wrn_40_2": ([(32, 32), (64, 16), (128, 8)], 128),
    "vgg8": ([(128, 16), (256, 8), (512, 4), (512, 4)], 512), "vgg13": ([(128, 16), (256, 8), (512, 4), (512, 4)], 512),
    "mobilenetv2": ([(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflev1": ([(240, 16), (480, 8), (960, 4)], 960), "shufflev2": ([(116, 16), (232, 8), (464, 4)], 1024),
}
PAIRS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "pair").glob("*.yaml"))
# What composes configs runs for one net and one pair in the inner loop, for all with the slow tests.
INNER_NET, INNER_PAIR = "resnet8x4", "resnet32x4_resnet8x4"


def inner(values: list[str], keep: str) -> list:
    return [v if v == keep else pytest.param(v, marks=pytest.mark.slow) for v in values]


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_fourteen_nets_are_the_reference_set() -> None:
    assert sorted(NETS) == sorted(REFERENCE) == sorted(MILLIONS) == sorted(STAGES)
    assert len(NETS) == 14 and len(PAIRS) == 9


@pytest.mark.parametrize("name", sorted(NETS))
def test_parameter_count_keys_and_shapes_are_the_references(name: str) -> None:
    net = NETS[name](num_classes=100)
    assert count(net) == REFERENCE[name]["params"]
    assert round(count(net) / 1e6, 2) == MILLIONS[name]
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == REFERENCE[name]["state_dict"]  # same names, same order, same shapes


@pytest.mark.parametrize("name", sorted(NETS))
def test_forward_stage_and_embedding_shapes(name: str) -> None:
    net = NETS[name](num_classes=100).eval()
    specs = [*net.feature_layers, net.embedding]
    with torch.no_grad(), capture(net, specs) as found:
        logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    stages, width = STAGES[name]
    assert [(found[s].shape[1], found[s].shape[2], found[s].shape[3]) for s in net.feature_layers] == \
        [(c, h, h) for c, h in stages]
    assert found[net.embedding].shape == (2, width)
    assert NETS[name](num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", inner(sorted(NETS), INNER_NET))
def test_model_config_builds_the_net(name: str) -> None:
    cfg = compose_train_config([f"model={name}", "data=cifar100"])
    net = instantiate(cfg.model)
    assert type(net) is type(NETS[name]()) and count(net) == REFERENCE[name]["params"]


# ---- the released checkpoint layout ----------------------------------------------------------------------------
def released_file(path: Path, net: torch.nn.Module, key: str = "model", prefix: str = "",
                  drop_counters: bool = False) -> Path:
    """A file as RepDistiller's train_teacher.py saves it: {'epoch', 'model': state_dict, 'accuracy', 'optimizer'}."""
    state = {prefix + k: v for k, v in net.state_dict().items()
             if not (drop_counters and k.endswith("num_batches_tracked"))}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, key: state, "accuracy": torch.tensor(79.42), "optimizer": optimizer.state_dict()}, path)
    return path


def randomized(net: torch.nn.Module) -> torch.nn.Module:
    """Weights and BN statistics away from their initial values, so a load that skipped anything shows."""
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn_like(tensor))
    return net.eval()


@pytest.mark.parametrize(("key", "prefix", "drop_counters"), [("model", "", False), ("net", "", False),
                                                             ("model", "module.", False), ("model", "", True)])
def test_released_layout_loads_strictly(tmp_path: Path, key: str, prefix: str, drop_counters: bool) -> None:
    torch.manual_seed(0)
    source = randomized(NETS["resnet8x4"]())
    path = released_file(tmp_path / "ckpt_epoch_240.pth", source, key, prefix, drop_counters)
    net = load_released(path, NETS["resnet8x4"]()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x), source(x))
    for k, v in source.state_dict().items():
        expected = torch.zeros_like(v) if drop_counters and k.endswith("num_batches_tracked") else v
        assert torch.equal(net.state_dict()[k], expected), k


def test_released_layout_errors_are_one_line(tmp_path: Path) -> None:
    state = NETS["resnet8x4"]().state_dict()
    cases = {
        "missing": ({"model": {k: v for k, v in state.items() if k != "fc.bias"}}, r"missing key fc\.bias \(1 missing\)"),
        "unexpected": ({"model": {**state, "fc2.weight": torch.zeros(1)}}, r"unexpected key fc2\.weight"),
        "shape": ({"model": {**state, "fc.weight": torch.zeros(10, 256)}},
                  r"fc\.weight has shape \(10, 256\), the net expects \(100, 256\)"),
        "layout": ({"weights": state}, r"expected a Lightning checkpoint \(state_dict\) or a released teacher"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(CheckpointError, match=message) as err:
            load_released(path, NETS["resnet8x4"]())
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    # Another net's file: the first difference is named.
    path = released_file(tmp_path / "wrn.pth", NETS["wrn_40_2"]())
    with pytest.raises(CheckpointError, match=r"does not fit ResNet: missing key conv1\.weight|does not fit ResNet: "):
        load_released(path, NETS["resnet32x4"]())


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_teacher_ckpt_path_takes_a_released_file(tmp_path: Path) -> None:
    """teacher.ckpt_path=<ckpt_epoch_240.pth>: converted once into the cache as a kd-lightning checkpoint that
    load_net (the teacher loader, the model card, tracin) reads; a Lightning checkpoint is used as it is."""
    torch.manual_seed(0)
    source = randomized(NETS["resnet32x4"]())
    path = released_file(tmp_path / "ckpt_epoch_240.pth", source)
    cfg = compose_train_config(["experiment=cifar100_kd", f"teacher.ckpt_path={path}", f"paths.log_dir={tmp_path / 'logs'}"])
    model_cfg = compose_teacher_config(cfg).model
    converted = given_teacher(path, model_cfg, cfg.paths.cache_dir)
    assert converted != path and converted.is_relative_to(Path(cfg.paths.cache_dir) / "released")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_net(converted).eval()(x), source(x))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads((converted.parent / "source.json").read_text())["source_sha256"] == sha
    mtime = converted.stat().st_mtime_ns
    assert released_as_checkpoint(path, model_cfg, cfg.paths.cache_dir, sha) == converted  # reused, not rewritten
    assert converted.stat().st_mtime_ns == mtime
    assert read_released(converted) is None and given_teacher(converted, model_cfg, cfg.paths.cache_dir) == converted


# ---- each pair's layers under the feature methods ---------------------------------------------------------------
@pytest.mark.parametrize("pair", inner(PAIRS, INNER_PAIR))
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_pair_layers_work_with_the_feature_methods(pair: str) -> None:
    """fitnet, at, rkd and crd bind the pair's layers, build their parts from probe features and give a finite
    loss; at pairs maps of equal size only."""
    torch.manual_seed(0)
    cfg = compose_train_config(["experiment=cifar100_kd", f"pair={pair}"])
    assert cfg.benchmark.pair == pair == f"{cfg.benchmark.teacher}_{cfg.benchmark.student}"
    student, teacher = instantiate(cfg.model), instantiate(compose_teacher_config(cfg).model).eval()
    assert type(student) is type(NETS[cfg.benchmark.student]()) and type(teacher) is type(NETS[cfg.benchmark.teacher]())
    methods = {name: get_method(name)({**cfg.distill, "method": name}) for name in ("fitnet", "at", "rkd")}
    methods["crd"] = get_method("crd")({**cfg.distill, "method": "crd", "crd": {**cfg.distill.crd, "nce_k": 4}})
    for method in methods.values():
        method.bind(student, teacher)
    methods["crd"].make_bank(torch.arange(12) % 4)  # a 12-example train split of 4 classes
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    s_specs = sorted({s for m in methods.values() for s in m.student_layers})
    t_specs = sorted({t for m in methods.values() for t in m.teacher_layers})
    with capture(student, s_specs) as fs, capture(teacher, t_specs) as ft:
        logits = student(x)
        with torch.no_grad():
            teacher(x)
    for name, method in methods.items():
        method.build(fs, ft)
        terms = method(StepInputs(logits=logits, labels=labels, features=fs, teacher_features=ft,
                                  indices=torch.tensor([0, 1, 2])))
        assert torch.isfinite(terms["loss"]), (pair, name)
    at = methods["at"]
    assert len(at.student_layers) >= 2
    assert all(fs[s].shape[2:] == ft[t].shape[2:] for s, t in zip(at.student_layers, at.teacher_layers))


def test_a_pair_layer_that_does_not_exist_is_one_line() -> None:
    cfg = compose_train_config(["experiment=cifar100_at", "distill.at.student_layers=[layer9]"])
    with pytest.raises(ConfigError, match=r"layer9"):
        get_method("at")(cfg.distill).bind(instantiate(cfg.model), None)
