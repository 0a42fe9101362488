"""Distillation methods (kd_lightning/methods): each loss against values computed by hand and a property of
its paper; gradients reach the student and the method's parts only; every method trains through train.py;
a method defined here is registered and trained (the "add your own method" path of docs/methods.md)."""

import math
import re
import shutil
import sys
from functools import cache, partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from helpers import QUICK_RUN, fake_cifar10_with_a_tiny_teacher, save_random_teacher
from kd_lightning.checkpoints import load_net
from kd_lightning.config import compose_train_config
from kd_lightning.errors import ConfigError
from kd_lightning.losses import kd_loss, soft_targets, standardize
from kd_lightning.methods import METHODS, Method, StepInputs, check_method, get_method, register
from kd_lightning.methods.at import at_loss, attention_map
from kd_lightning.methods.base import capture, positive
from kd_lightning.methods.dist import inter_class_relation, intra_class_relation
from kd_lightning.methods.dkd import dkd_parts
from kd_lightning.methods.kd import KD
from kd_lightning.methods.multi_teacher import TeacherEnsemble, ensemble_logits, normalized_weights
from kd_lightning.methods.rkd import angle_loss, distance_loss
from kd_lightning.methods.tf_kd import virtual_teacher, virtual_teacher_target
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


def test_tf_kd_paper_form_by_hand_is_the_default() -> None:
    """Issue 22 point 3: the paper's Eq. 9 with the student softened at T too and the T^2 factor."""
    assert make("tf_kd").form == "paper"
    m = make("tf_kd", alpha=0.3, T=2.0, correct_prob=0.9, multiplier=5.0)
    assert not m.uses_teacher
    u = virtual_teacher(torch.tensor([1]), 3, 0.9)
    torch.testing.assert_close(u, torch.tensor([[0.05, 0.9, 0.05]]))
    logits = [0.5, -1.0, 2.0]
    q = softmax([0.05, 0.9, 0.05], T=2.0)  # the virtual teacher softened by T
    reg = 5.0 * 2.0**2 * kl(q, softmax(logits, T=2.0))  # the student at T as well, times T^2
    terms = m(StepInputs(torch.tensor([logits], dtype=torch.float64), torch.tensor([1])))
    assert terms["virtual_teacher_loss"].item() == pytest.approx(reg, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(0.7 * ce(logits, 1) + 0.3 * reg, rel=1e-9)


def test_tf_kd_authors_code_form_by_hand() -> None:
    m = make("tf_kd", alpha=0.3, T=2.0, correct_prob=0.9, multiplier=5.0, form="authors_code")
    logits = [0.5, -1.0, 2.0]
    reg = 5.0 * kl(softmax([0.05, 0.9, 0.05], T=2.0), softmax(logits))  # the student at T=1, no T^2
    terms = m(StepInputs(torch.tensor([logits], dtype=torch.float64), torch.tensor([1])))
    assert terms["virtual_teacher_loss"].item() == pytest.approx(reg, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(0.7 * ce(logits, 1) + 0.3 * reg, rel=1e-9)


def test_tf_kd_target_at_the_defaults_is_nearly_uniform() -> None:
    """The figures docs/methods.md gives: T=20, a=0.99, 10 classes -> 0.1045 on the label, 0.0995 elsewhere."""
    hp = make("tf_kd").hp
    target = virtual_teacher_target(torch.tensor([3]), 10, hp["correct_prob"], hp["T"])[0]
    other = (1 - 0.99) / 9
    by_hand = math.exp(0.99 / 20) / (math.exp(0.99 / 20) + 9 * math.exp(other / 20))
    assert target[3].item() == pytest.approx(by_hand, rel=1e-6) and round(by_hand, 4) == 0.1045
    assert round((1 - by_hand) / 9, 4) == 0.0995 and target[0].item() == pytest.approx((1 - by_hand) / 9, rel=1e-6)


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
    warmup = 1 / 2.0  # mdistiller: min(epoch / W, 1) with epoch = 1 all through the first epoch
    expected = ce(s, y) + warmup * T * T * (alpha * tckd + beta * nckd)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)
    step.progress = 3.0  # after the warm-up: full weight
    assert m(step)["loss"].item() == pytest.approx(ce(s, y) + T * T * (alpha * tckd + beta * nckd), rel=1e-9)


@pytest.mark.parametrize(("progress", "W", "factor"), [
    (0.0, 1.0, 1.0),     # the default W=1: full weight from the first step (issue 22 point 4: was 0)
    (0.99, 1.0, 1.0),
    (0.0, 20.0, 0.05),   # mdistiller's W=20: 1/20 through epoch 1 ...
    (0.7, 20.0, 0.05),
    (1.0, 20.0, 0.10),   # ... 2/20 through epoch 2
    (19.5, 20.0, 1.0),   # epoch 20: full weight
    (0.0, 0.0, 1.0),     # no warm-up
])
def test_dkd_warmup_is_mdistillers_epoch_counted_from_one(progress: float, W: float, factor: float) -> None:
    m = make("dkd", warmup_epochs=W)
    s, t = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    step = StepInputs(s, torch.tensor([0]), soft_targets(t, 4.0), progress=progress)
    terms = m(step)
    expected = terms["hard_loss"] + factor * (1.0 * terms["tckd"] + 8.0 * terms["nckd"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


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
    # issue 22 point 1: beta applied to the sum as the authors' code, mdistiller and RepDistiller do (no 1/2)
    assert terms["loss"].item() == pytest.approx(ce([0.0, 1.0], 1) + 1000 * 9 / 17, rel=1e-6)


def test_at_pools_the_larger_map_to_the_smallers_size_by_hand() -> None:
    """Issue 22 point 7: mdistiller's / RepDistiller's adaptive average pooling before the attention maps."""
    big = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).view(1, 1, 2, 4)
    small = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    pooled = [(1 + 2 + 5 + 6) / 4, (3 + 4 + 7 + 8) / 4]  # the 2 x 4 map averaged over its two 2 x 2 blocks

    def unit(v: list[float]) -> list[float]:
        return [x / math.hypot(*v) for x in v]

    q_big, q_small = unit([v * v for v in pooled]), unit([1.0, 4.0])
    by_hand = sum((a - b) ** 2 for a, b in zip(q_big, q_small)) / 2
    assert at_loss(big, small).item() == pytest.approx(by_hand, rel=1e-6)  # the student's map is the larger
    assert at_loss(small, big).item() == pytest.approx(by_hand, rel=1e-6)  # the teacher's map is the larger


class TwoScaleStudent(nn.Module):
    """A student whose maps are 28 x 28 and 14 x 14 (the MNIST teacher's are 26 x 26 and 24 x 24)."""

    feature_layers = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def test_at_pairs_maps_of_different_sizes_with_the_mnist_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = TwoScaleStudent(), MnistCNN()
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="at",
                           method_hparams=defaults("at")["at"])
    module.build_method((1, 28, 28))  # refused before: maps of the same height and width only
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = module.training_step((x, y, torch.arange(4)), 0)
    with torch.no_grad(), capture(student, ["a", "b"]) as s, capture(teacher, list(teacher.feature_layers)) as t:
        student(x), teacher(x)
    fs, ft = [s["a"], s["b"]], [t[k] for k in teacher.feature_layers]
    assert [tuple(f.shape[2:]) for f in fs + ft] == [(28, 28), (14, 14), (26, 26), (24, 24)]
    pooled = (F.adaptive_avg_pool2d(fs[0], (26, 26)), ft[0]), (fs[1], F.adaptive_avg_pool2d(ft[1], (14, 14)))
    at = sum((attention_map(a) - attention_map(b)).pow(2).mean() for a, b in pooled)
    assert loss.item() == pytest.approx((F.cross_entropy(student(x), y) + 1000 * at).item(), rel=1e-5)


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


def test_rkd_and_dist_skip_their_relational_terms_on_a_batch_of_one_and_count_it() -> None:
    """Issue 22 point 5: a ragged last batch of one example was a NaN loss (the run stopped)."""
    torch.manual_seed(0)
    for method, relational in (("rkd", ("distance_loss", "angle_loss")), ("dist", ("intra_loss",))):
        teacher = MnistCNN()
        module = DistillModule(MnistConvStudent(), teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method=method,
                               method_hparams=defaults(method)[method])
        module.build_method((1, 28, 28))
        x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
        terms = module.method(module_step(module, x, y))
        assert all(terms[k].item() == 0.0 for k in relational) and torch.isfinite(terms["loss"])
        loss = module.training_step((x, y, torch.arange(1)), 0)  # raised NonFiniteLossError before
        assert torch.isfinite(loss) and module.method.small_batches_skipped == 2
        if method == "rkd":
            assert loss.item() == pytest.approx(F.cross_entropy(module.net(x), y).item(), rel=1e-5)
        loss.backward()
        module.training_step((torch.randn(2, 1, 28, 28), torch.tensor([3, 4]), torch.arange(2)), 1)
        assert module.method.small_batches_skipped == 2  # two examples: the terms are computed


def module_step(module: DistillModule, x: torch.Tensor, y: torch.Tensor) -> StepInputs:
    """The StepInputs DistillModule.training_step gives its method (teacher run online)."""
    method = module.method
    with capture(module.net, method.student_layers) as features:
        logits = module.net(x)
    step = StepInputs(logits, y, features=features)
    with torch.no_grad(), capture(module.teacher, method.teacher_layers) as step.teacher_features:
        step.teacher_logits = module.teacher(x)
    step.teacher_log_probs = method.teacher_targets(step.teacher_logits)
    return step


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


@pytest.mark.parametrize(("s_hw", "t_hw", "conv", "kernel", "stride"), [
    ((6, 6), (6, 6), nn.Conv2d, (1, 1), (1, 1)),            # same size: 1x1 (issue 22 point 2: was 3x3)
    ((12, 12), (6, 6), nn.Conv2d, (3, 3), (2, 2)),          # twice the size: 3x3, stride 2
    ((3, 3), (6, 6), nn.ConvTranspose2d, (4, 4), (2, 2)),   # half the size: transposed 4x4, stride 2
    ((28, 28), (26, 26), nn.Conv2d, (3, 3), (1, 1)),        # larger: a kernel mapping the sizes
    ((8, 7), (6, 6), nn.Conv2d, (3, 2), (1, 1)),
])
def test_fitnet_regressor_is_repdistillers_convreg(s_hw: tuple, t_hw: tuple, conv: type, kernel: tuple,
                                                   stride: tuple) -> None:
    m = make("fitnet")
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    m.build({"s": torch.zeros(1, 8, *s_hw)}, {"t": torch.zeros(1, 32, *t_hw)})
    first, bn, relu = m.regressor
    assert type(first) is conv and first.kernel_size == kernel and first.stride == stride
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    assert m.regressor(torch.randn(3, 8, *s_hw)).shape == (3, 32, *t_hw)
    if s_hw == t_hw:  # 8 * 32 weights + 32 biases + BatchNorm's 2 * 32
        assert sum(p.numel() for p in m.regressor.parameters()) == 8 * 32 + 32 + 64


def test_fitnet_refuses_a_smaller_student_map_in_one_line() -> None:
    m = make("fitnet")
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    with pytest.raises(ConfigError, match=r"^distill.fitnet: student layer s \(8, 4, 4\) and teacher layer t "
                                          r"\(32, 6, 6\) cannot be matched: accepted are maps"):
        m.build({"s": torch.zeros(1, 8, 4, 4)}, {"t": torch.zeros(1, 32, 6, 6)})


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


# ---- logit standardization ------------------------------------------------------------------------------------
def zscore(row: list[float]) -> list[float]:
    """(z - mean) / (1e-7 + sd), sd with Bessel's correction (the reference code's torch.std)."""
    mean = sum(row) / len(row)
    sd = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (1e-7 + sd) for v in row]


