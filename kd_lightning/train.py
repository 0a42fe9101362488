"""The training recipe: `python train.py experiment=soft` (or `python -m kd_lightning.train ...`).

One function trains any configured net: teachers (ClassifierModule) and students (DistillModule).
"""

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_lightning import config  # also registers the ${kd_root:} and ${kd_if_null:} resolvers
from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.errors import ConfigError, InputError, NonFiniteLossError
from kd_lightning.methods import check_method, get_method
from kd_lightning.modules import DistillModule
from kd_lightning.summary import hparams_of, print_summary
from kd_lightning.sweeps import Interrupted, run_sweep_job
from kd_lightning.validation import check_num_classes, validate_config

log = logging.getLogger(__name__)


def is_distillation(cfg: DictConfig) -> bool:
    return issubclass(get_class(cfg.module._target_), DistillModule)


def count_params(net: Any) -> int:
    return sum(p.numel() for p in net.parameters())


@dataclass
class Run:
    """Everything a configured run consists of, built but not yet fitted."""

    datamodule: pl.LightningDataModule
    module: pl.LightningModule
    trainer: pl.Trainer
    teacher_ckpts: list[Path]


def build(cfg: DictConfig) -> Run:
    """Instantiate data, teacher (trained and cached first if needed), model, module, callbacks and trainer."""
    validate_config(cfg)
    if is_distillation(cfg):
        check_method(cfg)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    # Find the data (and its source, which keys the teacher cache) before anything trains.
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_num_classes("model", cfg.model, datamodule)

    module_kwargs: dict[str, Any] = {}
    teacher_ckpts: list[Path] = []
    method = get_method(cfg.distill.method) if is_distillation(cfg) else None
    if method is not None:  # the method provides its teacher(s): none, one, or several (multi_teacher)
        module_kwargs["teacher"], teacher_ckpts = method.provide_teacher(cfg, datamodule)

    pl.seed_everything(cfg.seed, workers=True)  # after the teacher, so a cached one changes nothing
    net = instantiate(cfg.model)
    module = instantiate(cfg.module, net=net, **module_kwargs)
    module.net_config = OmegaConf.to_container(cfg.model, resolve=True)  # set after: instantiate would build it
    if teacher_ckpts and cfg.distill.cache_teacher_logits:
        module.use_cached_teacher_logits(
            method.cached_teacher_logits(module.teacher, teacher_ckpts, datamodule, Path(cfg.paths.cache_dir))
        )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Run(datamodule, module, trainer, teacher_ckpts)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train/val, test the best-by-validation checkpoint, return the run's metrics."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    run = build(cfg)
    datamodule, module, trainer, teacher_ckpts = run.datamodule, run.module, run.trainer, run.teacher_ckpts
    net = module.net
    if cfg.get("ckpt_path") == "last" and not list((output_dir / "checkpoints").glob("*.ckpt")):
        log.warning("ckpt_path=last: no checkpoint in %s yet, so training starts from the beginning", output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns Ctrl-C and SIGTERM into these
        raise Interrupted(output_dir, sigterm=isinstance(exc, SIGTERMException)) from exc
    best = next(c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False)[0]

    result: dict[str, Any] = {
        **{k: float(v) for k, v in test_metrics.items()},
        **fit_facts(best),
        "data_source": datamodule.source,
        "params": count_params(net),
        "teacher_params": count_params(module.teacher) if getattr(module, "teacher", None) else None,
        "best_ckpt": str(best.best_model_path),
        "teacher_ckpt": str(teacher_ckpts[0]) if len(teacher_ckpts) == 1 else None,
        "teacher_ckpts": [str(c) for c in teacher_ckpts],
        "output_dir": str(output_dir),
        "wall_seconds": time.perf_counter() - started,
    }
    if trainer.is_global_zero:
        hp_metrics = {
            f"hp/{k.replace('/', '_')}": v
            for k, v in result.items()
            if k.startswith(("test/", "val/")) or k in ("best_val_loss", "best_epoch")
        }
        for lg in trainer.loggers:
            lg.log_hyperparams(hparams_of(cfg, datamodule.source), hp_metrics)
            lg.finalize("success")  # test() already closed the writer; this flushes the new records
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        print_summary(cfg, result)
    return result


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


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of `run_dir`, set to continue its fit in place from its newest last/interrupted
    checkpoint; `key=value` overrides (e.g. trainer.max_epochs=20) apply on top."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={run_dir} is not accepted: it has no .hydra/config.yaml (not a train.py run dir)")
    cfg = OmegaConf.load(saved)
    cfg.paths.output_dir = str(run_dir.resolve())
    cfg.ckpt_path = "last"
    cfg.resume = None
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except ConfigKeyError as err:
        raise ConfigError(f"with resume=, only key=value overrides of the saved config are accepted ({err.msg})") from None


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, and return `cfg.optimized_metric` (the objective of a sweeper such as Optuna)."""
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return run_sweep_job(cfg, train)  # failures are recorded, not raised: the sweep goes on
        if cfg.get("resume"):
            # `+key=value` is how Hydra lets a key that train.yaml lacks through; the saved config may have it.
            others = [o.lstrip("+") for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
            cfg = resume_config(Path(cfg.resume), others)
        return train(cfg)[cfg.optimized_metric]
    except (InputError, NonFiniteLossError) as err:
        log.error("%s", err)
        sys.exit(2 if isinstance(err, InputError) else 1)
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
