"""Distillation methods (kd_lightning/methods): each loss against values computed by hand and a property of
its paper; gradients reach the student and the method's parts only; every method trains through train.py;
a method defined here is registered and trained (the "add your own method" path of docs/methods.md)."""

import math
import shutil
from functools import cache, partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from kd_lightning.checkpoints import load_net
from kd_lightning.config import compose_train_config
from kd_lightning.errors import ConfigError
from kd_lightning.losses import kd_loss, soft_targets
from kd_lightning.methods import METHODS, Method, StepInputs, check_method, get_method, register
from kd_lightning.methods.at import at_loss, attention_map
from kd_lightning.methods.dkd import dkd_parts
from kd_lightning.methods.multi_teacher import TeacherEnsemble, ensemble_logits, normalized_weights
from kd_lightning.methods.rkd import angle_loss, distance_loss
from kd_lightning.methods.tf_kd import virtual_teacher
from kd_lightning.models import MLP, CifarResNet, MnistCNN, MnistConvStudent
from kd_lightning.modules import DistillModule

STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])


@cache
def distill_defaults() -> DictConfig:
    return compose_train_config([]).distill


def defaults(method: str, **hp: object) -> dict:
    """The `distill` section of train.yaml with `hp` over `distill.<method>`."""
    distill = distill_defaults()
    section = {**(distill.get(method) or {}), **hp}
    return {"group": distill.group, "T": distill.T, "alpha": distill.alpha, method: section}


def make(method: str, **hp: object) -> Method:
    return get_method(method)(defaults(method, **hp))


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ce(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


# ---- each loss by hand ---------------------------------------------------------------------------------------
def test_kd_is_the_loss_group() -> None:
    m = make("kd")
    terms = m(StepInputs(STUDENT, LABELS, soft_targets(TEACHER, 2.0)))
    T, alpha = 2.0, 0.8
    soft = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(STUDENT.tolist(), TEACHER.tolist())) / 2
    hard = sum(ce(s, y) for s, y in zip(STUDENT.tolist(), LABELS.tolist())) / 2
    assert terms["loss"].item() == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-9)


def test_label_smoothing_by_hand_and_equals_torch() -> None:
    m = make("label_smoothing", epsilon=0.1)
    assert not m.uses_teacher
    logits, labels = torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    p0 = math.exp(2) / (math.exp(2) + 1)
    by_hand = -(0.95 * math.log(p0) + 0.05 * math.log(1 - p0))  # target (1-eps) one_hot + eps/K
    assert m(StepInputs(logits, labels))["loss"].item() == pytest.approx(by_hand, rel=1e-12)
    torch.testing.assert_close(m(StepInputs(STUDENT, LABELS))["loss"],
                               F.cross_entropy(STUDENT, LABELS, label_smoothing=0.1))


def test_tf_kd_virtual_teacher_by_hand() -> None:
    m = make("tf_kd", alpha=0.3, T=2.0, correct_prob=0.9, multiplier=5.0)
    assert not m.uses_teacher
    u = virtual_teacher(torch.tensor([1]), 3, 0.9)
    torch.testing.assert_close(u, torch.tensor([[0.05, 0.9, 0.05]]))
    logits = [0.5, -1.0, 2.0]
    q = softmax([0.05, 0.9, 0.05], T=2.0)  # the virtual teacher softened by T
    reg = 5.0 * kl(q, softmax(logits))  # the student at T=1, as in the authors' code
    terms = m(StepInputs(torch.tensor([logits], dtype=torch.float64), torch.tensor([1])))
    assert terms["virtual_teacher_loss"].item() == pytest.approx(reg, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.7 * ce(logits, 1) + 0.3 * reg, rel=1e-6)