def ls_kd_by_hand(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    return T * T * sum(kl(softmax(zscore(t), T), softmax(zscore(s), T)) for s, t in zip(student, teacher)) / len(student)


def test_standardize_by_hand() -> None:
    torch.testing.assert_close(standardize(STUDENT), torch.tensor([zscore(r) for r in STUDENT.tolist()], dtype=torch.float64))


def test_logit_standardization_kd_by_hand_at_the_base_temperature() -> None:
    distill = {**defaults("kd"), "T": 4.0, "logit_standardization": True, "base_T": 2.0}
    m = KD(distill)
    assert m.T == 2.0  # the paper's base temperature, not distill.T
    targets = m.teacher_targets(TEACHER)
    torch.testing.assert_close(targets.exp(), torch.tensor([softmax(zscore(t), 2.0) for t in TEACHER.tolist()],
                                                           dtype=torch.float64))
    terms = m(StepInputs(STUDENT, LABELS, targets))
    soft = ls_kd_by_hand(STUDENT.tolist(), TEACHER.tolist(), 2.0)
    hard = sum(ce(s, y) for s, y in zip(STUDENT.tolist(), LABELS.tolist())) / 2  # on the raw logits
    assert terms["soft_loss"].item() == pytest.approx(soft, rel=1e-9)
    assert terms["hard_loss"].item() == pytest.approx(hard, rel=1e-12)
    assert terms["loss"].item() == pytest.approx(0.8 * soft + 0.2 * hard, rel=1e-9)


def test_logit_standardization_dkd_by_hand() -> None:
    distill = {**defaults("dkd", warmup_epochs=0.0), "logit_standardization": True, "base_T": 2.0}
    m = get_method("dkd")(distill)
    assert m.T == 2.0  # not distill.dkd.T = 4
    s, t = zscore([1.0, 2.0, 0.5]), zscore([2.0, 1.0, 0.0])
    ps, pt = softmax(s, 2.0), softmax(t, 2.0)
    tckd = kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = kl([pt[1] / (1 - pt[0]), pt[2] / (1 - pt[0])], [ps[1] / (1 - ps[0]), ps[2] / (1 - ps[0])])
    raw_s, raw_t = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    terms = m(StepInputs(raw_s, torch.tensor([0]), m.teacher_targets(raw_t)))
    assert terms["loss"].item() == pytest.approx(ce([1.0, 2.0, 0.5], 0) + 4 * (tckd + 8 * nckd), rel=1e-9)


@pytest.mark.parametrize("method", ["kd", "dkd", "multi_teacher"])
def test_logit_standardization_is_invariant_to_shift_and_scale_of_either_side(method: str) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10, dtype=torch.float64) * 3, torch.randn(8, 10, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (8,))
    m = get_method(method)({**defaults(method, warmup_epochs=0.0), "logit_standardization": True, "base_T": 2.0})

    def soft(s: torch.Tensor, t: torch.Tensor) -> float:
        if method == "multi_teacher":  # the ensemble's logits, each teacher z-scored
            t = ensemble_logits([t, t.clone()], normalized_weights(None, 2), 2.0, standardized=True)
        terms = m(StepInputs(s, labels, m.teacher_targets(t)))
        return (terms["loss"] - terms["hard_loss"] * (0.2 if method != "dkd" else 1.0)).item()

    base = soft(student, teacher)
    assert base > 0
    for s, t in [(student + 5.0, teacher), (student * 3.0, teacher), (student, teacher * 0.25 - 7.0),
                 (student * 10.0 - 2.0, teacher * 0.5 + torch.randn(8, 1, dtype=torch.float64))]:
        assert soft(s, t) == pytest.approx(base, rel=1e-6)
    plain = get_method(method)({**defaults(method, warmup_epochs=0.0), "T": 2.0})  # a control: without, it moves
    scaled = plain(StepInputs(student * 3.0, labels, plain.teacher_targets(teacher)))["loss"].item()
    assert scaled != pytest.approx(plain(StepInputs(student, labels, plain.teacher_targets(teacher)))["loss"].item(), rel=1e-3)


