"""The training recipe: `python train.py experiment=soft` (or `python -m kd_lightning.train ...`).

One function trains any configured net: teachers (ClassifierModule) and students (DistillModule).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer

from kd_lightning import config  # noqa: F401 - registers the ${kd_root:} resolver
from kd_lightning.checkpoints import load_checkpoint, load_net
from kd_lightning.modules import DistillModule
from kd_lightning.summary import hparams_of, print_summary
from kd_lightning.teacher import cached_teacher_logits, provide_teacher

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
    teacher_ckpt: Path | None = None


def build(cfg: DictConfig) -> Run:
    """Instantiate data, teacher (trained and cached first if needed), model, module, callbacks and trainer."""
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    # Find the data (and its source, which keys the teacher cache) before anything trains.
    datamodule.prepare_data()
    datamodule.setup("fit")

    module_kwargs: dict[str, Any] = {}
    teacher_ckpt = None
    if is_distillation(cfg):
        teacher_ckpt = provide_teacher(cfg, datamodule.source)
        module_kwargs["teacher"] = load_net(teacher_ckpt)

    pl.seed_everything(cfg.seed, workers=True)  # after the teacher, so a cached one changes nothing
    net = instantiate(cfg.model)
    module = instantiate(cfg.module, net=net, **module_kwargs)
    module.net_config = OmegaConf.to_container(cfg.model, resolve=True)  # set after: instantiate would build it
    if teacher_ckpt is not None and cfg.distill.cache_teacher_logits:
        module.use_cached_teacher_logits(
            cached_teacher_logits(teacher_ckpt, module.teacher, datamodule, Path(cfg.paths.cache_dir))
        )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Run(datamodule, module, trainer, teacher_ckpt)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train/val, test the best-by-validation checkpoint, return the run's metrics."""
    output_dir = Path(cfg.paths.output_dir)
    run = build(cfg)
    datamodule, module, trainer, teacher_ckpt = run.datamodule, run.module, run.trainer, run.teacher_ckpt
    net = module.net
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    best = next(c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False)[0]

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    epochs = trainer.current_epoch
    result: dict[str, Any] = {
        **{k: float(v) for k, v in test_metrics.items()},
        "best_val_loss": float(best.best_model_score),
        "best_epoch": int(load_checkpoint(best.best_model_path)["epoch"]),
        "epochs": epochs,
        "seconds_per_epoch": timer.time_elapsed("train") / max(epochs, 1) if timer else None,
        "data_source": datamodule.source,
        "params": count_params(net),
        "teacher_params": count_params(module.teacher) if is_distillation(cfg) else None,
        "best_ckpt": str(best.best_model_path),
        "teacher_ckpt": str(teacher_ckpt) if teacher_ckpt else None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        hp_metrics = {
            f"hp/{k.replace('/', '_')}": v
            for k, v in result.items()
            if k.startswith("test/") or k in ("best_val_loss", "best_epoch")
        }
        for lg in trainer.loggers:
            lg.log_hyperparams(hparams_of(cfg, datamodule.source), hp_metrics)
            lg.finalize("success")  # test() already closed the writer; this flushes the new records
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        print_summary(cfg, result)
    return result


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    return result.get("test/acc")


if __name__ == "__main__":
    main()