def test_dkd_by_hand() -> None:
    T, alpha, beta = 2.0, 1.5, 8.0
    m = make("dkd", T=T, alpha=alpha, beta=beta, ce_weight=1.0, warmup_epochs=2.0)
    s, t, y = [1.0, 2.0, 0.5], [2.0, 1.0, 0.0], 0
    ps, pt = softmax(s, T), softmax(t, T)
    tckd = kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = kl([pt[1] / (1 - pt[0]), pt[2] / (1 - pt[0])], [ps[1] / (1 - ps[0]), ps[2] / (1 - ps[0])])
    step = StepInputs(torch.tensor([s], dtype=torch.float64), torch.tensor([y]),
                      soft_targets(torch.tensor([t], dtype=torch.float64), T), progress=0.5)
    terms = m(step)
    assert terms["tckd"].item() == pytest.approx(T * T * tckd, rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(T * T * nckd, rel=1e-9)
    warmup = 0.5 / 2.0  # a quarter of the way through the 2 warm-up epochs
    expected = ce(s, y) + warmup * T * T * (alpha * tckd + beta * nckd)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)
    step.progress = 3.0  # after the warm-up: full weight
    assert m(step)["loss"].item() == pytest.approx(ce(s, y) + T * T * (alpha * tckd + beta * nckd), rel=1e-9)


def test_dkd_decomposes_kd_exactly() -> None:
    """DKD eq. (3): KD = TCKD + (1 - p_t^T) NCKD, per example, whatever the logits and T."""
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10, dtype=torch.float64) * 3, torch.randn(16, 10, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (16,))
    for T in (1.0, 4.0):
        tckd, nckd, p_t = dkd_parts(student, soft_targets(teacher, T), labels, T)
        kd_per_example = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="none",
                                  log_target=True).sum(1)
        torch.testing.assert_close(tckd + (1 - p_t) * nckd, kd_per_example)
        assert (T * T * (tckd + (1 - p_t) * nckd)).mean().item() == pytest.approx(kd_loss(student, teacher, T).item())


def test_at_by_hand_unit_norm_and_zero_for_identical() -> None:
    s = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)  # one channel, 1 x 2 map
    t = torch.tensor([2.0, 1.0]).view(1, 1, 1, 2)
    # Q = |A|^2 flattened, unit norm: [1, 4] / sqrt(17) and [4, 1] / sqrt(17); mean squared difference 9 / 17
    assert at_loss(s, t).item() == pytest.approx(9 / 17, rel=1e-6)
    features = torch.randn(4, 8, 5, 5)
    norms = attention_map(features).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(4))
    assert at_loss(features, features.clone()).item() == 0.0
    m = make("at", student_layers=["a"], teacher_layers=["b"], beta=1000.0)
    m.student_layers, m.teacher_layers = ["a"], ["b"]
    logits = torch.tensor([[0.0, 1.0]])
    terms = m(StepInputs(logits, torch.tensor([1]), features={"a": s}, teacher_features={"b": t}))
    assert terms["loss"].item() == pytest.approx(ce([0.0, 1.0], 1) + 1000 / 2 * 9 / 17, rel=1e-6)


def rkd_by_hand(s: list[list[float]], t: list[list[float]]) -> tuple[float, float]:
    """RKD's distance and angle losses with plain loops (Huber with delta 1, means over all entries)."""
    def huber(a: float, b: float) -> float:
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def dist(e: list[list[float]]) -> list[list[float]]:
        d = [[math.dist(a, b) for b in e] for a in e]
        mu = sum(v for row in d for v in row if v > 0) / sum(1 for row in d for v in row if v > 0)
        return [[v / mu for v in row] for row in d]

    def cosines(e: list[list[float]]) -> list[float]:
        def unit(v: list[float]) -> list[float]:
            n = math.hypot(*v)
            return [x / n for x in v] if n > 0 else [0.0] * len(v)
        out = []
        for i in range(len(e)):  # the angle at j of the triplet (i, j, k)
            for j in range(len(e)):
                for k in range(len(e)):
                    a = unit([x - y for x, y in zip(e[i], e[j])])
                    b = unit([x - y for x, y in zip(e[k], e[j])])
                    out.append(sum(x * y for x, y in zip(a, b)))
        return out

    ds, dt = dist(s), dist(t)
    n = len(s)
    distance = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    cs, ct = cosines(s), cosines(t)
    angle = sum(huber(a, b) for a, b in zip(cs, ct)) / len(cs)
    return distance, angle


