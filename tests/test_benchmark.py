"""The CIFAR-100 benchmark (kd_lightning/benchmark.py, docs/benchmark.md): the report on a fake finished sweep, the
published numbers file, the sweep's expansion of pair= / methods= / seeds=, the recipe's milestones and learning
rates, the references' data split, every pair x {kd, dkd, at} for one short epoch from released-layout teachers,
and the sweep command end to end."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.benchmark import (
    PUBLISHED_FILE,
    ReferenceCIFAR100,
    method_names,
    pair_names,
    published,
    sweep_arguments,
    write_benchmark_report,
)
from kd_lightning.config import compose_train_config
from kd_lightning.errors import ConfigError
from kd_lightning.models.cifar100 import NETS
from kd_lightning.teacher import compose_teacher_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = yaml.safe_load((ROOT / "conf" / "sweep" / "benchmark_cifar100.yaml").read_text())


# ---- the report ------------------------------------------------------------------------------------------------
def fake_job(sweep: Path, number: int, pair: str, method: str, seed: int, best: float | None = None,
             last: float | None = None, sha: str = "", error: str | None = None) -> None:
    job = sweep / str(number)
    job.mkdir(parents=True)
    config = {"benchmark": {"pair": pair}, "distill": {"method": method}, "seed": seed, "module": {}}
    if error:
        (job / "failed.json").write_text(json.dumps({"config": config, "error": error}))
        return
    (job / "metrics.json").write_text(json.dumps({
        "test/acc": best, "last/test/acc": last, "test/teacher_acc": 0.7942, "teacher_sha256": sha,
        "teacher_file": f"/teachers/{pair}/ckpt_epoch_240.pth", "config": config}))


def test_report_on_a_fake_finished_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sha = "ab" * 32
    for seed, (best, last) in enumerate([(0.73, 0.72), (0.74, 0.73), (0.75, 0.74)], start=1):
        fake_job(sweep, seed - 1, "resnet32x4_resnet8x4", "kd", seed, best, last, sha)
    fake_job(sweep, 3, "vgg13_vgg8", "dkd", 1, 0.7468, 0.7400, "cd" * 32)
    fake_job(sweep, 4, "vgg13_vgg8", "dkd", 2, error="OutOfMemoryError: CUDA out of memory")
    summary = write_benchmark_report(sweep)

    markdown = (sweep / "benchmark.md").read_text()
    # Hand-computed: 73/74/75 -> 74.00 ± 1.00; 72/73/74 -> 73.00 ± 1.00; published 73.33 (RepDistiller's KD).
    assert "| resnet32x4_resnet8x4 | kd | 3 | 74.00 ± 1.00 | 73.00 ± 1.00 | 73.33 | +0.67 |" in markdown
    # One run: its value; published 74.68 (DKD paper, vgg13 -> vgg8): delta 0.
    assert "| vgg13_vgg8 | dkd | 1 | 74.68 | 74.00 | 74.68 | +0.00 |" in markdown
    assert markdown.index("resnet32x4_resnet8x4 | kd") < markdown.index("vgg13_vgg8 | dkd")  # in run order
    assert f"resnet32x4_resnet8x4: `/teachers/resnet32x4_resnet8x4/ckpt_epoch_240.pth` sha256 `{sha}`" in markdown
    assert "4 of 5 jobs done" in markdown and "job 4 (vgg13_vgg8, dkd, seed 2) failed: OutOfMemoryError" in markdown
    for source in published()["sources"].values():
        assert source in markdown

    rows = list(csvrows(sweep / "benchmark.csv"))
    assert [r["pair"] for r in rows] == ["resnet32x4_resnet8x4", "vgg13_vgg8"]
    assert float(rows[0]["best_mean"]) == pytest.approx(74.0) and float(rows[0]["best_std"]) == pytest.approx(1.0)
    assert float(rows[0]["delta"]) == pytest.approx(74.0 - 73.33) and rows[0]["teacher_sha256"] == sha
    assert summary[1]["runs"] == 1 and summary[1]["last_mean"] == pytest.approx(74.0)


def csvrows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_cell_without_a_published_number_has_no_delta(tmp_path: Path) -> None:
    fake_job(tmp_path / "sweep", 0, "resnet56_resnet20", "label_smoothing", 1, 0.70, 0.69)
    markdown = (write_benchmark_report(tmp_path / "sweep") and (tmp_path / "sweep" / "benchmark.md").read_text())
    assert "| resnet56_resnet20 | label_smoothing | 1 | 70.00 | 69.00 | - | - |" in markdown


def test_published_numbers_cover_every_pair_and_method_with_their_sources() -> None:
    numbers = published()
    assert sorted(numbers["pairs"]) == sorted(pair_names()) == sorted(SWEEP["pairs"])
    for pair, cells in numbers["pairs"].items():
        assert set(cells) == {"teacher", "student", "kd", "dkd", "fitnet", "at", "rkd", "crd"}, pair
        assert all(55 < v < 80 for v in cells.values()), pair
        assert cells["teacher"] > cells["student"] and cells["kd"] > cells["student"], pair
    assert set(numbers["source_of"].values()) == set(numbers["sources"])
    assert all(url.startswith("https://github.com/") for url in numbers["sources"].values())
    # Spot checks against the sources' tables (RepDistiller's README, mdistiller's README).
    assert numbers["pairs"]["resnet32x4_resnet8x4"]["kd"] == 73.33
    assert numbers["pairs"]["resnet32x4_resnet8x4"]["dkd"] == 76.32
    assert numbers["pairs"]["resnet32x4_resnet8x4"]["crd"] == 75.51
    assert numbers["pairs"]["wrn_40_2_wrn_40_1"]["dkd"] == 74.81
    assert PUBLISHED_FILE.read_text().count("http") >= 2


# ---- the sweep -------------------------------------------------------------------------------------------------
def test_sweep_expands_pairs_methods_and_seeds() -> None:
    cfg = compose_train_config(["sweep=benchmark_cifar100"])
    assert cfg.pairs == SWEEP["pairs"] and list(cfg.methods) == ["kd", "dkd", "fitnet", "at", "rkd", "crd"] and cfg.seeds == 5
    assert sorted(method_names()) == ["at", "crd", "dkd", "fitnet", "kd", "rkd"]
    args = sweep_arguments(cfg, ["sweep=benchmark_cifar100", "pair=[resnet32x4_resnet8x4,vgg13_vgg8]", "methods=[kd,dkd]",
                                 "seeds=3", "trainer=gpu"])
    assert args == ["pair=resnet32x4_resnet8x4,vgg13_vgg8", "experiment=cifar100_kd,cifar100_dkd", "seed=1,2,3",
                    "sweep=benchmark_cifar100", "trainer=gpu"]
    assert sweep_arguments(cfg, ["pair=vgg13_vgg8", "methods=at", "seeds=1"])[:3] == \
        ["pair=vgg13_vgg8", "experiment=cifar100_at", "seed=1"]
    everything = sweep_arguments(cfg, [])
    assert everything[0] == "pair=" + ",".join(SWEEP["pairs"]) and everything[2] == "seed=1,2,3,4,5"
    assert everything[1] == "experiment=" + ",".join(f"cifar100_{m}" for m in SWEEP["methods"])


@pytest.mark.parametrize(("argument", "message"), [
    ("pair=[resnet32x4_resnet9x4]", r"^pair=resnet32x4_resnet9x4 is not accepted: one of resnet110_resnet32, "),
    ("methods=[kd,tf_kd]", r"^methods: tf_kd is not accepted: one of at, crd, dkd, fitnet, kd, rkd "),
    ("seeds=0", r"^seeds=0 is not accepted: the number of seeds per cell, an integer >= 1"),
])
def test_sweep_refuses_bad_values_in_one_line(argument: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        sweep_arguments(compose_train_config(["sweep=benchmark_cifar100"]), [argument])
    assert "\n" not in str(err.value)


# ---- the recipe ------------------------------------------------------------------------------------------------
def lrs(cfg) -> list[float]:
    """The learning rate of each of the run's epochs, from its own optimizer and scheduler configs."""
    optimizer = instantiate(cfg.module.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.module.scheduler)(optimizer=optimizer)
    rates = []
    for _ in range(cfg.trainer.max_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(("overrides", "base"), [
    (["experiment=cifar100_teacher", "model=resnet32x4"], 0.05),
    *(pytest.param(o, b, marks=pytest.mark.slow) for o, b in [  # composing: one case in the inner loop
        (["experiment=cifar100_dkd", "pair=resnet32x4_shufflev1"], 0.01),
        (["experiment=cifar100_kd", "pair=resnet32x4_resnet8x4"], 0.05),
        (["experiment=cifar100_at", "pair=vgg13_mobilenetv2"], 0.01),
        (["experiment=cifar100_rkd", "pair=resnet32x4_shufflev2"], 0.01)]),
])
def test_recipe_milestones_and_learning_rates(overrides: list[str], base: float) -> None:
    cfg = compose_train_config(overrides)
    rates = lrs(cfg)
    assert len(rates) == 240
    expected = {0: base, 149: base, 150: base / 10, 179: base / 10, 180: base / 100, 209: base / 100,
                210: base / 1000, 239: base / 1000}
    assert {e: rates[e] for e in expected} == pytest.approx(expected, rel=1e-9)
    optimizer = cfg.module.optimizer
    assert (optimizer._target_, optimizer.momentum, optimizer.weight_decay, optimizer.get("nesterov", False)) == \
        ("torch.optim.SGD", 0.9, 5e-4, False)
    assert cfg.data.batch_size == 64 and cfg.callbacks.early_stopping is None and cfg.trainer.max_epochs == 240
    assert cfg.data._target_ == "kd_lightning.benchmark.ReferenceCIFAR100"
    if "experiment=cifar100_teacher" in overrides:  # the teacher kept is the last epoch's (as ckpt_epoch_240.pth)
        assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == ("epoch", "max")
        return
    # Students: the best epoch by test accuracy (the references' number) and the last epoch, both tested.
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode, cfg.test_last) == \
        ("val/acc", "max", True)
    teacher = compose_teacher_config(cfg)  # the teacher keeps 0.05 whatever the student's rate
    assert lrs(teacher)[0] == 0.05 and teacher.trainer.max_epochs == 240
    assert teacher.data._target_ == "kd_lightning.benchmark.ReferenceCIFAR100"
    assert teacher.callbacks.model_checkpoint.monitor == "epoch"


