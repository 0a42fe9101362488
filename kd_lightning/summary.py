"""What a finished run reports: the console summary table and the hyperparameters shown in TensorBoard."""

from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from kd_lightning.config import is_distillation
from kd_lightning.methods import get_method


def hparams_of(cfg: DictConfig, data_source: str | None) -> dict[str, Any]:
    """The settings that tell runs apart, flattened for TensorBoard's HParams tab."""
    c = OmegaConf.to_container(cfg, resolve=True)
    params: dict[str, Any] = {
        "model": c["model"]["_target_"].rsplit(".", 1)[-1],
        "model_config": str({k: v for k, v in c["model"].items() if k != "_target_"}),
        "optimizer": c["module"]["optimizer"]["_target_"].rsplit(".", 1)[-1],
        "lr": c["module"]["optimizer"].get("lr"),
        "batch_size": c["data"].get("batch_size"),
        "max_epochs": c["trainer"].get("max_epochs"),
        "seed": c["seed"],
        "data": c["data"]["_target_"].rsplit(".", 1)[-1],
        "data_source": data_source,
    }
    if is_distillation(c):
        params.update(method=c["module"].get("method", "kd"), group=c["module"]["group"], T=c["module"]["T"],
                      alpha=c["module"]["alpha"], method_settings=get_method(cfg.distill.method).describe(cfg.distill))
    return params


def hp_metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    """The final metrics shown beside the settings in TensorBoard's HParams tab (`hp/*`)."""
    return {
        f"hp/{k.replace('/', '_')}": v
        for k, v in result.items()
        if k.startswith(("test/", "val/")) or k in ("best_val_loss", "best_epoch")
    }


def print_summary(cfg: DictConfig, result: dict[str, Any]) -> None:
    table = Table(title=f"Run summary ({result['output_dir']})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("student" if result["teacher_params"] else "model", cfg.model._target_.rsplit(".", 1)[-1])]
    if is_distillation(cfg):  # the method and its own settings (kd: its group, and T, alpha where they act)
        rows.append(("method", get_method(cfg.distill.method).describe(cfg.distill)))
    rows.append(("parameters", f"{result['params']:,}"))
    if result["teacher_params"]:
        rows.append(("teacher parameters", f"{result['teacher_params']:,}"))
        rows.append(("teacher test acc", f"{result['test/teacher_acc']:.4f}"))
        rows.append(("test agreement with teacher", f"{result['test/agreement']:.4f}"))
    rows += [
        ("test acc", f"{result['test/acc']:.4f}"),
        ("test loss", f"{result['test/loss']:.4f}"),
        ("best epoch (0-based) / epochs run", f"{result['best_epoch']} / {result['epochs']}"),
        ("seconds per epoch", f"{result['seconds_per_epoch']:.2f}" if result["seconds_per_epoch"] else "-"),
        ("data source", str(result["data_source"])),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