def test_rkd_by_hand_and_invariant_to_scaling() -> None:
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    t = [[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]]  # another width: fine for RKD
    distance, angle = rkd_by_hand(s, t)
    S, Tt = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    assert distance_loss(S, Tt).item() == pytest.approx(distance, rel=1e-6)
    assert angle_loss(S, Tt).item() == pytest.approx(angle, rel=1e-6)
    m = make("rkd")
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    logits = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    terms = m(StepInputs(logits, labels, features={"s": S}, teacher_features={"t": Tt}))
    expected = F.cross_entropy(logits, labels).item() + 25 * distance + 50 * angle
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    S, Tt = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 7, dtype=torch.float64)
    for scale_s, scale_t in [(10.0, 1.0), (0.1, 3.0)]:
        assert distance_loss(S * scale_s, Tt * scale_t).item() == pytest.approx(distance_loss(S, Tt).item(), rel=1e-9)
        assert angle_loss(S * scale_s, Tt * scale_t).item() == pytest.approx(angle_loss(S, Tt).item(), rel=1e-9)


def test_fitnet_hint_by_hand() -> None:
    m = make("fitnet", beta=100.0)
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    m.build({"s": torch.zeros(1, 2)}, {"t": torch.zeros(1, 2)})  # flat features: a linear regressor
    with torch.no_grad():
        m.regressor.weight.copy_(torch.eye(2))
        m.regressor.bias.zero_()
    logits = torch.tensor([[0.0, 1.0]])
    terms = m(StepInputs(logits, torch.tensor([0]), features={"s": torch.tensor([[1.0, 2.0]])},
                         teacher_features={"t": torch.tensor([[1.0, 0.0]])}))
    assert terms["hint_loss"].item() == pytest.approx(2.0)  # ((1-1)^2 + (2-0)^2) / 2
    assert terms["loss"].item() == pytest.approx(ce([0.0, 1.0], 0) + 100 * 2.0, rel=1e-6)
    m.build({"s": torch.zeros(1, 8, 6, 6)}, {"t": torch.zeros(1, 32, 6, 6)})
    assert m.regressor(torch.zeros(3, 8, 6, 6)).shape == (3, 32, 6, 6)
    with pytest.raises(ConfigError, match=r"cannot be matched"):
        m.build({"s": torch.zeros(1, 8, 6, 6)}, {"t": torch.zeros(1, 32, 3, 3)})


def test_multi_teacher_averages_softened_outputs_and_equals_kd_for_copies() -> None:
    T = 3.0
    a, b = TEACHER, TEACHER.flip(1)
    mixed = ensemble_logits([a, b], normalized_weights([1.0, 3.0], 2), T)
    by_hand = [[0.25 * pa + 0.75 * pb for pa, pb in zip(softmax(ra, T), softmax(rb, T))]
               for ra, rb in zip(a.tolist(), b.tolist())]
    torch.testing.assert_close(F.softmax(mixed / T, 1), torch.tensor(by_hand, dtype=torch.float64))
    twice = ensemble_logits([a, a.clone()], normalized_weights(None, 2), T)
    torch.testing.assert_close(kd_loss(STUDENT, twice, T), kd_loss(STUDENT, a, T))
    # the online ensemble is the same function of the teachers' outputs as the cached one
    torch.manual_seed(0)
    teacher = MLP([8])
    ensemble = TeacherEnsemble([teacher, teacher], normalized_weights(None, 2), T)
    x, student = torch.randn(5, 1, 28, 28), torch.randn(5, 10)
    torch.testing.assert_close(kd_loss(student, ensemble(x), T), kd_loss(student, teacher(x), T))


