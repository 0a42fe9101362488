"""Errors caused by the user's input, an interrupted run, and the one place that turns them into an exit code.

The entry points (train.py, eval.py) run inside `exit_on_error`: an InputError prints its one-line message,
without a traceback, and exits with 2; an interrupted run exits with the shell's code for its signal.
"""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
        from kd_lightning.run_dir import resume_command  # quoted for the shell and Hydra's lexer: it is pasted

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
