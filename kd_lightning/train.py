"""The training recipe: `python train.py experiment=soft` (or `python -m kd_lightning.train ...`).

One function, `train`, trains any configured net, teachers (ClassifierModule) and students (DistillModule)
alike, top to bottom: validate -> data -> ensure the teacher (distillation runs: the cached one, or trained
now by this same recipe) -> build (pure construction) -> fit -> test -> record. docs/pipeline.md maps it.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from kd_lightning import config  # also registers the ${kd_root:} and ${kd_if_null:} resolvers
from kd_lightning.card import run_outputs, write_card
from kd_lightning.checkpoints import atomic_write_text, intact_checkpoint, load_checkpoint, load_net
from kd_lightning.config import is_distillation, resolve_auto_normalization
from kd_lightning.errors import ConfigError, Interrupted, exit_on_error
from kd_lightning.launch import is_first_rank, wait_for_file
from kd_lightning.methods import check_method, get_method
from kd_lightning.models.library import check_net
from kd_lightning.models.stats import count_params
from kd_lightning.run_dir import (
    apply_resume_changes,
    record_resume_changes,
    recorded_resume_changes,
    resume_dir_error,
    run_record,
)
from kd_lightning.summary import hp_metrics_of, hparams_of, log_run_text, print_config_tree, print_summary, run_identity
from kd_lightning.sweeps import run_sweep_job
from kd_lightning.teacher import (
    TeacherCache,
    cached_teacher_logits,
    compose_teacher_config,
    file_sha256,
    given_teacher,
)
from kd_lightning.trackers import check_loggers, finish_run
from kd_lightning.validation import check_num_classes, check_splits, validate_config

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a configured run consists of, built but not yet fitted."""

    datamodule: pl.LightningDataModule
    module: pl.LightningModule
    trainer: pl.Trainer
    teacher_ckpts: list[Path]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train/val, test the best-by-validation checkpoint, record and return the run's metrics."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    distillation = is_distillation(cfg)
    validate_config(cfg)
    check_loggers(cfg)  # a tracker's package missing: one line now, not after the teacher trained
    identity = run_identity(cfg, output_dir)  # the command and the git commit, as the run starts
    if distillation:
        check_method(cfg)  # distill.method and its distill.<method>.* settings
    datamodule = prepare_data(cfg)
    # The method's teachers (none, one, or several for multi_teacher), each cached or trained now.
    runs = get_method(cfg.distill.method).teacher_runs(cfg) if distillation else []
    teacher_ckpts = [ensure_teacher(run_cfg, datamodule) for run_cfg in runs]
    run = build(cfg, datamodule, teacher_ckpts)  # a missing or damaged teacher checkpoint: its one line here
    module, trainer = run.module, run.trainer
    teacher_shas = [file_sha256(c) for c in teacher_ckpts]
    check_same_teachers(cfg, output_dir, teacher_ckpts, teacher_shas)  # continuing: those of the finished epochs

    if cfg.get("ckpt_path") == "last" and not list((output_dir / "checkpoints").glob("*.ckpt")):
        log.warning("ckpt_path=last: no checkpoint in %s yet, so training starts from the beginning", output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns Ctrl-C and SIGTERM into these
        raise Interrupted(output_dir, sigterm=isinstance(exc, SIGTERMException)) from exc
    best = next(c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    last_metrics = {}
    if cfg.get("test_last"):  # the last epoch's test metrics too, as last/test/* (the CIFAR-100 benchmark reports both)
        last = Path(best.dirpath) / f"{best.CHECKPOINT_NAME_LAST}{best.FILE_EXTENSION}"
        last_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=str(last), verbose=False)[0]
    test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False)[0]
    # The file each teacher came from (teacher.ckpt_path as given, e.g. a released teacher, else the cached one).
    teacher_files = [Path(r.teacher.ckpt_path) if r.teacher.ckpt_path else c for r, c in zip(runs, teacher_ckpts)]

    result: dict[str, Any] = {
        **{k: float(v) for k, v in test_metrics.items()},
        **{f"last/{k}": float(v) for k, v in last_metrics.items()},
        **fit_facts(best),
        **data_facts(datamodule),
        "params": count_params(module.net),
        "teacher_params": count_params(module.teacher) if getattr(module, "teacher", None) is not None else None,
        "best_ckpt": str(best.best_model_path),
        # Other runs' files: absolute, with their sha256, checked on use (run_dir.teacher_ckpts_of).
        "teacher_ckpt": str(Path(teacher_ckpts[0]).absolute()) if len(teacher_ckpts) == 1 else None,
        "teacher_ckpts": [str(Path(c).absolute()) for c in teacher_ckpts],
        "teacher_ckpts_sha256": teacher_shas,
        **teacher_file_facts(teacher_files),
        "output_dir": str(output_dir),
        "wall_seconds": time.perf_counter() - started,
        "tags": list(cfg.get("tags") or []),
        **identity,
    }
    if changes := recorded_resume_changes(output_dir):
        result["resume_changes"] = changes  # settings a resume changed, each with the epoch it holds from
    if trainer.is_global_zero:
        record(cfg, result, trainer, datamodule.source)
    return result