# ---- hyper-parameters are validated like T and alpha ----------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("distill.method=nope", r"^distill.method='nope' is not accepted: one of kd, fitnet, at, dkd"),
    ("distill.dkd.beta=-1", r"^distill.dkd.beta=-1 is not accepted: a number >= 0$"),
    ("distill.label_smoothing.epsilon=1.5", r"^distill.label_smoothing.epsilon=1.5 is not accepted: a number in \[0, 1\]$"),
    ("distill.at.student_layers=[nolayer]", r"^distill.at.student_layers layer 'nolayer' is not a module of MnistConvStudent"),
    ("distill.multi_teacher.weights=[1.0]", r"^distill.multi_teacher.weights=\[1.0\] is not accepted: null \(equal\) or 2"),
])
def test_bad_method_settings_are_one_line_config_errors(override: str, message: str) -> None:
    method = override.split(".")[1].split("=")[0]
    cfg = compose_train_config(["module=distill", "model=mnist_conv_student",
                                *([] if method == "method" else [f"distill.method={method}"]), override])
    with pytest.raises(ConfigError, match=message):
        check_method(cfg)


def test_feature_method_on_a_net_without_maps_says_what_to_use() -> None:
    cfg = compose_train_config(["experiment=soft", "distill.method=fitnet"])  # the MLP student
    with pytest.raises(ConfigError, match=r"declares none \(feature_layers\): use a conv net \(e.g. model=mnist_conv_student\)"):
        check_method(cfg)


# ---- gradients: student and method parts, never the teacher ---------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "fitnet", "at", "dkd", "rkd", "tf_kd"])
def test_gradients_reach_student_and_method_parts_only(method: str) -> None:
    torch.manual_seed(0)
    student, teacher = MnistConvStudent(), MnistCNN() if get_method(method).uses_teacher else None
    distill = defaults(method)
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method=method,
                           method_hparams=distill[method] or None)
    module.build_method((1, 28, 28))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss = module.training_step((x, y, torch.arange(6)), 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in module.method.parameters())
    if teacher is not None:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for p in module.trainable_parameters()}
    assert optimized == {id(p) for p in [*student.parameters(), *module.method.parameters()]}
    if method == "fitnet":
        assert len(list(module.method.parameters())) > 0 and "method.regressor.0.weight" in module.state_dict()


# ---- through train.py: every method, MNIST and fake CIFAR; and one defined here -------------------------------
def save_random_teacher(path: Path, net: nn.Module, config: dict) -> Path:
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "net_config": config}, path)
    return path


QUICK = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
         "logger=[]", "callbacks.periodic_checkpoint=null", "callbacks.lr_monitor=null"]


def train_method(tmp_path: Path, method: str, *overrides: str) -> dict:
    from kd_lightning.train import train

    cfg = compose_train_config([f"distill.method={method}", *QUICK, f"paths.log_dir={tmp_path / 'logs'}",
                                f"paths.output_dir={tmp_path / method}", *overrides])
    return train(cfg)


@pytest.fixture(scope="module")
def mnist_teachers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("teachers")
    config = {"_target_": "kd_lightning.models.MnistCNN", "num_classes": 10}
    torch.manual_seed(0)
    return [save_random_teacher(root / f"t{i}.ckpt", MnistCNN(), config) for i in range(2)]


