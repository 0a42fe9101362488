"""TracIn speed on the MNIST CNN against a plain per-example autograd loop: `python -m kd_lightning.influence.bench`.

Setting: MnistCNN (1,199,882 parameters), 1,000 training × 100 test digits of the MNIST sample, 3 checkpoints
(independently initialized nets with η = 1.0, 0.7, 0.49: speed and exactness do not depend on training).

- loop: for each checkpoint, every example's full gradient by `torch.autograd.grad` (one example at a time),
  scored either as it comes (a matrix-vector product with the kept test gradients) or stacked and multiplied
  once. The test part is timed in full; the training part on `--loop-subset` examples and extrapolated linearly
  (said so in the output).
- ours: `tracin` with all parameters (torch.func, Linear layers factored), and with the last layer only.
- projection: relative Frobenius error of projected scores against the exact ones, per dimension.
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kd_lightning.data.mnist import MNISTDataModule, load_mnist_sample
from kd_lightning.influence.compare import spearman
from kd_lightning.influence.gradients import RandomProjection, loop_gradients, select_parameters
from kd_lightning.influence.tracin import TracInCheckpoint, cross_entropy_loss, tensor_batches, tracin
from kd_lightning.models import MnistCNN

LRS = (1.0, 0.7, 0.49)


def mnist_digits(n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    images, labels = load_mnist_sample()
    x = MNISTDataModule().normalize(images[: n_train + n_test])
    y = labels[: n_train + n_test]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def loop_scores(nets: list[nn.Module], x_train, y_train, x_test, y_test, subset: int) -> tuple[torch.Tensor, dict]:
    """Scores of the first `subset` training examples by the plain loop, and the time for all training examples
    (the training part extrapolated linearly from the subset), for two ways of scoring the loop's gradients:
    `dot as it goes` (each training gradient against the kept [n_test, P] test gradients, a matrix-vector
    product per example) and `stacked + matmul` (the training gradients stacked, then one matrix product)."""
    scores = torch.zeros(subset, len(x_test))
    seconds = {"gradients": 0.0, "dot as it goes": 0.0, "stacked + matmul": 0.0}
    scale = len(x_train) / subset
    for net, lr in zip(nets, LRS):
        names = select_parameters(net, "all")
        started = time.perf_counter()
        test_grads = loop_gradients(net, names, cross_entropy_loss, x_test, (y_test,))
        train_grads = loop_gradients(net, names, cross_entropy_loss, x_train[:subset], (y_train[:subset],))
        seconds["gradients"] += (time.perf_counter() - started) * (len(x_test) + len(x_train)) / (len(x_test) + subset)
        started = time.perf_counter()
        for g in train_grads:
            test_grads @ g
        seconds["dot as it goes"] += (time.perf_counter() - started) * scale
        started = time.perf_counter()
        scores += lr * (train_grads @ test_grads.T)
        seconds["stacked + matmul"] += (time.perf_counter() - started) * scale
    return scores, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--loop-subset", type=int, default=100, help="training examples the loop is timed on")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--dims", type=int, nargs="*", default=[64, 256, 1024, 4096], help="projection dims")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x_train, y_train, x_test, y_test = mnist_digits(args.n_train, args.n_test)
    nets = []
    for seed in range(len(LRS)):
        torch.manual_seed(seed)
        nets.append(MnistCNN().eval())
    checkpoints = [TracInCheckpoint(path=f"net{i}", epoch=i, lr=lr) for i, lr in enumerate(LRS)]

    def ours(params="all", projection=None):
        return tracin(checkpoints, tensor_batches(x_train, y_train), tensor_batches(x_test, y_test), args.n_train,
                      args.n_test, params=params, chunk_size=args.chunk_size, projection=projection,
                      load=lambda path: nets[int(path[3:])], label=f"{params} {projection.dim if projection else ''}")

    console = Console(width=150)
    console.print(f"MnistCNN, {args.n_train} train x {args.n_test} test x {len(LRS)} checkpoints, "
                  f"{torch.get_num_threads()} threads")
    exact = ours("all")
    last = ours("last")
    reference, loop = loop_scores(nets, x_train, y_train, x_test, y_test, args.loop_subset)
    mismatch = ((exact.scores[: args.loop_subset] - reference).norm() / reference.norm()).item()

    n_values = args.n_train * args.n_test
    table = Table("method", "seconds", "ms per TracIn value", "ours (all) faster by", "ours (last) faster by")
    for scoring in ("dot as it goes", "stacked + matmul"):
        seconds = loop["gradients"] + loop[scoring]
        table.add_row(f"autograd.grad loop, {scoring}", f"{seconds:.1f}", f"{1000 * seconds / n_values:.2e}",
                      f"{seconds / exact.seconds:.1f}x", f"{seconds / last.seconds:.1f}x")
    for name, result in (("ours, all parameters", exact), ("ours, last layer", last)):
        table.add_row(name, f"{result.seconds:.2f}", f"{result.ms_per_value:.2e}", "", "")
    console.print(table)
    console.print(f"Loop: per-example gradients {loop['gradients']:.1f} s of it; its training part timed on "
                  f"{args.loop_subset} examples and extrapolated to {args.n_train}.")
    console.print(f"ours vs loop on the first {args.loop_subset} training examples: relative difference {mismatch:.1e}")

    if args.dims:
        errors = Table("projection dim", "relative error (Frobenius)", "Spearman vs exact", "seconds")
        for dim in args.dims:
            projected = ours("all", RandomProjection(dim, seed=0))
            error = ((projected.scores - exact.scores).norm() / exact.scores.norm()).item()
            errors.add_row(str(dim), f"{error:.3f}", f"{spearman(projected.scores, exact.scores):.3f}",
                           f"{projected.seconds:.1f}")
        console.print(errors)


if __name__ == "__main__":
    main()
