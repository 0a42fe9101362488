"""ReviewKD (kd_lightning/methods/reviewkd.py): HCL and one ABF by hand, zero loss for identical features
through an identity fusion, the warm-up, the stage pairing on the MNIST and CIFAR nets, gradients, a batch of
one, refusals, and train.py on MNIST and fake CIFAR (slow)."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import QUICK_RUN, fake_cifar10_with_a_tiny_teacher, save_random_teacher
from kd_lightning.config import compose_train_config
from kd_lightning.errors import ConfigError
from kd_lightning.methods import check_method
from kd_lightning.methods.base import StepInputs
from kd_lightning.methods.reviewkd import ABF, ReviewKD, hcl_loss
from kd_lightning.models import CifarResNet, MnistCNN, MnistConvStudent
from kd_lightning.modules import DistillModule

EPS = 1e-5  # BatchNorm's


def review_hparams(**hp: object) -> dict:
    return {**compose_train_config([]).distill.reviewkd, **hp}


def make(**hp: object) -> ReviewKD:
    return ReviewKD({"group": "soft", "T": 2.0, "alpha": 0.8, "reviewkd": review_hparams(**hp)})


def mse(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def pool(m: list[list[float]], level: int) -> list[float]:
    """Average pooling of a square map whose side the level divides, flattened."""
    k = len(m) // level
    return [sum(m[i * k + a][j * k + b] for a in range(k) for b in range(k)) / k**2
            for i in range(level) for j in range(level)]


# ---- HCL and ABF by hand ----------------------------------------------------------------------------------------
def test_hcl_by_hand() -> None:
    torch.manual_seed(0)
    s4, t4 = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    s8, t8 = torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.randn(1, 1, 8, 8, dtype=torch.float64)
    s1, t1 = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.randn(2, 3, 1, 1, dtype=torch.float64)
    a, b = s4[0, 0].tolist(), t4[0, 0].tolist()
    flat = lambda m: [v for row in m for v in row]  # noqa: E731
    # 4x4: the 4x4 pool is skipped (4 >= h); 2x2 weighted 1/2, 1x1 weighted 1/4; divided by 1 + 1/2 + 1/4
    four = (mse(flat(a), flat(b)) + mse(pool(a, 2), pool(b, 2)) / 2 + mse(pool(a, 1), pool(b, 1)) / 4) / 1.75
    c, d = s8[0, 0].tolist(), t8[0, 0].tolist()
    eight = (mse(flat(c), flat(d)) + sum(mse(pool(c, lv), pool(d, lv)) * w
                                         for lv, w in ((4, 0.5), (2, 0.25), (1, 0.125)))) / 1.875
    one = mse(s1.flatten().tolist(), t1.flatten().tolist())  # 1x1: the map only
    assert hcl_loss([s4], [t4]).item() == pytest.approx(four, rel=1e-12)
    assert hcl_loss([s8], [t8]).item() == pytest.approx(eight, rel=1e-12)
    assert hcl_loss([s4, s8, s1], [t4, t8, t1]).item() == pytest.approx(four + eight + one, rel=1e-12)


def test_abf_by_hand() -> None:
    """One channel throughout, eval mode (BatchNorm: x / sqrt(1 + eps)); a 2x2 map fused with a 1x1 residual,
    then resized to 3x3 (nearest) and passed through the 3x3 conv."""
    abf = ABF(1, 1, 1, fuse=True).double().eval()
    with torch.no_grad():
        abf.conv1[0].weight.fill_(2.0)
        abf.att_conv[0].weight.copy_(torch.tensor([[0.5, -1.0], [1.0, 0.25]]).view(2, 2, 1, 1))
        abf.att_conv[0].bias.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
        abf.conv2[0].weight.copy_(torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) / 10)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    out, residual = abf(x.view(1, 1, 2, 2), torch.tensor([[[[0.7]]]], dtype=torch.float64), (3, 3))

    bn = 1 / math.sqrt(1 + EPS)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    fused = []
    for v in x.flatten().tolist():
        xv, r = 2.0 * v * bn, 0.7
        fused.append(xv * sig(0.5 * xv - 1.0 * r + 0.1) + r * sig(1.0 * xv + 0.25 * r - 0.2))
    fused2 = [fused[0:2], fused[2:4]]
    up = [[fused2[i * 2 // 3][j * 2 // 3] for j in range(3)] for i in range(3)]  # nearest: source floor(i * 2/3)
    assert residual[0, 0].flatten().tolist() == pytest.approx([v for row in up for v in row], rel=1e-12)
    k = [[(3 * a + b) / 10 for b in range(3)] for a in range(3)]
    conv = [[sum(k[a][b] * up[i + a - 1][j + b - 1] for a in range(3) for b in range(3)
                 if 0 <= i + a - 1 < 3 and 0 <= j + b - 1 < 3) * bn for j in range(3)] for i in range(3)]
    assert out[0, 0].flatten().tolist() == pytest.approx([v for row in conv for v in row], rel=1e-12)


def identity_abf(channels: int, fuse: bool) -> ABF:
    """An ABF that passes its stage through: identity 1x1 and 3x3 convs, BatchNorms that divide by 1, and an
    attention that keeps the stage (weight 1) and drops the residual (weight exactly 0)."""
    abf = ABF(channels, channels, channels, fuse).double().eval()
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[:, :, 1, 1] = torch.eye(channels)
        for bn in (abf.conv1[1], abf.conv2[1]):
            bn.eps = 0.0  # running mean 0, var 1: x exactly
        if fuse:
            abf.att_conv[0].weight.zero_()
            abf.att_conv[0].bias.copy_(torch.tensor([1000.0, -1000.0]))  # sigmoid: exactly 1 and 0
    return abf


def test_identical_features_through_an_identity_fusion_give_zero_loss() -> None:
    torch.manual_seed(0)
    m = make()
    m.student_layers, m.teacher_layers = ["a", "b", "c"], ["ta", "tb", "tc"]
    feats = {"a": torch.randn(3, 4, 8, 8), "b": torch.randn(3, 4, 4, 4), "c": torch.randn(3, 4)}
    teacher = {"t" + k: v.clone() for k, v in feats.items()}
    m.build(feats, teacher)
    assert [type(a.att_conv) for a in m.abfs] == [nn.Sequential, nn.Sequential, type(None)]  # the deepest: no fusion
    m.abfs = nn.ModuleList(identity_abf(4, fuse) for fuse in (True, True, False))
    m.double().eval()
    step = StepInputs(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]),
                      features={k: v.double() for k, v in feats.items()},
                      teacher_features={k: v.double() for k, v in teacher.items()}, progress=5.0)
    terms = m(step)
    assert terms["reviewkd_loss"].item() == 0.0
    teacher["tb"] += 0.1  # a stage off by 0.1: 0.01 for the map and each pool, (1 + 1/2 + 1/4) * 0.01 / 1.75
    step.teacher_features = {k: v.double() for k, v in teacher.items()}
    assert m(step)["reviewkd_loss"].item() == pytest.approx(0.01, rel=1e-5)


@pytest.mark.parametrize(("warmup", "progress", "factor"), [
    (20.0, 0.0, 1 / 20), (20.0, 0.99, 1 / 20), (20.0, 1.0, 2 / 20), (20.0, 19.5, 1.0), (20.0, 30.0, 1.0),
    (1.0, 0.0, 1.0), (0.0, 0.0, 1.0), (4.0, 2.5, 3 / 4),
])
def test_warmup_counts_epochs_from_one_as_mdistiller(warmup: float, progress: float, factor: float) -> None:
    assert make(warmup_epochs=warmup).warmup(progress) == pytest.approx(factor, rel=1e-12)


# ---- the stages on the project's nets --------------------------------------------------------------------------
@pytest.mark.parametrize(("student", "teacher", "shape", "s_layers", "t_layers", "channels"), [
    (MnistConvStudent(), MnistCNN(), (1, 28, 28), ["features.1", "features.3", "classifier.2:input"],
     ["features.1", "features.3", "classifier.3:input"], [(8, 16, 32), (16, 16, 64), (16, 16, 128)]),
    (CifarResNet([1, 1, 1, 1], stages=2), CifarResNet([1, 1, 1, 1]), (3, 32, 32), ["layer1", "layer2", "fc:input"],
     ["layer1", "layer2", "fc:input"], [(64, 128, 64), (128, 128, 128), (128, 128, 512)]),
    (CifarResNet([1, 1, 1, 1]), CifarResNet([1, 1, 1, 1]), (3, 32, 32),
     ["layer1", "layer2", "layer3", "layer4", "fc:input"], ["layer1", "layer2", "layer3", "layer4", "fc:input"],
     [(64, 512, 64), (128, 512, 128), (256, 512, 256), (512, 512, 512), (512, 512, 512)]),
])
def test_declared_stages_and_the_pooled_embedding_are_paired(student: nn.Module, teacher: nn.Module, shape: tuple,
                                                             s_layers: list, t_layers: list, channels: list) -> None:
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="reviewkd",
                           method_hparams=review_hparams())
    module.build_method(shape)
    m = module.method
    assert m.student_layers == s_layers and m.teacher_layers == t_layers
    assert [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels) for a in m.abfs] == channels


def test_gradients_reach_student_and_fusions_only() -> None:
    torch.manual_seed(0)
    student, teacher = MnistConvStudent(), MnistCNN()
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="reviewkd",
                           method_hparams=review_hparams())
    module.build_method((1, 28, 28))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    module.training_step((x, y, torch.arange(6)), 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    params = list(module.method.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in [*student.parameters(), *params]}
    assert "method.abfs.0.att_conv.0.weight" in module.state_dict()


def test_a_batch_of_one_trains_on_ce_and_is_counted() -> None:
    module = DistillModule(MnistConvStudent(), MnistCNN(), optimizer=partial(torch.optim.SGD, lr=0.1),
                           method="reviewkd", method_hparams=review_hparams())
    module.build_method((1, 28, 28))
    x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
    loss = module.training_step((x, y, torch.arange(1)), 0)
    module.training_step((x, y, torch.arange(1)), 1)
    assert loss.item() == pytest.approx(F.cross_entropy(module.net(x), y).item(), rel=1e-6)
    assert module.method.small_batches_skipped == 2
    module.training_step((torch.randn(2, 1, 28, 28), torch.tensor([3, 4]), torch.arange(2)), 2)
    assert module.method.small_batches_skipped == 2  # two examples: the term is there


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=mnist_conv_student", "distill.reviewkd.teacher_layers=[features.1]"],
     r"^distill.reviewkd.teacher_layers=\['features.1'\] is not accepted: one teacher layer per student layer "),
    (["distill.reviewkd.weight=-1"], r"^distill.reviewkd.weight=-1 is not accepted: a number >= 0$"),
    (["distill.reviewkd.max_mid_channels=0"], r"^distill.reviewkd.max_mid_channels=0 is not accepted: an integer > 0$"),
    ([], r"^distill.reviewkd.student_layers=null needs the student net to declare feature maps, but MLP declares"),
])
def test_bad_settings_are_one_line_config_errors(overrides: list[str], message: str) -> None:
    cfg = compose_train_config(["experiment=soft", "distill.method=reviewkd", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_method(cfg)
        DistillModule(instantiate_net(cfg), MnistCNN(), optimizer=partial(torch.optim.SGD, lr=0.1),
                      method="reviewkd", method_hparams=dict(cfg.distill.reviewkd))


def instantiate_net(cfg: object) -> nn.Module:
    from hydra.utils import instantiate

    return instantiate(cfg.model)


# ---- through train.py ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reviewkd_trains_through_train_py_on_mnist(tmp_path: Path) -> None:
    from kd_lightning.checkpoints import load_net
    from kd_lightning.train import train

    torch.manual_seed(0)
    teacher = save_random_teacher(tmp_path / "t.ckpt", MnistCNN(), {"_target_": "kd_lightning.models.MnistCNN"})
    result = train(compose_train_config([
        "experiment=soft", "model=mnist_conv_student", "distill.method=reviewkd", f"teacher.ckpt_path={teacher}",
        *QUICK_RUN, f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}",
        f"paths.data_dir={tmp_path / 'data'}", "data.download=false"]))
    assert 0 <= result["test/acc"] <= 1
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert any(k.startswith("method.abfs.") for k in state) and all(k.startswith(("net.", "method.")) for k in state)
    assert isinstance(load_net(result["best_ckpt"]), MnistConvStudent)


@pytest.mark.slow
def test_reviewkd_trains_through_train_py_on_fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_lightning.train import train

    _, cifar = fake_cifar10_with_a_tiny_teacher(tmp_path, monkeypatch)
    result = train(compose_train_config([*cifar, "distill.method=reviewkd", *QUICK_RUN,
                                         f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}"]))
    assert 0 <= result["test/acc"] <= 1
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert state["method.abfs.2.conv2.0.weight"].shape == (512, 128, 3, 3)  # the 2-stage student's pooled 128 -> 512