@pytest.fixture(scope="module")
def mnist_logits(tmp_path_factory: pytest.TempPathFactory, mnist_teachers: list[Path]) -> Path:
    """Both teachers' logits on the MNIST sample, computed once by train.py's own cache function into a
    `logits/` folder that each run below gets a copy of (in its own cache dir): it then checks and loads them."""
    from hydra.utils import instantiate

    from kd_lightning.teacher import cached_teacher_logits

    root = tmp_path_factory.mktemp("logits")
    cfg = compose_train_config(["experiment=soft", "data.download=false", f"paths.data_dir={root / 'data'}"])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    for ckpt in mnist_teachers:
        cached_teacher_logits(ckpt, load_net(ckpt), datamodule, root / "cache")
    return root / "cache" / "logits"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_mnist(tmp_path: Path, method: str, mnist_teachers: list[Path],
                                      mnist_logits: Path) -> None:
    shutil.copytree(mnist_logits, tmp_path / "logs" / "teachers" / "logits", ignore=shutil.ignore_patterns("*.lock"))
    teachers = f"distill.multi_teacher.teachers=[{{experiment: teacher, ckpt_path: {mnist_teachers[0]}}}, " \
               f"{{experiment: teacher, ckpt_path: {mnist_teachers[1]}}}]"
    result = train_method(tmp_path, method, "experiment=soft", "model=mnist_conv_student",
                          f"teacher.ckpt_path={mnist_teachers[0]}", teachers, "data.download=false",
                          f"paths.data_dir={tmp_path / 'data'}", "distill.crd.nce_k=1024")  # 3,200 digits
    assert 0 <= result["test/acc"] <= 1 and result["epochs"] == 1
    uses_teacher = get_method(method).uses_teacher
    assert (result["teacher_params"] is not None) == uses_teacher
    assert len(result["teacher_ckpts"]) == {"multi_teacher": 2}.get(method, int(uses_teacher))
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert all(k.startswith(("net.", "method.")) for k in state)  # no teacher; method parts apart
    assert isinstance(load_net(result["best_ckpt"]), MnistConvStudent)  # the bare student, rebuilt alone


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_fake_cifar(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from fake_data import write_cifar10

    for name, value in write_cifar10(tmp_path / "data", 40, 10).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)
    # The recipes' ResNets with one block per stage: the same stages, channels and feature maps (what the
    # methods use) as ResNet34 and its two-stage student, a quarter of the weights to build, save and run.
    small = "model.layers=[1,1,1,1]"
    config = {"_target_": "kd_lightning.models.CifarResNet", "layers": [1, 1, 1, 1], "num_classes": 10}
    torch.manual_seed(0)
    ckpt = save_random_teacher(tmp_path / "teacher.ckpt", CifarResNet([1, 1, 1, 1], num_classes=10), config)
    teachers = f"distill.multi_teacher.teachers=[{{experiment: cifar10_teacher, ckpt_path: {ckpt}, overrides: ['{small}']}}, " \
               f"{{experiment: cifar10_teacher, ckpt_path: {ckpt}, overrides: ['{small}']}}]"
    result = train_method(tmp_path, method, "experiment=cifar10_soft", small, f"teacher.ckpt_path={ckpt}",
                          f"teacher.overrides=['{small}']", teachers, "data.download=false",
                          f"paths.data_dir={tmp_path / 'data'}", "data.batch_size=8", "data.num_workers=0",
                          "distill.crd.nce_k=16")  # 36 training images
    assert 0 <= result["test/acc"] <= 1 and result["epochs"] == 1
    assert result["params"] == sum(p.numel() for p in CifarResNet([1, 1, 1, 1], stages=2).parameters())


@pytest.fixture
def mnist_teacher(tmp_path: Path) -> Path:
    config = {"_target_": "kd_lightning.models.MLP", "hidden": [16], "num_classes": 10}
    torch.manual_seed(0)
    return save_random_teacher(tmp_path / "teacher.ckpt", MLP([16]), config)


