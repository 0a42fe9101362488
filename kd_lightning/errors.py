"""Errors caused by the user's input, an interrupted run, and the one place that turns them into an exit code.

The entry points (train.py, eval.py) run inside `exit_on_error`: an InputError prints its one-line message,
without a traceback, and exits with 2; an interrupted run exits with the shell's code for its signal.
"""

import logging
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser


class InputError(Exception):
    """Bad input: a config value, a checkpoint or a data file. The message names it and what is accepted."""


class ConfigError(InputError, ValueError):
    """A config value out of range or inconsistent with another."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable, unsafe or for another architecture."""


class DataError(InputError, FileNotFoundError):
    """A dataset that is missing or whose files are corrupt."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class Interrupted(Exception):
    """The fit was stopped by Ctrl-C or SIGTERM after saving checkpoints/interrupted.ckpt."""

    def __init__(self, output_dir: Path, sigterm: bool) -> None:
        # Quoted for the shell and Hydra's lexer: the command is pasted, and run dirs may hold spaces or any character.
        super().__init__(f"interrupted by {'SIGTERM' if sigterm else 'Ctrl-C'}; resume with: {resume_command(output_dir)}")
        self.exit_code = 143 if sigterm else 130  # the shell's codes for death by SIGTERM / SIGINT


@contextmanager
def exit_on_error(log: logging.Logger, failures: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """The entry points' exits. Bad input: its one line, exit code 2. A NaN loss (or one of the entry point's own
    `failures`, e.g. an export that does not match): its line, exit 1. Ctrl-C / SIGTERM: 130 / 143."""
    try:
        yield
    except InputError as err:
        log.error("%s", err)
        sys.exit(2)
    except (NonFiniteLossError, *failures) as err:
        log.error("%s", err)
        sys.exit(1)
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(err.exit_code)


# ---- the resume command that Interrupted prints -------------------------------------------------------------------
def hydra_value(value: str) -> str:
    """`value` as Hydra's override lexer reads it back: as is when it does, else double-quoted with `\\` escapes
    (a run dir with non-ASCII characters, quotes or brackets)."""
    def reads_back(text: str) -> bool:
        try:
            return OverridesParser.create().parse_override(f"k={text}").value() == value
        except Exception:  # noqa: BLE001 - Hydra's lexer refuses it
            return False

    if reads_back(value):
        return value
    # Double quotes: the shell's single quotes then wrap the whole argument without escapes.
    quoted = '"' + re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), value) + '"'
    assert reads_back(quoted), value
    return quoted


def resume_command(run_dir: str | Path) -> str:
    """The command that continues `run_dir`, quoted for the shell and for Hydra's lexer: pasted, it works."""
    return f"python train.py {shlex.quote('resume=' + hydra_value(str(run_dir)))}"
