"""The two-stage pipeline (docs/pipeline.md): no import cycle, `build` never trains, the teacher's config composed
explicitly from the run's, its cache key covering everything that can change its weights, stored and verified;
an interrupted teacher continued by one resume command; one `is_distillation`."""

import ast
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from helpers import run_script
from kd_lightning.config import CONF_DIR, PACKAGE_DIR, compose_train_config, is_distillation
from kd_lightning.errors import ConfigError
from kd_lightning.losses import get_loss_group
from kd_lightning.models import MnistCNN
from kd_lightning.teacher import TeacherCache, compose_teacher_config
from kd_lightning.train import build, prepare_data, resume_config, train
from kd_lightning.validation import validate_config


# ---- the package's import graph ------------------------------------------------------------------------------
def import_graph() -> dict[str, set[str]]:
    """module -> the kd_lightning modules it imports anywhere in its source (top level or inside functions)."""
    modules = {
        ".".join(p.relative_to(PACKAGE_DIR.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE_DIR.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycle_and_teacher_imports_nothing_from_train() -> None:
    graph = import_graph()
    assert "kd_lightning.train" in graph and "kd_lightning.teacher" in graph
    importers_of_train = {m for m, edges in graph.items() if "kd_lightning.train" in edges}
    assert "kd_lightning.teacher" not in importers_of_train

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert sorted(m for m in graph if m in reachable(m)) == []  # no module reaches itself


# ---- one answer to "is this a distillation run?" -----------------------------------------------------------
def test_is_distillation_on_configs_and_saved_mappings(tmp_path: Path) -> None:
    student, teacher = compose_train_config(["experiment=soft"]), compose_train_config(["experiment=teacher"])
    assert is_distillation(student) and not is_distillation(teacher)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"module": {"_target_": "kd_lightning.modules.DistillModule"}}))
    assert is_distillation(yaml.safe_load(saved.read_text()))
    assert not is_distillation({"module": {"_target_": "kd_lightning.modules.ClassifierModule"}})


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_teacher_runs_do_not_validate_distill_and_groups_are_config_errors() -> None:
    validate_config(compose_train_config(["experiment=teacher", "distill.T=0", "distill.group=nope"]))
    with pytest.raises(ConfigError, match=r"^distill.T=0 is not accepted"):
        validate_config(compose_train_config(["experiment=soft", "distill.T=0"]))
    with pytest.raises(ConfigError, match=r"^distill.group='nope' is not a loss group"):
        get_loss_group("nope")


# ---- the teacher's config and key ------------------------------------------------------------------------
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_teacher_config_has_the_runs_trainer_choice_outside_hydra() -> None:
    cfg = compose_train_config(["experiment=soft", "trainer=ddp_cpu", "trainer.max_epochs=3"])
    assert cfg.trainer_choice == "ddp_cpu"
    tcfg = compose_teacher_config(cfg)
    assert tcfg.trainer.strategy == "ddp_spawn" and tcfg.trainer.devices == 2
    assert tcfg.trainer.max_epochs == 5  # the teacher recipe's length, not the student's command line


def test_resume_keeps_the_runs_trainer_choice(tmp_path: Path) -> None:
    """A resumed run's teacher is composed with the trainer config the run chose (its .hydra/hydra.yaml), not the
    resume command's default: its saved config still holds the `${hydra:...}` interpolation."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    saved = OmegaConf.load(CONF_DIR / "train.yaml")  # trainer_choice: ${hydra:runtime.choices.trainer}
    saved.paths = {"output_dir": str(run_dir)}
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"choices": {"trainer": "ddp_cpu"}}}}, run_dir / ".hydra" / "hydra.yaml")
    assert resume_config(run_dir, []).trainer_choice == "ddp_cpu"


@pytest.mark.slow  # composes many teacher configs
def test_teacher_shares_only_the_dataset_identity(tmp_path: Path) -> None:
    """Issue 11 item 2: the student's loader settings never reach the teacher (nor its key)."""
    def key(*overrides: str) -> str:
        tcfg = compose_teacher_config(compose_train_config(["experiment=soft", *overrides]))
        return TeacherCache(tmp_path, tcfg, "mnist-sample-5k").key

    cfg = compose_train_config(["experiment=soft", "data.batch_size=100000", "data.eval_batch_size=3",
                                "data.train_val_split=[0.5,0.5]", "data.split_seed=7", "seed=3"])
    tcfg = compose_teacher_config(cfg)
    assert (tcfg.data.batch_size, tcfg.data.eval_batch_size, tcfg.data.seed) == (64, 1000, 42)  # the recipe's
    assert (list(tcfg.data.train_val_split), tcfg.data.split_seed) == ([0.5, 0.5], 7)  # the run's data
    assert key("data.batch_size=100000", "data.eval_batch_size=3", "seed=3") == key()
    assert key("data.train_val_split=[0.5,0.5]") != key() and key("data.split_seed=7") != key()