def test_logit_standardization_multi_teacher_zscores_each_teacher() -> None:
    T = 2.0
    a, b = TEACHER, TEACHER.flip(1) * 3
    mixed = ensemble_logits([a, b], normalized_weights([1.0, 3.0], 2), T, standardized=True)
    by_hand = [[0.25 * pa + 0.75 * pb for pa, pb in zip(softmax(zscore(ra), T), softmax(zscore(rb), T))]
               for ra, rb in zip(a.tolist(), b.tolist())]
    m = get_method("multi_teacher")({**defaults("multi_teacher"), "logit_standardization": True, "base_T": T})
    torch.testing.assert_close(m.teacher_targets(mixed).exp(), torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize(("override", "message"), [
    ("distill.method=at", r"^distill.logit_standardization=true is not accepted with distill.method=at: it applies "
                          r"to kd, dkd, multi_teacher$"),
    ("distill.base_T=0", r"^distill.base_T=0 is not accepted: a number > 0$"),
])
def test_logit_standardization_settings_are_checked(override: str, message: str) -> None:
    cfg = compose_train_config(["module=distill", "model=mnist_conv_student", "distill.logit_standardization=true",
                                override])
    with pytest.raises(ConfigError, match=message):
        check_method(cfg)


def test_logit_standardization_is_not_batched() -> None:
    from kd_lightning.batched.groups import not_batchable

    cfg = compose_train_config(["experiment=soft", "distill.logit_standardization=true"])
    assert not_batchable(cfg) == "distill.logit_standardization=true (the stacked loop trains kd's loss groups on raw logits)"


# ---- DIST ----------------------------------------------------------------------------------------------------------
def pearson_by_hand(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + 1e-8)


def test_dist_by_hand() -> None:
    tau, beta, gamma = 2.0, 1.5, 3.0
    m = make("dist", beta=beta, gamma=gamma, tau=tau, ce_weight=1.0)
    ys = [softmax(r, tau) for r in STUDENT.tolist()]
    yt = [softmax(r, tau) for r in TEACHER.tolist()]
    inter = 1 - sum(pearson_by_hand(a, b) for a, b in zip(ys, yt)) / 2
    columns = lambda y: [list(c) for c in zip(*y)]  # noqa: E731
    intra = 1 - sum(pearson_by_hand(a, b) for a, b in zip(columns(ys), columns(yt))) / 3
    terms = m(StepInputs(STUDENT, LABELS, teacher_logits=TEACHER))
    assert terms["inter_loss"].item() == pytest.approx(tau**2 * inter, rel=1e-9)
    assert terms["intra_loss"].item() == pytest.approx(tau**2 * intra, rel=1e-9)
    hard = sum(ce(s, y) for s, y in zip(STUDENT.tolist(), LABELS.tolist())) / 2
    assert terms["loss"].item() == pytest.approx(hard + tau**2 * (beta * inter + gamma * intra), rel=1e-9)


def test_dist_relations_vanish_for_positive_affine_maps() -> None:
    """Pearson's correlation: 0 for probabilities that are a positive affine map of the teacher's per row
    (inter-class) and per column (intra-class); the whole loss 0 when the student's logits are the teacher's
    plus a constant per row (the same probabilities); a negative map is not 0."""
    torch.manual_seed(0)
    y_t = F.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    tol = 1e-5  # the reference's eps of 1e-8 beside norms of ~1e-2: a relative 1e-6
    a, b = torch.rand(6, 1, dtype=torch.float64) + 0.1, torch.randn(6, 1, dtype=torch.float64)
    assert inter_class_relation(a * y_t + b, y_t).item() == pytest.approx(0.0, abs=tol)
    c, d = torch.rand(1, 5, dtype=torch.float64) + 0.1, torch.randn(1, 5, dtype=torch.float64)
    assert intra_class_relation(c * y_t + d, y_t).item() == pytest.approx(0.0, abs=tol)
    assert inter_class_relation(-y_t, y_t).item() == pytest.approx(2.0, abs=tol)
    other = F.softmax(torch.randn(6, 5, dtype=torch.float64), 1)  # a control: unrelated probabilities
    assert inter_class_relation(other, y_t).item() > 0.1 and intra_class_relation(other, y_t).item() > 0.1
    teacher = torch.randn(6, 5, dtype=torch.float64) * 2
    student = teacher + torch.randn(6, 1, dtype=torch.float64) * 4  # a constant per row
    terms = make("dist")(StepInputs(student, torch.zeros(6, dtype=torch.long), teacher_logits=teacher))
    assert terms["inter_loss"].item() == pytest.approx(0.0, abs=16 * tol)  # tau^2 = 16
    assert terms["intra_loss"].item() == pytest.approx(0.0, abs=16 * tol)
    assert make("dist")(StepInputs(-teacher, torch.zeros(6, dtype=torch.long), teacher_logits=teacher))["inter_loss"] > 1


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
    with pytest.raises(ConfigError, match=r"declares none \(its feature_layers attribute, docs/models.md\): set distill.fitnet.student_layer .* \(e.g. model=mnist_conv_student"):
        check_method(cfg)


# ---- gradients: student and method parts, never the teacher ---------------------------------------------------
@pytest.mark.parametrize(("method", "standardized"), [
    ("kd", False), ("fitnet", False), ("at", False), ("dkd", False), ("rkd", False), ("tf_kd", False),
    ("dist", False), ("label_smoothing", False), ("multi_teacher", False),
    ("kd", True), ("dkd", True), ("multi_teacher", True),
])
def test_gradients_reach_student_and_method_parts_only(method: str, standardized: bool) -> None:
    torch.manual_seed(0)
    student, teacher = MnistConvStudent(), MnistCNN() if get_method(method).uses_teacher else None
    if method == "multi_teacher":
        teacher = TeacherEnsemble([MnistCNN(), MnistCNN()], normalized_weights(None, 2), 2.0, standardized)
    distill = defaults(method)
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method=method,
                           method_hparams=distill[method] or None, logit_standardization=standardized)
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
@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The student's weights when fit starts and every training loss, recorded from inside the run."""
    from kd_lightning.modules import ClassifierModule

    seen: dict = {"losses": []}
    on_fit_start, log_train_terms = ClassifierModule.on_fit_start, ClassifierModule.log_train_terms

    def record_start(self) -> None:
        seen["initial"] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        on_fit_start(self)

    def record_terms(self, terms: dict, n: int) -> None:
        seen["losses"].append(float(terms["loss"].detach()))
        log_train_terms(self, terms, n)

    monkeypatch.setattr(ClassifierModule, "on_fit_start", record_start)
    monkeypatch.setattr(ClassifierModule, "log_train_terms", record_terms)
    return seen