def data_facts(datamodule: Any) -> dict[str, Any]:
    """What a result records about its data (train() and the batched launcher's jobs alike)."""
    return {
        "data_source": datamodule.source,
        "class_names": getattr(datamodule, "class_names", None),  # image_folder: predictions by name
        "normalization": {"mean": datamodule.mean, "std": datamodule.std},  # the values the inputs were standardized with
    }


def teacher_file_facts(teacher_files: list[Path]) -> dict[str, Any]:
    """The file the user gave as teacher.ckpt_path (a released checkpoint), as given, with its sha256: one teacher."""
    one = len(teacher_files) == 1
    return {"teacher_file": str(teacher_files[0]) if one else None,
            "teacher_sha256": file_sha256(teacher_files[0]) if one else None}


def prepare_data(cfg: DictConfig) -> pl.LightningDataModule:
    """The run's DataModule, its data found (the source found keys the teacher cache) before anything trains."""
    resolve_auto_normalization(cfg)  # data.normalization=auto: imagenet or computed, from the teacher's weights
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_splits(datamodule)
    check_num_classes("model", cfg.model, datamodule)
    return datamodule


def ensure_teacher(cfg: DictConfig, datamodule: Any) -> Path:
    """The checkpoint of the run's teacher: `teacher.ckpt_path`, else the verified cached teacher, else one
    trained now into the cache by `train` itself on the composed teacher config."""
    tcfg = compose_teacher_config(cfg)
    check_num_classes(f"teacher model (experiment={cfg.teacher.experiment})", tcfg.model, datamodule)
    if cfg.teacher.ckpt_path:  # a Lightning checkpoint, or a released teacher file converted once
        return given_teacher(Path(cfg.teacher.ckpt_path), tcfg.model, cfg.paths.cache_dir)
    cache = TeacherCache(cfg.paths.cache_dir, tcfg, datamodule.source, datamodule.content_fingerprint())
    if not is_first_rank():  # ranks started by torchrun/srun: rank 0 trains or verifies it, the others wait
        wait_for_file(cache.record, "the teacher")  # teacher.json is written last, once teacher.ckpt is in place
        return cache.ckpt
    with cache.lock():
        if cache.verified():
            log.info("Using the cached teacher %s", cache.ckpt)
            return cache.ckpt
        teacher_run = cache.prepare_run(tcfg)
        log.info("Training the teacher (experiment=%s) into %s", cfg.teacher.experiment, cache.run_dir)
        try:
            result = train(teacher_run)
        except Interrupted as err:
            # Resuming this run continues the teacher from its interrupted checkpoint, then trains the student.
            raise Interrupted(Path(cfg.paths.output_dir), sigterm=err.exit_code == 143) from err
        except Exception:
            cache.discard()  # a failed teacher leaves no entry (an interrupted one stays, to be continued)
            raise
        cache.store(result["best_ckpt"])  # absolute in memory; metrics.json records it relative
    return cache.ckpt


