"""What a run reports: the config tree at its start; when it ends, the console summary table (with the command
that reproduces it and the code's git commit), the hyperparameters and the run text shown in TensorBoard."""

import functools
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from kd_lightning.config import is_distillation
from kd_lightning.methods import get_method

RUN_TEXT_TAG = "run"  # TensorBoard's text tab: the command that reproduces the run and the git commit of its code


# ---- what reproduces a run ---------------------------------------------------------------------------------------
def reproduce_command(overrides: list[str], multirun_job: bool = False) -> str:
    """`python train.py <overrides>`: each override with its value in Hydra's own quoting (as Hydra parsed it),
    then quoted for the shell, so the line pasted into a shell gives Hydra the same values. A sweep job's
    command runs that job alone (`hydra.mode=RUN`: a sweep= config would start the whole sweep)."""
    parts = []
    for override in OverridesParser.create().parse_overrides(overrides):
        value = override.value()
        if override.is_sweep_override() or (override.is_delete() and value is None):
            parts.append(override.input_line)
        else:
            text = "true" if value is True else "false" if value is False else override.get_value_element_as_str()
            parts.append(f"{override.get_key_element()}={text}")
    if multirun_job:
        parts.append("hydra.mode=RUN")
    return " ".join(["python train.py", *map(shell_quote, parts)])


def shell_quote(text: str) -> str:
    """`text` as one shell word: as is when safe, else in double quotes when that needs no escapes (Hydra's single
    quotes stay readable: "teacher.overrides=['trainer.max_epochs=3']"), else shlex's single quotes."""
    quoted = shlex.quote(text)
    if quoted != text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return quoted


@functools.cache
def code_version(root: str) -> str | None:
    """The git commit checked out in `root`, with `-dirty` when tracked files had uncommitted changes; None outside
    a git checkout. Cached: the first call (at a run's start) is what the run records."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_identity(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """The command that reproduces the run in `run_dir` (from Hydra's record of its overrides; None for a run
    Hydra did not start, such as a teacher trained for a student) and the git commit of the code."""
    hydra_dir = Path(run_dir) / ".hydra"
    command = None
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
        record = hydra_dir / "hydra.yaml"
        mode = OmegaConf.select(OmegaConf.load(record), "hydra.mode", default="") if record.is_file() else ""
        command = reproduce_command(overrides, multirun_job=str(mode).endswith("MULTIRUN"))
    return {"command": command, "git_commit": code_version(str(cfg.paths.root_dir))}


def log_run_text(loggers: Iterable[Any], result: dict[str, Any]) -> None:
    """The reproducing command and the git commit in TensorBoard's text tab (tag `run`)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    lines = [f"command: `{result.get('command') or '-'}`", f"git commit: `{result.get('git_commit') or '-'}`"]
    if result.get("tags"):
        lines.append(f"tags: {', '.join(map(str, result['tags']))}")
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_text(RUN_TEXT_TAG, "  \n".join(lines), 0)  # Markdown: two spaces end a line
            lg.experiment.flush()


# ---- the config tree at the start --------------------------------------------------------------------------------
def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a tree, one branch per top-level group (`extras.print_config=false`: not shown)."""
    tree = Tree("config", guide_style="dim")
    container = OmegaConf.to_container(cfg, resolve=True)
    for key, value in container.items():
        if isinstance(value, dict):
            tree.add(f"[bold]{key}[/bold]").add(OmegaConf.to_yaml(value).rstrip())
        else:
            tree.add(f"[bold]{key}[/bold]: {value}")
    Console().print(tree)


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
    if result.get("tags"):
        rows.append(("tags", ", ".join(map(str, result["tags"]))))
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    # Below the table, unwrapped, to be copied whole: what reproduces the run.
    for name in ("command", "git_commit"):
        if result.get(name):
            console.print(f"{name.replace('_', ' ')}: {result[name]}", soft_wrap=True, markup=False, highlight=False)