def assert_student_trained(result: dict, seen: dict) -> None:
    """Every training loss was finite and the student's weights moved (a loss without gradient leaves them)."""
    assert seen["losses"] and all(math.isfinite(loss) for loss in seen["losses"])
    trained = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    moved = [k for k, v in seen["initial"].items() if v.is_floating_point() and not torch.equal(trained[f"net.{k}"], v)]
    assert moved, "no weight of the student changed"


def train_method(tmp_path: Path, method: str, *overrides: str) -> dict:
    from kd_lightning.train import train

    cfg = compose_train_config([f"distill.method={method}", *QUICK_RUN, f"paths.log_dir={tmp_path / 'logs'}",
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
@pytest.mark.parametrize(("method", "standardized"), [*((m, False) for m in METHODS),
                                                     ("kd", True), ("dkd", True), ("multi_teacher", True)])
def test_every_method_trains_on_mnist(tmp_path: Path, method: str, standardized: bool, mnist_teachers: list[Path],
                                      mnist_logits: Path, watched: dict) -> None:
    shutil.copytree(mnist_logits, tmp_path / "logs" / "teachers" / "logits", ignore=shutil.ignore_patterns("*.lock"))
    teachers = f"distill.multi_teacher.teachers=[{{experiment: teacher, ckpt_path: {mnist_teachers[0]}}}, " \
               f"{{experiment: teacher, ckpt_path: {mnist_teachers[1]}}}]"
    result = train_method(tmp_path, method, "experiment=soft", "model=mnist_conv_student",
                          f"teacher.ckpt_path={mnist_teachers[0]}", teachers, "data.download=false",
                          f"paths.data_dir={tmp_path / 'data'}", f"distill.logit_standardization={str(standardized).lower()}",
                          "distill.crd.nce_k=1024")  # 3,200 digits
    assert 0 <= result["test/acc"] <= 1 and result["epochs"] == 1
    assert_student_trained(result, watched)
    if get_method(method).uses_teacher:
        assert math.isfinite(result["test/soft_loss"])
    uses_teacher = get_method(method).uses_teacher
    assert (result["teacher_params"] is not None) == uses_teacher
    assert len(result["teacher_ckpts"]) == {"multi_teacher": 2}.get(method, int(uses_teacher))
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert all(k.startswith(("net.", "method.")) for k in state)  # no teacher; method parts apart
    assert isinstance(load_net(result["best_ckpt"]), MnistConvStudent)  # the bare student, rebuilt alone


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rkd", "dist"])
def test_a_ragged_last_batch_of_one_trains_and_is_reported(tmp_path: Path, method: str, mnist_teachers: list[Path],
                                                           mnist_logits: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 22 point 5 through train.py: the sample's 3,200 training digits in batches of 457 end on a batch of one."""
    shutil.copytree(mnist_logits, tmp_path / "logs" / "teachers" / "logits", ignore=shutil.ignore_patterns("*.lock"))
    with caplog.at_level("WARNING", logger="kd_lightning.modules.distill"):
        result = train_method(tmp_path, method, "experiment=soft", "model=mnist_conv_student", "data.batch_size=457",
                              "~trainer.limit_train_batches", f"teacher.ckpt_path={mnist_teachers[0]}",
                              "data.download=false", f"paths.data_dir={tmp_path / 'data'}")
    assert result["epochs"] == 1 and math.isfinite(result["test/loss"])
    assert f"distill.method={method}: 1 training batch(es) of fewer than 2 examples had no relational term this epoch" \
        in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_fake_cifar(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch,
                                           watched: dict) -> None:
    ckpt, cifar = fake_cifar10_with_a_tiny_teacher(tmp_path, monkeypatch)
    small = "model.layers=[1,1,1,1]"
    teachers = f"distill.multi_teacher.teachers=[{{experiment: cifar10_teacher, ckpt_path: {ckpt}, overrides: ['{small}']}}, " \
               f"{{experiment: cifar10_teacher, ckpt_path: {ckpt}, overrides: ['{small}']}}]"
    result = train_method(tmp_path, method, *cifar, teachers, "distill.crd.nce_k=16")  # 36 training images
    assert 0 <= result["test/acc"] <= 1 and result["epochs"] == 1
    assert_student_trained(result, watched)
    assert result["params"] == sum(p.numel() for p in CifarResNet([1, 1, 1, 1], stages=2).parameters())


@pytest.fixture
def mnist_teacher(tmp_path: Path) -> Path:
    config = {"_target_": "kd_lightning.models.MLP", "hidden": [16], "num_classes": 10}
    torch.manual_seed(0)
    return save_random_teacher(tmp_path / "teacher.ckpt", MLP([16]), config)


@pytest.mark.slow  # trains
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


def documented_method_file() -> tuple[str, str]:
    """The module name and source of the method file docs/methods.md shows under "Add your own method"."""
    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    section = page.split("## Add your own method", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    path = re.match(r"# (kd_lightning/methods/\w+\.py)\n", source).group(1)
    return Path(path).stem, source


@pytest.mark.slow  # trains
def test_the_documented_method_file_is_all_a_new_method_takes(tmp_path: Path, mnist_teacher: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22 point 8: the docs' file, put in the package as a new module, imports (from base, no circular
    import), registers, takes its defaults from the file (no config section) and trains through train()."""
    import kd_lightning.methods as methods_package

    name, source = documented_method_file()
    assert "from kd_lightning.methods.base import" in source
    folder = tmp_path / "new_methods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(source)
    monkeypatch.setattr(methods_package, "__path__", [*methods_package.__path__, str(folder)])  # as if in the folder
    module_name = f"kd_lightning.methods.{name}"
    assert name not in METHODS and module_name not in sys.modules
    try:
        cfg = compose_train_config(["experiment=soft", f"distill.method={name}"])
        assert name not in cfg.distill  # no section in the config
        check_method(cfg)
        assert get_method(name).defaults == {"beta": 0.1}
        result = train_method(tmp_path, name, "experiment=soft", f"teacher.ckpt_path={mnist_teacher}",
                              "teacher.overrides=['model=mlp_784_16_10']", "data.download=false",
                              f"paths.data_dir={tmp_path / 'data'}")
    finally:  # the module and its method gone again
        sys.modules.pop(module_name, None)
        METHODS.pop(name, None)
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert "method.scale" in state and state["method.scale"].item() != 1.0  # it trained with the student


def test_a_method_missing_a_setting_names_it_in_one_line() -> None:
    class NeedsBeta(Method):
        name = "needs_beta"
        hparams = {"beta": positive, "gamma": positive}

    with pytest.raises(ConfigError, match=r"^distill.method=needs_beta needs distill.needs_beta.beta, "
                                          r"distill.needs_beta.gamma: give them on the command line "
                                          r"\(\+distill.needs_beta.beta=...\) or in the defaults of the method's class$"):
        NeedsBeta.check({"T": 2.0, "needs_beta": None})
    NeedsBeta.check({"T": 2.0, "needs_beta": {"beta": 1.0, "gamma": 2.0}})


def test_the_config_lists_each_methods_file_defaults() -> None:
    distill = distill_defaults()
    for name in ("fitnet", "at", "dkd", "rkd", "multi_teacher", "label_smoothing", "tf_kd", "dist", "crd", "reviewkd"):
        assert OmegaConf.to_container(distill[name]) == get_method(name).defaults, name


def test_the_documented_hooks_exist() -> None:
    """docs/methods.md's list of what a method can declare names real attributes and hooks only."""
    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    declared = page.split("What a method can declare", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`(?:self\.|step\.)?([a-z_]+)(?:\(|`| =)", declared)) - {"true", "false"}
    assert {"teacher_runs", "load_teacher", "cached_teacher_logits", "teacher_logits", "needs_teacher_targets"} <= names
    import builtins

    import kd_lightning.methods.base as base

    fields = set(StepInputs.__dataclass_fields__)
    instance_attributes = {"needs_teacher_targets", "student_layers", "teacher_layers"}
    known = fields | instance_attributes | set(Method.__annotations__) | set(dir(builtins))  # name; int(progress)
    missing = {n for n in names if not hasattr(Method, n) and n not in known and not hasattr(base, n)}
    assert not missing, missing
    assert "provide_teacher" not in page


class RecordingMethod(Method):
    """Records what the module gives its loss."""

    name = "recording"

    def __init__(self, distill: dict) -> None:
        super().__init__(distill)
        self.needs_teacher_targets = True
        self.seen: list[StepInputs] = []

    def forward(self, step: StepInputs) -> dict[str, torch.Tensor]:
        self.seen.append(step)
        return {"loss": F.cross_entropy(step.logits, step.labels)}


def test_methods_receive_the_teachers_logits_cached_and_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "recording", RecordingMethod)
    torch.manual_seed(0)
    teacher = MnistCNN().eval()
    x, y, idx = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.tensor([5, 0, 7, 2])
    with torch.no_grad():
        expected = teacher(x)
    online = DistillModule(MnistConvStudent(), teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="recording")
    online.training_step((x, y, idx), 0)
    cached = DistillModule(MnistConvStudent(), teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="recording")
    table = torch.randn(8, 10)
    table[idx] = expected
    cached.use_cached_teacher_logits({"train": table})
    cached.training_step((x, y, idx), 0)
    for module in (online, cached):
        step = module.method.seen[-1]
        torch.testing.assert_close(step.teacher_logits, expected)
        torch.testing.assert_close(step.teacher_log_probs, F.log_softmax(expected / 2.0, 1))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize(("method", "standardized", "T"), [
    ("dkd", False, 4.0), ("kd", False, 2.0), ("dist", False, 4.0), ("at", False, 2.0), ("kd", True, 2.0),
])
def test_val_soft_loss_is_the_kd_term_at_the_methods_own_temperature(method: str, standardized: bool, T: float) -> None:
    """Issue 22 point 6: dkd's was logged at distill.T=2 while it trains at its own T=4."""
    torch.manual_seed(0)
    student = MnistConvStudent()
    module = DistillModule(student, MnistCNN(), optimizer=partial(torch.optim.SGD, lr=0.1), method=method,
                           method_hparams=defaults(method).get(method), T=2.0 if not standardized else 5.0,
                           **({"logit_standardization": True} if standardized else {}))
    teacher_logits = torch.randn(6, 10) * 3
    module.use_cached_teacher_logits({"val": teacher_logits})
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    module.eval()
    with torch.no_grad():
        module._eval_step("val", (x, y, torch.arange(6)))
        logits = student(x)
    if standardized:
        expected = ls_kd_by_hand(logits.double().tolist(), teacher_logits.double().tolist(), T)
    else:
        expected = kd_loss(logits.double(), teacher_logits.double(), T).item()
    assert module.eval_metrics["val"]["soft_loss"].compute().item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # trains
def test_the_run_summary_shows_the_method_and_its_own_settings(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from kd_lightning.summary import hparams_of, print_summary

    monkeypatch.setenv("COLUMNS", "200")
    result = {"output_dir": "x", "teacher_params": 10, "params": 5, "test/teacher_acc": 0.9, "test/agreement": 0.8,
              "test/acc": 0.7, "test/loss": 1.0, "best_epoch": 0, "epochs": 1, "seconds_per_epoch": 1.0,
              "data_source": "sample"}
    expected = {
        ("distill.method=dkd",): "dkd (alpha=1.0, beta=8.0, T=4.0, ce_weight=1.0, warmup_epochs=1.0)",
        ("distill.method=at",): "at (student_layers=null, teacher_layers=null, beta=1000.0, p=2.0, ce_weight=1.0)",
        ("distill.method=kd",): "kd: hard_soft (T=2.0, alpha=0.8)",
        ("distill.group=soft",): "kd: soft (T=2.0)",
        ("distill.logit_standardization=true",): "kd: hard_soft (T=2.0 (base_T), logit standardization, alpha=0.8)",
        ("distill.method=dkd", "distill.logit_standardization=true"):
            "dkd (alpha=1.0, beta=8.0, T=4.0, ce_weight=1.0, warmup_epochs=1.0; logit standardization at base_T=2.0)",
        ("distill.method=dist",): "dist (beta=2.0, gamma=2.0, tau=4.0, ce_weight=1.0)",
    }
    for overrides, line in expected.items():
        cfg = compose_train_config(["module=distill", "model=mnist_conv_student", "paths.output_dir=out", *overrides])
        print_summary(cfg, result)
        out = capsys.readouterr().out
        assert re.search(r"method\s+│\s+" + re.escape(line) + r"\s+│", out), out
        assert hparams_of(cfg, None)["method_settings"] == line
    assert "loss group" not in out


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