TEACHERS_RECORD = "teachers.json"  # a distillation run's teachers, recorded when its fit starts


def check_same_teachers(cfg: DictConfig, run_dir: Path, teacher_ckpts: list[Path], shas: list[str]) -> None:
    """A resumed run must distil from the teachers its finished epochs learnt from (their sha256 in metrics.json,
    else in teachers.json, written when the fit started): one line naming the first whose content changed. A run
    that starts its fit records them."""
    recorded = None
    for name, key in (("metrics.json", "teacher_ckpts_sha256"), (TEACHERS_RECORD, "sha256")):
        if recorded is None and (run_dir / name).is_file():
            recorded = json.loads((run_dir / name).read_text()).get(key)
    if recorded is not None and cfg.get("ckpt_path"):
        for ckpt, sha, was in zip(teacher_ckpts, shas, recorded):
            if sha != was:
                raise ConfigError(f"the teacher {ckpt} is not the one {run_dir} was distilled from (sha256 "
                                  f"{sha[:12]}..., recorded {was[:12]}...): resuming would mix two teachers; start a "
                                  "new run")
    elif teacher_ckpts and is_first_rank():
        atomic_write_text(run_dir / TEACHERS_RECORD, json.dumps(
            {"teacher_ckpts": [str(Path(c).absolute()) for c in teacher_ckpts], "sha256": shas}, indent=2))


def load_teacher(run_cfg: DictConfig, ckpt: Path) -> nn.Module:
    """The teacher net named by `run_cfg.teacher`, rebuilt from its checkpoint."""
    teacher = load_net(ckpt, compose_teacher_config(run_cfg).model)
    check_net(teacher, f"teacher {ckpt}")
    return teacher


def build(cfg: DictConfig, datamodule: pl.LightningDataModule, teacher_ckpts: list[Path]) -> Run:
    """Instantiate model, module (with the method's teacher from `teacher_ckpts` and its cached logits),
    callbacks, loggers and trainer. Pure construction: nothing is trained here."""
    module_kwargs: dict[str, Any] = {}
    method = get_method(cfg.distill.method) if is_distillation(cfg) else None
    if method is not None:
        module_kwargs["teacher"] = method.load_teacher(cfg, teacher_ckpts, load_teacher)  # None: no teacher

    pl.seed_everything(cfg.seed, workers=True)  # after the teacher, so a cached one changes nothing
    net = instantiate(cfg.model)
    check_net(net, "model")  # the attributes the modules read, one line naming a missing one (docs/models.md)
    module = instantiate(cfg.module, net=net, **module_kwargs)
    module.net_config = OmegaConf.to_container(cfg.model, resolve=True)  # set after: instantiate would build it
    if not getattr(module, "compile_net", False):  # Lightning's model summary counts FLOPs on one example (0 without)
        module.example_input_array = torch.zeros(1, *datamodule.input_shape)
    if teacher_ckpts and cfg.distill.cache_teacher_logits:
        module.use_cached_teacher_logits(
            method.cached_teacher_logits(module.teacher, teacher_ckpts, lambda ckpt, net: cached_teacher_logits(
                ckpt, net, datamodule, Path(cfg.paths.cache_dir)))
        )
    callbacks = [cb for c in (cfg.get("callbacks") or {}).values() if c is not None and (cb := instantiate(c)) is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Run(datamodule, module, trainer, teacher_ckpts)


def record(cfg: DictConfig, result: dict[str, Any], trainer: pl.Trainer, data_source: str | None) -> None:
    """metrics.json in the run dir, the HParams of TensorBoard, a distillation run's model card, the trackers' copies
    of those files, the console summary."""
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams_of(cfg, data_source), hp_metrics_of(result))
    log_run_text(trainer.loggers, result)
    # The results carry the resolved settings that produced them (read by the sweep report), written atomically.
    settings = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_text(Path(result["output_dir"]) / "metrics.json",
                      json.dumps({**run_record(result), "config": settings}, indent=2))
    if result["teacher_ckpt"]:  # the cheap model card, teacher vs student (docs/export.md): one teacher
        write_card(Path(result["output_dir"]), cfg, device=trainer.strategy.root_device, **run_outputs(trainer))
    finish_run(trainer.loggers, result["output_dir"])  # test() already closed TensorBoard's writer: this flushes
    print_summary(cfg, result)


