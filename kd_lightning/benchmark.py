"""The CIFAR-100 distillation benchmark (docs/benchmark.md): the references' data protocol and the report.

`python train.py sweep=benchmark_cifar100 trainer=gpu` runs pairs x methods x seeds (conf/sweep/benchmark_cifar100.yaml,
the sweep expanded by hydra_plugins/kd_benchmark_sweeper); when it ends, `write_benchmark_report` writes
`benchmark.md` and `benchmark.csv` into the sweep dir: per pair and method the runs, the best-epoch and last-epoch
test accuracy (mean ± std over seeds), the published number (conf/benchmark/cifar100_published.yaml... see
PUBLISHED) and the difference. Again by hand: `python -m kd_lightning.benchmark <sweep dir>`.
"""