def test_a_method_defined_here_registers_and_trains(tmp_path: Path, mnist_teacher: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/methods.md, "Add your own": logit matching (Ba & Caruana 2014) with a learned logit scale."""
    from kd_lightning.methods.base import positive

    class LogitMatching(Method):
        name = "logit_matching"
        hparams = {"beta": positive}

        def __init__(self, distill: dict) -> None:
            super().__init__(distill)
            self.beta = self.hp["beta"]
            self.needs_teacher_targets = True  # log softmax(teacher / T), from the logit cache
            self.scale = nn.Parameter(torch.ones(()))  # a trainable part of the method

        def forward(self, step: StepInputs) -> dict[str, torch.Tensor]:
            ce_term = F.cross_entropy(step.logits, step.labels)
            match = F.mse_loss(F.log_softmax(self.scale * step.logits / self.T, 1), step.teacher_log_probs)
            return {"loss": ce_term + self.beta * match, "hard_loss": ce_term, "match_loss": match}

    monkeypatch.setitem(METHODS, "logit_matching", None)  # removed again after the test
    register(LogitMatching)
    result = train_method(tmp_path, "logit_matching", "experiment=soft", "+distill.logit_matching.beta=2.0",
                          f"teacher.ckpt_path={mnist_teacher}", "teacher.overrides=['model=mlp_784_16_10']",
                          "data.download=false",
                          f"paths.data_dir={tmp_path / 'data'}")
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert "method.scale" in state and state["method.scale"].item() != 1.0  # it trained with the student
    assert isinstance(load_net(result["best_ckpt"]), MLP)
    with pytest.raises(ConfigError, match=r"^distill.logit_matching.beta=0 is not accepted: a number > 0$"):
        check_method(compose_train_config(["experiment=soft", "distill.method=logit_matching",
                                           "+distill.logit_matching.beta=0"]))


def test_kd_method_keeps_cached_logits_and_feature_methods_run_the_teacher(mnist_teacher: Path) -> None:
    student = MnistConvStudent()
    kd = DistillModule(student, MnistCNN(), optimizer=partial(torch.optim.SGD, lr=0.1), group="soft")
    logits = {s: torch.randn(10, 10) for s in ("train", "val", "test")}
    kd.use_cached_teacher_logits(logits)
    assert kd.cached_splits == {"train", "val", "test"}
    at = DistillModule(student, MnistCNN(), optimizer=partial(torch.optim.SGD, lr=0.1), method="at",
                       method_hparams=defaults("at")["at"])
    at.use_cached_teacher_logits(logits)
    assert at.cached_splits == {"val", "test"} and at.method.teacher_layers == ["features.1", "features.3"]


def test_no_teacher_method_builds_no_teacher() -> None:
    cfg = compose_train_config(["experiment=soft"])
    for method in ("label_smoothing", "tf_kd"):
        assert get_method(method).teacher_runs(cfg) == []  # train.py ensures (trains) no teacher
        assert get_method(method).load_teacher(cfg, [], lambda *a: pytest.fail("a teacher was loaded")) is None
    assert get_method("kd").teacher_runs(cfg) == [cfg]



def test_report_has_a_method_column_and_groups_by_it(tmp_path: Path) -> None:
    import json

    import yaml

    from kd_lightning.report import load_results, markdown_table

    jobs = [("kd", 0.90), ("kd", 0.92), ("at", 0.95), ("at", 0.97), ("label_smoothing", 0.80)]
    for i, (method, acc) in enumerate(jobs):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        config = {"module": {"_target_": "kd_lightning.modules.DistillModule"}, "seed": i,
                  "distill": {"method": method, "group": "hard_soft", "T": 2.0, "alpha": 0.8}}
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / "metrics.json").write_text(json.dumps({"val/acc": acc, "test/acc": acc, "test/loss": 1 - acc}))
    rows = load_results(tmp_path)
    assert [(r["method"], r["group"], r["T"]) for r in rows[:3]] == [("kd", "hard_soft", 2.0), ("kd", "hard_soft", 2.0),
                                                                    ("at", None, None)]
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| method | group | T | alpha | runs |")
    assert table[2].startswith("| at **(best)** | - | - | - | 2 | 0.9600 ± 0.0141 |")
    assert table[3].startswith("| kd | hard_soft | 2 | 0.8 | 2 | 0.9100 ± 0.0141 |")
    assert table[4].startswith("| label_smoothing | - | - | - | 1 | 0.8000 |")


def test_conv_student_is_small_and_its_maps_match_the_teachers() -> None:
    student, teacher = MnistConvStudent(), MnistCNN()
    assert sum(p.numel() for p in student.parameters()) == 38_298  # 80 + 1,168 + 36,880 + 170
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        from kd_lightning.methods.base import capture

        with capture(student, student.feature_layers) as s, capture(teacher.eval(), teacher.feature_layers) as t:
            student(x), teacher(x)
    assert [tuple(s[k].shape[2:]) for k in student.feature_layers] == [(26, 26), (24, 24)]
    assert [tuple(s[k].shape[2:]) for k in student.feature_layers] == [tuple(t[k].shape[2:]) for k in teacher.feature_layers]
    assert CifarResNet(stages=2).feature_layers == ("layer1", "layer2")