def fit_facts(best: ModelCheckpoint) -> dict[str, Any]:
    """Validation metrics, best epoch and score, epochs run and seconds per epoch, read from the best and last
    checkpoints: they hold them whether the fit ran here or in spawned DDP processes (whose trainer state
    stays there)."""
    best_ckpt = load_checkpoint(best.best_model_path)
    last_ckpt = load_checkpoint(Path(best.dirpath) / f"{best.CHECKPOINT_NAME_LAST}{best.FILE_EXTENSION}")
    epochs = last_ckpt["epoch"] + 1
    best_state = next(v for k, v in best_ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and
                      v.get("monitor") == best.monitor)
    timer = last_ckpt["callbacks"].get("Timer")
    return {
        **best_ckpt.get("val_metrics", {}),  # val/acc, val/loss, ... of the best checkpoint
        "best_val_loss": float(best_state["best_model_score"]),
        "best_epoch": int(best_ckpt["epoch"]),
        "epochs": epochs,
        "seconds_per_epoch": timer["time_elapsed"]["train"] / epochs if timer else None,
    }


def resume_config(run_dir: Path, overrides: list[str], force: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The saved config of `run_dir` (with the changes of earlier resumes), set to continue its fit in place from its
    newest intact checkpoint (a damaged one is named and skipped). `overrides` (Hydra's syntax) may change only what
    cannot change the finished epochs' meaning (run_dir.RESUME_KEYS, e.g. trainer.max_epochs=20), or the keys in
    `force` (`resume_force=[...]`); each change is recorded with the epoch it holds from (resume_changes.json, then
    metrics.json)."""
    if error := resume_dir_error(run_dir):
        raise ConfigError(error)
    cfg = config.saved_run_config(run_dir.resolve())  # with the trainer the run chose (its teacher's too)
    checkpoint = intact_checkpoint(run_dir / "checkpoints")
    cfg.ckpt_path = str(checkpoint) if checkpoint else "last"  # "last" without one: train() says it starts anew
    cfg.resume = None
    OmegaConf.set_struct(cfg, True)
    earlier = recorded_resume_changes(run_dir)
    changes = apply_resume_changes(run_dir, cfg, overrides, list(force), checkpoint)
    if changes != earlier and is_first_rank():
        record_resume_changes(run_dir, changes)
    return cfg


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, and return `cfg.optimized_metric` (the objective of a sweeper such as Optuna)."""
    with exit_on_error(log):
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return run_sweep_job(cfg, train)  # failures are recorded, not raised: the sweep goes on
        if cfg.get("resume"):
            # Checked against the saved config: only what cannot change the finished epochs (run_dir.RESUME_KEYS).
            # `+key=value` is how Hydra lets a key that train.yaml lacks through; the saved config may have it.
            others = [o.lstrip("+") for o in HydraConfig.get().overrides.task
                      if not o.startswith(("resume=", "resume_force="))]
            cfg = resume_config(Path(cfg.resume), others, list(cfg.resume_force or []))
        if cfg.get("extras", {}).get("print_config", False):  # single runs only: a sweep's jobs would print N trees
            print_config_tree(cfg)
        return train(cfg)[cfg.optimized_metric]


if __name__ == "__main__":
    main()
