"""The sweep report (kd_lightning/report.py) on sweep dirs written here as sweeps write them (each job's config
composed from conf/ and recorded with its result): its columns come from the recorded configs, its rows group only
jobs identical but for the seed, heatmap panels and curves follow the settings, a damaged record is named and
left out, and job dirs are named by their settings."""

import csv
import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from helpers import ROOT, job_dir, subprocess_env
from kd_lightning.config import CONF_DIR, compose_train_config
from kd_lightning.report import heatmap_panels, load_results, markdown_table, plot_curves, plot_heatmap, write_report
from kd_lightning.sweeps import earlier_outcome, job_dirname_of, job_dirs

STUDENT = ["experiment=soft"]
GROUPS = {"experiment", "model", "data", "module", "trainer", "callbacks", "logger", "sweep"}


@functools.cache
def composed(groups: tuple[str, ...]) -> DictConfig:
    return compose_train_config(list(groups))


def job_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`: config groups composed (once per combination), other keys set."""
    cfg = composed(tuple(o for o in overrides if o.split("=")[0] in GROUPS)).copy()
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group not in GROUPS:
            OmegaConf.update(cfg, o.key_or_group, o.value(), force_add=True)
    return cfg


def record_job(sweep: Path, num: int, overrides: list[str], val_acc: float | None, *, swept: list[str] | None = None,
               status: str = "done") -> Path:
    """Job `num` of a sweep as run_sweep_job leaves it: its dir named by its settings, job.json and, when done,
    metrics.json (failed: failed.json), each with its overrides and resolved config."""
    job = sweep / job_dirname_of(num, overrides, swept_keys=swept)
    job.mkdir(parents=True)
    cfg = job_config(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(job)
    settings = OmegaConf.to_container(cfg, resolve=True)
    (job / "job.json").write_text(json.dumps({"overrides": overrides, "config": settings}))
    if status == "done":
        result = {"val/acc": val_acc, "test/acc": val_acc - 0.01, "test/loss": 1 - val_acc, "test/agreement": 0.5,
                  "best_epoch": 0, "epochs": 1, "wall_seconds": 1.0}
        (job / "metrics.json").write_text(json.dumps({**result, "overrides": overrides, "config": settings}))
    elif status == "failed":
        (job / "failed.json").write_text(json.dumps({"overrides": overrides, "config": settings, "error": "boom"}))
    return job


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def test_two_lr_values_with_one_seed_are_two_rows_with_an_lr_column(tmp_path: Path) -> None:
    """Issue 25 (1): `experiment=soft module.optimizer.lr=1e-1,1e-3` gave one row, "runs 2", as if over seeds."""
    for num, lr, acc in ((0, "1e-1", 0.2), (1, "1e-3", 0.6)):
        record_job(tmp_path, num, [*STUDENT, f"module.optimizer.lr={lr}"], acc)
    rows = load_results(tmp_path)
    table = table_rows(markdown_table(rows))
    assert table[0][:6] == ["method", "group", "T", "alpha", "module.optimizer.lr", "runs"]
    assert [r[:7] for r in table[2:]] == [["kd **(best)**", "soft", "2", "-", "0.001", "1", "0.6000"],
                                          ["kd", "soft", "2", "-", "0.1", "1", "0.2000"]]
    write_report(tmp_path)
    with open(tmp_path / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0])[:9] == ["job", "dir", "status", "method", "group", "T", "alpha", "module.optimizer.lr", "seed"]
    assert [(r["job"], r["module.optimizer.lr"], r["seed"]) for r in lines] == [("0", "0.1", "42"), ("1", "0.001", "42")]


def test_rows_group_only_jobs_identical_but_for_the_seed(tmp_path: Path) -> None:
    jobs = [  # (overrides, val acc)
        (["seed=1", "module.optimizer.lr=0.1"], 0.89), (["seed=2", "module.optimizer.lr=0.1"], 0.91),
        (["seed=1", "module.optimizer.lr=0.01"], 0.70),
        (["seed=1", "module.optimizer.lr=0.1", "trainer.max_epochs=3"], 0.95),
        (["seed=1", "module.optimizer.lr=0.1", "model=mnist_conv_student"], 0.80),
    ]
    for num, (overrides, acc) in enumerate(jobs):
        record_job(tmp_path, num, [*STUDENT, *overrides], acc)
    rows = load_results(tmp_path)
    table = table_rows(markdown_table(rows))
    head = table[0]
    # Every setting that differs, once (data.seed repeats seed, module.T repeats distill.T: no column of their own).
    assert {"module.optimizer.lr", "trainer.max_epochs", "model._target_"} <= set(head)
    assert not {"data.seed", "seed", "module.T", "paths.output_dir", "trainer.default_root_dir"} & set(head)
    col = {name: i for i, name in enumerate(head)}
    by_setting = {(r[col["module.optimizer.lr"]], r[col["trainer.max_epochs"]], r[col["model._target_"]]):
                  (r[col["runs"]], r[col["val acc"]]) for r in table[2:]}
    mlp, conv = "kd_lightning.models.MLP", "kd_lightning.models.MnistConvStudent"
    assert by_setting == {  # mean ± sample std over seeds 1 and 2: 0.9, 0.0141 (hand-computed)
        ("0.1", "10", mlp): ("2", "0.9000 ± 0.0141"), ("0.01", "10", mlp): ("1", "0.7000"),
        ("0.1", "3", mlp): ("1", "0.9500"), ("0.1", "10", conv): ("1", "0.8000"),
    }
    assert "**(best)**" in table[2][0] and table[2][col["val acc"]] == "0.9500"


def test_a_key_only_some_jobs_have_is_a_column_unless_another_column_explains_it(tmp_path: Path) -> None:
    jobs = [[], ["+trainer.gradient_clip_val=1.0"], ["model=mnist_conv_student"]]
    for num, overrides in enumerate(jobs):
        record_job(tmp_path, num, [*STUDENT, *overrides], 0.5 + num / 10)
    table = table_rows(markdown_table(load_results(tmp_path)))
    head = table[0]
    assert head[4:7] == ["model._target_", "trainer.gradient_clip_val", "runs"]  # not model.hidden: another class's
    assert sorted(r[5] for r in table[2:]) == ["-", "-", "1"]


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_methods_own_settings_get_columns_where_they_act(tmp_path: Path) -> None:
    jobs = [["distill.method=dkd", "distill.dkd.beta=4"], ["distill.method=dkd", "distill.dkd.beta=8"],
            ["distill.method=kd", "distill.dkd.beta=8"], ["distill.method=kd", "distill.dkd.beta=4"]]
    for num, overrides in enumerate(jobs):
        record_job(tmp_path, num, ["experiment=hard_soft", "model=mnist_conv_student", *overrides], 0.5 + num / 10)
    rows = load_results(tmp_path)
    table = table_rows(markdown_table(rows))
    col = {name: i for i, name in enumerate(table[0])}
    assert "distill.dkd.beta" in col and "module.method_hparams.beta" not in col
    cells = sorted((r[col["method"]].split()[0], r[col["distill.dkd.beta"]], r[col["T"]]) for r in table[2:])
    # kd ran twice with a dkd.beta that does not act on it: shown in parentheses, so that the rows differ.
    assert cells == [("dkd", "4", "-"), ("dkd", "8", "-"), ("kd", "(4)", "2"), ("kd", "(8)", "2")]
    assert "does not act" in markdown_table(rows)
    write_report(tmp_path)
    with open(tmp_path / "results.csv") as f:
        assert [(r["method"], r["distill.dkd.beta"]) for r in csv.DictReader(f)] == [
            ("dkd", "4"), ("dkd", "8"), ("kd", ""), ("kd", "")]


def grid(sweep: Path, lrs: list[str]) -> dict[tuple, float]:
    accs = {}
    num = 0
    for lr in lrs:
        for t in (1, 4):
            for alpha in (0.1, 0.9):
                for seed in (1, 2):
                    acc = 0.5 + t / 100 + alpha / 10 + seed / 1000 + float(lr)
                    record_job(sweep, num, ["experiment=hard_soft", f"distill.T={t}", f"distill.alpha={alpha}",
                                            f"seed={seed}", f"module.optimizer.lr={lr}"], acc,
                               swept=["distill.T", "distill.alpha", "seed", "module.optimizer.lr"])
                    accs[(lr, t, alpha, seed)] = acc - 0.01
                    num += 1
    return accs


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_heatmap_draws_one_panel_per_other_setting(tmp_path: Path) -> None:
    accs = grid(tmp_path, ["0.1", "0.001"])
    rows = load_results(tmp_path)
    panels, reason = heatmap_panels(rows)
    assert reason is None and sorted(panels) == ["module.optimizer.lr=0.001", "module.optimizer.lr=0.1"]
    for lr in ("0.1", "0.001"):
        cells = panels[f"module.optimizer.lr={lr}"]
        assert set(cells) == {(1, 0.1), (1, 0.9), (4, 0.1), (4, 0.9)}
        for (t, alpha), values in cells.items():
            assert sorted(values) == pytest.approx(sorted(accs[(lr, t, alpha, s)] for s in (1, 2)))
    fig = plot_heatmap(rows)
    assert len([ax for ax in fig.axes if ax.images]) == 2
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert f"{(accs[('0.1', 4, 0.9, 1)] + accs[('0.1', 4, 0.9, 2)]) / 2:.4f}" in texts


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_heatmap_refuses_too_many_panels_in_one_line_and_the_log_names_only_files_written(tmp_path: Path,
                                                                                         caplog) -> None:
    for num, lr in enumerate(f"0.{i:02d}1" for i in range(13)):
        record_job(tmp_path, num, ["experiment=hard_soft", f"module.optimizer.lr={lr}"], 0.5,
                   swept=["module.optimizer.lr"])
    (tmp_path / "heatmap.png").write_bytes(b"an earlier report's")
    with caplog.at_level(logging.INFO, logger="kd_lightning.report"):
        write_report(tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("no heatmap: the hard_soft students differ in module.optimizer.lr besides T, alpha "
                                  "and seed: 13 panels, more than 12") and "\n" not in messages[0]
    assert messages[-1] == f"Sweep report written to {tmp_path} (results.csv, results.md)"  # no logs: no curves
    assert not (tmp_path / "heatmap.png").exists() and not (tmp_path / "curves.png").exists()


def test_report_of_a_sweep_without_hard_soft_jobs_does_not_claim_a_heatmap(tmp_path: Path, caplog) -> None:
    """Issue 25 (11): the log said heatmap.png was written when none was."""
    job = record_job(tmp_path, 0, STUDENT, 0.5)
    write_csv_log(job, {0: (1.0, 0.9), 1: (0.8, 0.7)})
    with caplog.at_level(logging.INFO, logger="kd_lightning.report"):
        write_report(tmp_path)
    assert caplog.records[-1].getMessage() == f"Sweep report written to {tmp_path} (results.csv, results.md, curves.png)"
    assert not (tmp_path / "heatmap.png").exists() and (tmp_path / "curves.png").is_file()


def write_csv_log(job: Path, losses: dict[int, tuple[float, float]]) -> None:
    """What Lightning's CSVLogger writes: one line per logging call, the epoch in each."""
    log_dir = job / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    lines = ["epoch,step,train/loss,val/loss"]
    for epoch, (train, val) in losses.items():
        lines += [f"{epoch},{epoch * 10 + 9},,{val}", f"{epoch},{epoch * 10 + 9},{train},"]
    (log_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_curves_one_line_per_setting_from_csv_logs_and_jobs_without_logs(tmp_path: Path) -> None:
    """A job logged by another logger than TensorBoard (here: CSV) gives its curves from its CSV; a job with no
    logs at all is left out of the curves, not an error."""
    jobs = [(["seed=1", "module.optimizer.lr=0.1"], {0: (1.0, 2.0), 1: (0.5, 1.0)}),
            (["seed=2", "module.optimizer.lr=0.1"], {0: (3.0, 4.0), 1: (1.5, 2.0)}),
            (["seed=1", "module.optimizer.lr=0.01"], {0: (2.0, 2.5)}),
            (["seed=2", "module.optimizer.lr=0.01"], None)]
    for num, (overrides, losses) in enumerate(jobs):
        job = record_job(tmp_path, num, [*STUDENT, *overrides], 0.5)
        if losses:
            write_csv_log(job, losses)
    fig = plot_curves(tmp_path, load_results(tmp_path))
    train_ax, val_ax = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in train_ax.lines}
    assert lines == {"module.optimizer.lr=0.1": ([0, 1], [2.0, 1.0]),  # means over seeds 1 and 2
                     "module.optimizer.lr=0.01": ([0], [2.0])}
    assert {line.get_label(): list(line.get_ydata()) for line in val_ax.lines} == {
        "module.optimizer.lr=0.1": [3.0, 1.5], "module.optimizer.lr=0.01": [2.5]}


def test_a_damaged_metrics_json_is_named_and_the_report_written_from_the_others(tmp_path: Path, caplog) -> None:
    for num, lr in enumerate(("0.1", "0.01", "0.001")):
        record_job(tmp_path, num, [*STUDENT, f"module.optimizer.lr={lr}"], 0.5 + num / 10)
    damaged = job_dir(tmp_path, 1) / "metrics.json"
    damaged.write_text(damaged.read_text()[:40])  # cut short
    with caplog.at_level(logging.INFO, logger="kd_lightning.report"):
        rows = write_report(tmp_path)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{damaged} is damaged (JSONDecodeError: ") and "\n" not in warning
    assert [r["status"] for r in rows] == ["done", "damaged", "done"]
    assert rows[1]["settings"]["module.optimizer.lr"] == 0.01  # its job.json still says what it was
    md = (tmp_path / "results.md").read_text()
    assert "2 of 3 jobs done" in md and "- job 1 damaged: metrics.json is damaged: run the sweep command again" in md
    assert [r[4] for r in table_rows(md)[2:]] == ["0.001", "0.1"]


@pytest.mark.slow  # a subprocess
def test_report_command_on_a_sweep_with_a_damaged_metrics_json(tmp_path: Path) -> None:
    for num, lr in enumerate(("0.1", "0.01")):
        record_job(tmp_path, num, [*STUDENT, f"module.optimizer.lr={lr}"], 0.5)
    damaged = job_dir(tmp_path, 0) / "metrics.json"
    damaged.write_bytes(b"\x00" * 64)  # what some file systems leave after a crash
    proc = subprocess.run([sys.executable, "-m", "kd_lightning.report", str(tmp_path)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and f"{damaged} is damaged (" in output
    assert "- job 0 damaged" in (tmp_path / "results.md").read_text()


def test_a_sweep_rerun_counts_a_damaged_metrics_json_as_unfinished(tmp_path: Path, caplog) -> None:
    overrides = [*STUDENT, "module.optimizer.lr=0.1"]
    job = record_job(tmp_path, 0, overrides, 0.5)
    settings = json.loads((job / "metrics.json").read_text())["config"]
    assert earlier_outcome(job, overrides, settings, "val/acc") == ("finished", 0.5)
    (job / "metrics.json").write_text('{"val/acc": 0.5, "overr')
    with caplog.at_level(logging.WARNING):
        assert earlier_outcome(job, overrides, settings, "val/acc") is None  # run it again
    # A set: a handler another test left on the package's logger can pass a record to caplog twice. Warnings only:
    # the first call's "finished ... skipped" is an INFO record when an earlier test left the logger at INFO.
    [message] = {r.getMessage() for r in caplog.records
                 if r.name == "kd_lightning.sweeps" and r.levelno >= logging.WARNING}
    assert message.startswith(f"{job / 'metrics.json'} is damaged (JSONDecodeError: ")
    assert message.endswith("counts as unfinished and is trained again (the damaged file is kept as "
                            "metrics.json.damaged)")
    assert not (job / "metrics.json").exists() and (job / "metrics.json.damaged").read_text().endswith("overr")
    (job / "job.json").write_text("[1, 2")  # a damaged start record does not stop it either
    assert earlier_outcome(job, overrides, settings, "val/acc") is None


# ---- job dirs named by their settings ---------------------------------------------------------------------------
def test_job_dirnames_name_the_swept_settings_and_sort_in_job_order() -> None:
    overrides = ["experiment=hard_soft", "distill.T=4", "+trainer.limit_train_batches=3", "distill.alpha=0.9",
                 "paths.log_dir=/tmp/logs"]
    assert job_dirname_of(3, overrides, ["paths.log_dir"], swept_keys={"distill.T", "distill.alpha"}) == \
        "003_distill.T:4+distill.alpha:0.9"
    assert job_dirname_of(3, overrides, ["paths.log_dir"]) == \
        "003_distill.T:4+distill.alpha:0.9+experiment:hard_soft+trainer.limit_train_batches:3"
    assert job_dirname_of(7, ["seed=1"], swept_keys=set()) == "007"
    names = [job_dirname_of(n, [f"distill.T={t}"]) for n, t in enumerate([16, 2, 8, 1] * 5)]
    assert sorted(names) == names  # 000_, 001_, ..., 019_: TensorBoard and ls list them in job order


@pytest.mark.parametrize("value", ["['trainer.max_epochs=1','+trainer.limit_train_batches=3']", "/data/my set é",
                                   "{a: 1, b: [2, 3]}", "x" * 300, "a,b", "'quoted value'"])
def test_a_job_dirname_is_one_path_component_usable_unquoted_in_an_override(value: str) -> None:
    name = job_dirname_of(12, [f"teacher.overrides={value}" if value.startswith("[") else f"data.data_dir='{value}'"
                               if value.startswith("/") else f"model.extra={value}"])
    assert name.startswith("012_") and "/" not in name and len(name) <= 200 and name.isascii()
    [override] = OverridesParser.create().parse_overrides([f"ckpt_path=/sweep/{name}/checkpoints/best.ckpt"])
    assert not override.is_sweep_override() and override.value() == f"/sweep/{name}/checkpoints/best.ckpt"


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_the_sweep_subdir_names_a_job_by_what_its_sweep_varies(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"overrides": ["distill.T=1,4", "experiment=hard_soft",
                                                                f"paths.log_dir={tmp_path}"]}))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["experiment=hard_soft", "distill.T=4", f"paths.log_dir={tmp_path}",
                                f"hydra.sweep.dir={sweep}"], return_hydra_config=True)
        t_alpha = compose("train", ["sweep=t_alpha", "distill.T=4", "distill.alpha=0.9", f"hydra.sweep.dir={sweep}"],
                          return_hydra_config=True)
    for c in (cfg, t_alpha):
        c.hydra.job.num = 3
    assert cfg.hydra.sweep.subdir == "003_distill.T:4"
    assert t_alpha.hydra.sweep.subdir == "003_distill.T:4+distill.alpha:0.9"  # the sweeper's params are swept keys
    (sweep / "3").mkdir()  # a sweep started when job dirs were numbers goes on in them
    assert cfg.hydra.sweep.subdir == "3"


def test_old_numbered_and_new_named_job_dirs_are_read_in_job_order(tmp_path: Path) -> None:
    for name in ("10", "2", "001_distill.T:4"):
        (tmp_path / name).mkdir()
    (tmp_path / ".submitit").mkdir()
    (tmp_path / "2026-01-01_00-00-00_x").mkdir()
    assert [p.name for p in job_dirs(tmp_path)] == ["001_distill.T:4", "2", "10"]