@pytest.mark.slow  # composes many teacher configs
def test_key_covers_what_changes_the_teachers_weights(tmp_path: Path) -> None:
    """Issue 11 item 1: the key is the whole teacher config, not a hand-picked part of it."""
    def key(*teacher_overrides: str, source: str = "mnist-sample-5k") -> str:
        overrides = ",".join(f"'{o}'" for o in teacher_overrides)
        cfg = compose_train_config(["experiment=soft", f"teacher.overrides=[{overrides}]"])
        return TeacherCache(tmp_path, compose_teacher_config(cfg), source).key

    base = key()
    assert key(source="mnist") != base
    for override in ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                     "trainer.check_val_every_n_epoch=2", "trainer.devices=2",
                     "callbacks.model_checkpoint.monitor=val/acc", "module.optimizer.lr=0.5", "seed=1"):
        assert key(override) != base, override


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_key_ignores_the_documented_keys(tmp_path: Path) -> None:
    def key(*overrides: str) -> str:
        tcfg = compose_teacher_config(compose_train_config(["experiment=soft", *overrides]))
        return TeacherCache(tmp_path / "cache", tcfg, "mnist-sample-5k").key

    assert key() == key(f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}", "data.download=false",
                        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "distill.T=7",
                        "teacher.overrides=['callbacks.lr_monitor=null','trainer.log_every_n_steps=1']")


# ---- build never trains ----------------------------------------------------------------------------------
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_build_is_pure_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in MnistCNN().state_dict().items()}}, ckpt)
    cfg = compose_train_config(["experiment=soft", f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
                                "data.download=false", "distill.cache_teacher_logits=false"])
    datamodule = prepare_data(cfg)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("build trained something")

    monkeypatch.setattr("kd_lightning.train.train", no_training)
    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    run = build(cfg, datamodule, [ckpt])
    assert run.teacher_ckpts == [ckpt] and isinstance(run.module.teacher, MnistCNN)
    assert not (tmp_path / "teachers").exists()


