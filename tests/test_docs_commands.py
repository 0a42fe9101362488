"""Every command the README and docs/ show a user composes against today's configs and parsers: a stale key, a
config group that no longer exists or a flag a script lost fails here, not in a user's terminal.

Commands are taken from fenced code blocks and inline code spans: `python train.py ...` (also behind torchrun or
srun), `python eval.py|export.py|card.py|tracin.py ...` and `python -m kd_lightning.<module> ...`. Placeholders
(`<timestamp>`, `<run>`, ...) are filled from PLACEHOLDERS. Hydra entry points are composed in-process with
Hydra's compose API (a sweep value stands for its first element, as the first job would see it); argparse
entry points parse their arguments and stop there; nothing trains.
"""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import ROOT
from kd_lightning.config import CONF_DIR

PLACEHOLDERS = {  # what a user would type for each placeholder; paths need not exist to compose
    "<.../best.ckpt>": "logs/train/runs/x/checkpoints/best.ckpt",
    "<ckpt>": "logs/train/runs/x/checkpoints/best.ckpt",
    "<best.ckpt or .onnx>": "logs/train/runs/x/checkpoints/best.ckpt",
    "<timestamp>": "2026-01-01_00-00-00_host-1",
    "<time>": "2026-01-01_00-00-00_host-1",
    "<run>": "2026-01-01_00-00-00_host-1",
    "<job dir>": "logs/train/multiruns/x/003_distill.T:4+distill.alpha:0.9",  # as sweeps name them
    "<sweep dir>": "logs/train/multiruns/x",
    "<run dir>": "logs/train/runs/x",
    "<the student's run dir>": "logs/train/runs/x",
    "<dir>": "logs/train/runs/x",
    "<copy>": "logs/train/runs/x",
    "<yours>": "gpu",
    "<name>": "cifar10-soft-1",
    "<model config>": "mlp_784_16_10",
    "<net>": "resnet8x4",
    "<pair>": "resnet32x4_resnet8x4",
    "<fake or real CIFAR-100>": "cifar100",
    "$SLURM_JOB_ID": "1234",
    "DIR": "data/images",
    "<image file or folder>": "data/images/test",
    "=...": "=logs/train/runs/x",  # `student_run=...`; a bare `...` (more overrides) is dropped
}
HYDRA_CONFIGS = {  # entry point -> its primary config
    "train.py": "train", "kd_lightning.train": "train",
    "eval.py": "eval", "kd_lightning.eval": "eval",
    "export.py": "export", "kd_lightning.export": "export",
    "card.py": "card", "kd_lightning.card": "card",
    "tracin.py": "tracin", "kd_lightning.influence.cli": "tracin",
    "predict.py": "predict", "kd_lightning.predict": "predict",
}
ARGPARSE_MODULES = ("kd_lightning.bench", "kd_lightning.influence.bench")
POSITIONAL_MODULES = {"kd_lightning.report": 1, "kd_lightning.benchmark": 1, "kd_lightning.models.stats": 0}  # module -> number of arguments
HYDRA_FLAGS = ("-m", "--multirun", "--help", "-h", "--cfg", "job", "--hydra-help")

COMMAND = re.compile(
    r"(?:(?:torchrun|srun)\b[^`\n#]*?\s)?python3? (?:-m kd_lightning[\w.]*|\w+\.py)(?: [^`\n#]*)?")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in README.md and docs/*.md, continuation lines joined."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")
        fenced = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.DOTALL)
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
        for block in [*fenced, *spans]:
            for line in block.splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                if (match := COMMAND.search(line)) and (cmd := match.group(0).strip()) not in {c for _, c in found}:
                    found.append((page.name, cmd))
    return found


def fill(command: str) -> str:
    for placeholder, value in sorted(PLACEHOLDERS.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(placeholder, value)
    return command


def entry_point(words: list[str]) -> tuple[str, list[str]]:
    """The script or module a command runs and its arguments, behind torchrun/srun and their options."""
    i = next(i for i, w in enumerate(words) if w in ("python", "python3"))
    words = words[i + 1:]
    if words[0] == "-m":
        return words[1], words[2:]
    return Path(words[0]).name, words[1:]


def first_job(overrides: list[str]) -> list[str]:
    """A sweep's overrides as its first job gets them (`distill.T=1,2` -> `distill.T=1`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    single = []
    for raw, o in zip(overrides, parsed):
        if o.is_sweep_override():
            single.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            single.append(raw)
    return single


def compose_hydra(config_name: str, args: list[str]) -> None:
    overrides = first_job([a for a in args if a not in HYDRA_FLAGS])
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        compose(config_name, overrides=overrides, return_hydra_config=True)


class _Parsed(Exception):
    pass


def parse_argparse(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run the module's main() until its parser has read `args` (a bad flag exits 2 there), then stop."""
    parsed = {}
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a, **k) -> argparse.Namespace:
        parsed["args"] = original(self, *a, **k)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [module, *args])
    with pytest.raises(_Parsed):
        importlib.import_module(module).main()
    return parsed["args"]


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    """The extraction finds the README's main job and the commands of every page that has a code block."""
    commands = {c for _, c in COMMANDS}
    assert "python train.py experiment=soft" in commands
    assert len(COMMANDS) > 40, COMMANDS


# The README's commands are in the inner loop; docs/ pages' (about 120, 0.3 s of composing each) run with the slow tests.
@pytest.mark.parametrize(("page", "command"), [
    pytest.param(p, c, id=f"{p}:{c[:60]}", marks=() if p == "README.md" else pytest.mark.slow) for p, c in COMMANDS])
def test_documented_command_composes(page: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, args = entry_point([w for w in shlex.split(fill(command)) if w != "..."])
    if target in HYDRA_CONFIGS:
        assert (CONF_DIR / f"{HYDRA_CONFIGS[target]}.yaml").is_file(), f"{page}: {command}: no config for {target}"
        compose_hydra(HYDRA_CONFIGS[target], args)
    elif target in ARGPARSE_MODULES:
        parse_argparse(target, args, monkeypatch)
    elif target in POSITIONAL_MODULES:
        importlib.import_module(target)
        assert len(args) == POSITIONAL_MODULES[target], f"{page}: {command}: {target} takes {POSITIONAL_MODULES[target]} arguments"
    else:
        pytest.fail(f"{page}: `{command}` runs {target}, which this test does not know: add it to its tables")