@pytest.mark.slow  # composes every pair and method
def test_method_settings_are_the_references() -> None:
    kd = compose_train_config(["experiment=cifar100_kd"]).distill
    assert (kd.method, kd.group, kd.T, kd.alpha) == ("kd", "hard_soft", 4.0, 0.9)
    betas = {"resnet56_resnet20": 2.0, "resnet110_resnet32": 2.0, "resnet32x4_resnet8x4": 8.0, "wrn_40_2_wrn_16_2": 6.0,
             "wrn_40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0, "resnet32x4_shufflev1": 8.0, "resnet32x4_shufflev2": 8.0,
             "vgg13_mobilenetv2": 6.0}  # mdistiller's configs/cifar100/dkd/*.yaml (default 8)
    for pair, beta in betas.items():
        dkd = compose_train_config(["experiment=cifar100_dkd", f"pair={pair}"]).distill
        assert (dkd.method, dkd.dkd.alpha, dkd.dkd.beta, dkd.dkd.T, dkd.dkd.warmup_epochs) == ("dkd", 1.0, beta, 4.0, 20)
    at = compose_train_config(["experiment=cifar100_at"]).distill
    assert (at.method, at.at.beta, at.at.p) == ("at", 1000.0, 2.0)
    fitnet = compose_train_config(["experiment=cifar100_fitnet"]).distill
    assert (fitnet.method, fitnet.fitnet.beta, fitnet.fitnet.student_layer) == ("fitnet", 100.0, "layer2")
    rkd = compose_train_config(["experiment=cifar100_rkd"]).distill.rkd
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    crd = compose_train_config(["experiment=cifar100_crd"]).distill  # RepDistiller -r 1 -a 0 -b 0.8 and its defaults
    assert crd.method == "crd" and {k: crd.crd[k] for k in ("feat_dim", "nce_k", "nce_t", "momentum", "negatives", "weight",
                                                            "ce_weight", "kd_weight")} == {
        "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "momentum": 0.5, "negatives": "other_classes", "weight": 0.8,
        "ce_weight": 1.0, "kd_weight": 0.0}
    sweep = OmegaConf.load(ROOT / "conf" / "sweep" / "benchmark_cifar100.yaml")
    assert all((ROOT / "conf" / "experiment" / f"cifar100_{m}.yaml").is_file() for m in sweep.methods)


