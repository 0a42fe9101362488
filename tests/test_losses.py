"""The KD loss against values computed by hand, and each loss group's formula."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import LOSS_GROUPS, get_loss_group, kd_loss, soft_targets, standardize

STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])


def kd_by_hand(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    """T^2 * (1/B) * sum_b sum_i p_i log(p_i / q_i), p = softmax(teacher/T), q = softmax(student/T)."""
    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(t_row), softmax(s_row)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return T * T * total / len(student)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_loss_matches_hand_computed_kl(T: float) -> None:
    expected = kd_by_hand(STUDENT.tolist(), TEACHER.tolist(), T)
    assert kd_loss(STUDENT, TEACHER, T).item() == pytest.approx(expected, rel=1e-12)


def test_kd_loss_known_value() -> None:
    # One row, T=1, worked on paper: p = softmax([2, 1, 0]) = [0.66524, 0.24473, 0.09003],
    # q = softmax([1, 2, 0.5]) = [0.23122, 0.62853, 0.14025]; sum p*ln(p/q) = 0.70301 - 0.23084 - 0.03991.
    assert kd_loss(STUDENT[:1], TEACHER[:1], 1.0).item() == pytest.approx(0.43226, abs=5e-5)
    # At T=2 the same row: the KL of the softened distributions, times 4.
    p = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64).softmax(0)
    q = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64).softmax(0)
    assert kd_loss(STUDENT[:1], TEACHER[:1], 2.0).item() == pytest.approx(4 * (p * (p / q).log()).sum().item())


def test_batchmean_not_mean() -> None:
    """PyTorch's default 'mean' divides by batch*classes; the KD loss divides by the batch only."""
    with warnings.catch_warnings():  # torch warns that 'mean' is not the KL divergence
        warnings.simplefilter("ignore")
        wrong = F.kl_div(F.log_softmax(STUDENT, -1), F.softmax(TEACHER, -1), reduction="mean").item()
    right = kd_loss(STUDENT, TEACHER, 1.0).item()
    assert right == pytest.approx(wrong * STUDENT.shape[1])
    assert right != pytest.approx(wrong)


def test_kd_loss_is_zero_when_student_matches_teacher() -> None:
    assert kd_loss(TEACHER, TEACHER.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_reaches_student_only() -> None:
    student = STUDENT.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    kd_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_t_squared_keeps_soft_gradient_size() -> None:
    """With the T^2 factor the gradient tends to (s - t)/(B*C) as T grows; without it, it shrinks as 1/T^2."""
    torch.manual_seed(0)
    s, t = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)

    def grad_norm(T: float, scaled: bool) -> float:
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, T) if scaled else kd_loss(x, t, T) / (T * T)
        loss.backward()
        return x.grad.norm().item()

    scaled = [grad_norm(T, True) for T in (4.0, 8.0, 16.0, 32.0)]
    assert max(scaled) / min(scaled) < 1.15
    unscaled = [grad_norm(T, False) for T in (4.0, 32.0)]
    assert unscaled[0] / unscaled[1] > 50  # ~ (32/4)^2 = 64
    # The high-temperature limit (Hinton et al. 2015, eq. 3): d/ds = ((s - mean s) - (t - mean t)) / (B*C).
    limit = ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / (8 * 10)
    assert scaled[-1] == pytest.approx(limit.norm().item(), rel=0.02)


def test_groups_formulas() -> None:
    T, alpha = 2.0, 0.3
    hard = F.cross_entropy(STUDENT, LABELS)
    soft = torch.tensor(kd_by_hand(STUDENT.tolist(), TEACHER.tolist(), T), dtype=torch.float64)
    targets = soft_targets(TEACHER, T)  # what groups receive: the teacher's log-probabilities at T
    terms = {name: fn(STUDENT, targets, LABELS, T, alpha) for name, (fn, _) in LOSS_GROUPS.items()}
    torch.testing.assert_close(terms["hard"]["loss"], hard)
    torch.testing.assert_close(terms["soft"]["loss"], soft)
    torch.testing.assert_close(terms["hard_soft"]["loss"], alpha * soft + (1 - alpha) * hard)
    torch.testing.assert_close(terms["hard_soft"]["hard_loss"], hard)
    torch.testing.assert_close(terms["hard_soft"]["soft_loss"], soft)
    # alpha weights the soft term: alpha=1 is the soft group, alpha=0 the hard group.
    torch.testing.assert_close(LOSS_GROUPS["hard_soft"][0](STUDENT, targets, LABELS, T, 1.0)["loss"], soft)
    torch.testing.assert_close(LOSS_GROUPS["hard_soft"][0](STUDENT, targets, LABELS, T, 0.0)["loss"], hard)
    # The gradient of the weighted sum, too (the group computes it with lerp).
    student = STUDENT.clone().requires_grad_()
    LOSS_GROUPS["hard_soft"][0](student, targets, LABELS, T, alpha)["loss"].backward()
    reference = STUDENT.clone().requires_grad_()
    (alpha * kd_loss(reference, TEACHER, T) + (1 - alpha) * F.cross_entropy(reference, LABELS)).backward()
    torch.testing.assert_close(student.grad, reference.grad)


def test_hard_group_needs_no_teacher() -> None:
    fn, needs_teacher = get_loss_group("hard")
    assert not needs_teacher
    assert fn(STUDENT, None, LABELS, 2.0, 0.5)["loss"].item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item())


def test_unknown_group_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"distill.group='hardsoft'.*'hard', 'hard_soft', 'soft'"):
        get_loss_group("hardsoft")


def test_standardize_by_hand_and_its_invariance() -> None:
    """Logit standardization's z-score: (z - mean) / (1e-7 + sd), sd with Bessel's correction (torch.std)."""
    row = [1.0, 2.0, 0.5]
    mean = sum(row) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in row) / 2)
    expected = [(v - mean) / (1e-7 + sd) for v in row]
    assert standardize(STUDENT[:1])[0].tolist() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(standardize(STUDENT * 4.0 - 3.0), standardize(STUDENT), rtol=1e-6, atol=1e-6)
    z = standardize(torch.randn(5, 10, dtype=torch.float64))
    torch.testing.assert_close(z.mean(1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(z.std(1), torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_groups_soft_term_reads_soft_logits_when_given() -> None:
    """Logit standardization: the soft term on z-scored logits, the hard term on the raw ones."""
    T, alpha = 2.0, 0.3
    z = standardize(STUDENT)
    targets = soft_targets(standardize(TEACHER), T)
    hard = F.cross_entropy(STUDENT, LABELS)
    soft = torch.tensor(kd_by_hand(z.tolist(), standardize(TEACHER).tolist(), T), dtype=torch.float64)
    terms = LOSS_GROUPS["hard_soft"][0](STUDENT, targets, LABELS, T, alpha, soft_logits=z)
    torch.testing.assert_close(terms["hard_loss"], hard)
    torch.testing.assert_close(terms["soft_loss"], soft)
    torch.testing.assert_close(LOSS_GROUPS["soft"][0](STUDENT, targets, LABELS, T, alpha, soft_logits=z)["loss"], soft)