# ---- the teacher cache, end to end in this process -------------------------------------------------------
def tiny(tmp_path: Path, run: str, *teacher_overrides: str) -> DictConfig:
    """A 2-batch student run distilled from a small 2-batch teacher, all under tmp_path."""
    overrides = ",".join(f"'{o}'" for o in ("model=mlp_784_20_20_10", "trainer.max_epochs=1",
                                              "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                                              "+trainer.limit_test_batches=2", *teacher_overrides))
    return compose_train_config([
        "experiment=soft", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / run}", "data.download=false", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "distill.cache_teacher_logits=false",
        f"teacher.overrides=[{overrides}]",
    ])


@pytest.mark.slow  # several full runs in-process
def test_another_teacher_config_never_reuses_a_cached_teacher(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 items 1 and 5: a teacher trained on 3 batches is not reused for one of 2 batches; the stored
    config is compared on reuse; a damaged cached teacher.ckpt is retrained."""
    caplog.set_level(logging.INFO)
    first = train(tiny(tmp_path, "a", "++trainer.limit_train_batches=3"))
    entry = Path(first["teacher_ckpt"]).parent
    stored = json.loads((entry / "teacher.json").read_text())
    assert stored["identity"]["trainer"]["limit_train_batches"] == 3 and stored["key"] == entry.name
    assert (entry / "run" / ".hydra" / "config.yaml").is_file() and (entry / "run" / "metrics.json").is_file()

    caplog.clear()
    second = train(tiny(tmp_path, "b"))
    assert "Using the cached teacher" not in caplog.text and "Training the teacher" in caplog.text
    entry = Path(second["teacher_ckpt"]).parent
    assert entry != Path(first["teacher_ckpt"]).parent

    caplog.clear()
    again = train(tiny(tmp_path, "c"))  # the same config: reused
    assert "Using the cached teacher" in caplog.text and again["teacher_ckpt"] == second["teacher_ckpt"]

    cfg = tiny(tmp_path, "c")
    content = prepare_data(cfg).content_fingerprint()  # the data's files are part of the teacher's identity
    cache = TeacherCache(cfg.paths.cache_dir, compose_teacher_config(cfg), "mnist-sample-5k", content)
    assert cache.dir == entry and cache.verified()
    stored_identity = cache.identity

    # A stored identity that differs (an edited file, a hash collision): not used, removed to be rebuilt.
    edited = {**json.loads(cache.record.read_text()), "identity": {**stored_identity, "seed": 99}}
    cache.record.write_text(json.dumps(edited))
    caplog.clear()
    assert not cache.verified()
    assert "was trained with another config (seed: stored 99, now 42)" in caplog.text
    assert not cache.ckpt.exists() and not cache.record.exists()

    # A damaged teacher.ckpt: named in one line; the next run trains the same teacher again.
    ckpt_bytes = Path(second["best_ckpt"]).read_bytes()  # any file: what matters is the checksum
    cache.store(second["best_ckpt"])
    cache.ckpt.write_bytes(ckpt_bytes[:1000])
    caplog.clear()
    result = train(tiny(tmp_path, "e"))
    assert caplog.text.count("has a damaged teacher.ckpt (its sha256 differs from teacher.json): training it again") == 1
    assert "Training the teacher" in caplog.text and result["teacher_ckpt"] == second["teacher_ckpt"]
    assert result["test/teacher_acc"] == second["test/teacher_acc"]  # the same teacher again
    assert json.loads(cache.record.read_text())["identity"] == stored_identity


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_waiting_for_the_teacher_lock_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 item 10: a run waiting on another run's teacher lock says what it waits for."""
    caplog.set_level(logging.INFO)
    cache = TeacherCache(tmp_path, compose_teacher_config(compose_train_config(["experiment=soft"])), "mnist")
    other_run = FileLock(str(cache.dir) + ".lock")
    other_run.acquire()
    entered = threading.Event()

    def waiting_run() -> None:
        with cache.lock():
            entered.set()

    thread = threading.Thread(target=waiting_run)
    thread.start()
    deadline = time.monotonic() + 20
    while "Waiting for another run" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not entered.is_set()
    other_run.release()
    thread.join(timeout=20)
    assert entered.is_set()
    assert f"Waiting for another run to finish the teacher {cache.dir}" in caplog.text


# ---- an interrupted teacher, continued by the one printed command -------------------------------------------
@pytest.mark.slow
def test_sigterm_while_the_teacher_trains_resumes_the_whole_run(tmp_path: Path, offline_overrides: list[str]) -> None:
    """Issue 11 item 7: one command continues the teacher from its interrupted checkpoint, then the student."""
    run_dir = tmp_path / "student"
    teacher = ("teacher.overrides=['trainer.max_epochs=2','+trainer.limit_train_batches=5',"
               "'+trainer.limit_val_batches=2','+callbacks.stop._target_=probes.SendSignalAt','+callbacks.stop.step=3']")
    stopped = run_script("train.py", "experiment=soft", *offline_overrides, f"hydra.run.dir={run_dir}", teacher,
                         "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
                         expect_rc=143)
    out = stopped.stdout + stopped.stderr
    assert out.count("resume=") == 1 and f"resume with: python train.py resume={run_dir}" in out
    (entry,) = (tmp_path / "logs" / "teachers").glob("*/run")
    assert (entry / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (entry.parent / "teacher.json").exists()

    resumed = run_script("train.py", f"resume={run_dir}")
    out = resumed.stdout + resumed.stderr
    assert "Continuing the interrupted teacher run" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_ckpt"] == str(entry.parent / "teacher.ckpt") and metrics["epochs"] == 1
    teacher_metrics = json.loads((entry / "metrics.json").read_text())
    assert teacher_metrics["epochs"] == 2
    record = json.loads((entry.parent / "teacher.json").read_text())
    assert record["key"] == entry.parent.name and (entry.parent / "teacher.ckpt").is_file()
