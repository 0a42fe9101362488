"""Exact parameter counts of the reference nets, built from their Hydra configs."""

import pytest
import torch
from hydra.utils import instantiate

from kd_lightning.config import compose_train_config


def build(name: str) -> torch.nn.Module:
    return instantiate(compose_train_config([f"model={name}"]).model)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist_cnn", 1_199_882),  # docs/reference.md#mnist-teacher-and-student: the teacher
        ("mlp_784_16_10", 12_730),  # docs/reference.md#mnist-teacher-and-student: the student
        ("mlp_784_1200_1200_10", 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10),
        ("mlp_784_20_20_10", 784 * 20 + 20 + 20 * 20 + 20 + 20 * 10 + 10),
        ("mlp_784_800_800_10", 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10),
    ],
)
def test_parameter_counts(name: str, expected: int) -> None:
    net = build(name)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_dropout_where_the_references_have_it() -> None:
    def n_dropout(name: str) -> int:
        return sum(isinstance(m, torch.nn.Dropout) for m in build(name).modules())

    assert n_dropout("mnist_cnn") == 2
    assert n_dropout("mlp_784_1200_1200_10") == 2
    assert n_dropout("mlp_784_16_10") == 0