# ---- the references' data split ----------------------------------------------------------------------------------
def test_reference_split_trains_on_everything_and_validates_on_test(cifar_root: Path) -> None:
    data = ReferenceCIFAR100(data_dir=cifar_root, download=False, batch_size=10, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    assert {s: data.split_size(s) for s in ("train", "val", "test")} == {"train": 50, "val": 20, "test": 20}
    assert len(data.train_set) == 50 and data.cache_identity()["train_val_split"] == [1.0, 0.0]
    val, test = next(iter(data.val_dataloader())), next(iter(data.test_dataloader()))
    assert torch.equal(val[0], test[0]) and torch.equal(val[1], test[1])
    # The references' normalization (RepDistiller's and mdistiller's dataset/cifar100.py), in the transforms.
    assert data.cache_identity()["normalize"] == [[0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]]
    pixel = torch.tensor(data.raw_images("test", [0])[0][0, 0, 0], dtype=torch.float64) / 255
    expected = (pixel - torch.tensor([0.5071, 0.4867, 0.4408], dtype=torch.float64)) / \
        torch.tensor([0.2675, 0.2565, 0.2761], dtype=torch.float64)
    assert torch.allclose(test[0][0, :, 0, 0].double(), expected, atol=1e-5)
    assert torch.equal(data.raw_images("val", range(20))[0], data.raw_images("test", range(20))[0])


# ---- every pair, one short epoch -----------------------------------------------------------------------------------
@pytest.fixture
def fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from fake_data import write_cifar100

    root = tmp_path / "data"
    for name, value in write_cifar100(root, 16, 8).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR100, name, value)
    return root


SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
         "logger=[]", "callbacks.lr_monitor=null", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
         "data.download=false"]


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(p.stem for p in (ROOT / "conf" / "pair").glob("*.yaml")))
def test_every_pair_trains_with_kd_dkd_and_at(tmp_path: Path, fake_cifar100: Path, pair: str) -> None:
    """The pair's student for one short epoch under kd, dkd and at, from its teacher given as a released
    `ckpt_epoch_240.pth` (random weights, made here): metrics.json holds best- and last-epoch test accuracy and
    the sha256 of the teacher file."""
    from kd_lightning.train import train

    teacher_name = OmegaConf.load(ROOT / "conf" / "pair" / f"{pair}.yaml").benchmark.teacher
    torch.manual_seed(0)
    released = tmp_path / f"{teacher_name}_vanilla" / "ckpt_epoch_240.pth"
    released.parent.mkdir()
    torch.save({"epoch": 240, "model": NETS[teacher_name]().state_dict(), "accuracy": 79.42}, released)
    sha = hashlib.sha256(released.read_bytes()).hexdigest()
    # crd (its memory bank over the 16 fake training images, 8 negatives) on the smallest pair only: its embedding
    # layers are found the same way on every net (test_cifar_nets.py checks each pair's layers).
    for method in ("kd", "dkd", "at", *(("crd",) if pair == "resnet56_resnet20" else ())):
        crd = ["distill.crd.nce_k=8"] if method == "crd" else []
        cfg = compose_train_config([f"experiment=cifar100_{method}", f"pair={pair}", *SHORT, *crd,
                                    f"teacher.ckpt_path={released}", f"paths.data_dir={fake_cifar100}",
                                    f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / method}"])
        result = train(cfg)
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["teacher_sha256"] == sha and metrics["teacher_file"] == str(released), (pair, method)
        assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["last/test/acc"] <= 1 and result["epochs"] == 1
        assert metrics["params"] == sum(p.numel() for p in NETS[pair.removeprefix(teacher_name + "_")]().parameters())


# ---- the sweep command ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # subprocess, a teacher and two students
def test_sweep_command_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep command on fake CIFAR-100 (torchvision's checksums of the fake files given to the subprocess by a
    sitecustomize.py on its PYTHONPATH): one pair, kd, two seeds; the teacher trained once."""
    from fake_data import write_checksum_sitecustomize, write_cifar100
    from helpers import offline_overrides, run_script

    site = write_checksum_sitecustomize(tmp_path / "site", {"CIFAR100": write_cifar100(tmp_path / "data", 64, 16)})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    run_script("train.py", "sweep=benchmark_cifar100", "pair=[resnet56_resnet20]", "methods=[kd]", "seeds=2",
               "trainer.max_epochs=1", "+trainer.limit_val_batches=1", "data.num_workers=0",
               *offline_overrides(tmp_path), f"hydra.sweep.dir={tmp_path / 'sweep'}")
    markdown = (tmp_path / "sweep" / "benchmark.md").read_text()
    row = re.search(r"^\| resnet56_resnet20 \| kd \| 2 \| (\d+\.\d\d) ± (\d+\.\d\d) \| .* \| 70\.66 \| ([+-]\d+\.\d\d) \|$",
                    markdown, re.M)
    assert row, markdown
    assert float(row.group(3)) == pytest.approx(float(row.group(1)) - 70.66, abs=0.011)
    teachers = list((tmp_path / "logs" / "teachers").glob("*/teacher.ckpt"))
    assert len(teachers) == 1  # trained by the first job, reused by the second
    assert hashlib.sha256(teachers[0].read_bytes()).hexdigest() in markdown
