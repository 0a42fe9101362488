"""Errors caused by the user's input, an interrupted run, and the one place that turns them into an exit code.

The entry points (train.py, eval.py) run inside `exit_on_error`: an InputError prints its one-line message,
without a traceback, and exits with 2; an interrupted run exits with the shell's code for its signal. A full
disk, a read-only file system or a missing permission (ENOSPC, EDQUOT, EROFS, EACCES, EPERM), anywhere in a run,
prints one line naming the path, what happened and what to do (`disk_error_message`), and exits with 1. One of
these errors wrapped by Hydra's `instantiate` (its InstantiationException) prints the same line as unwrapped.
`CheckOutputDir` gives the same line for Hydra's own creation of the run or sweep dir, before Hydra tries.
"""

import errno
import logging
import re
import shlex
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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


# What a write can meet on a full, read-only or foreign disk, and what the user can do about it.
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space there (or point paths.log_dir / paths.cache_dir at another disk) "
                   "and run again: resume=<run dir> continues a run from its last checkpoint, a sweep command run "
                   "again with hydra.sweep.dir=<sweep dir> continues the sweep"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota (or point paths.log_dir / "
                   "paths.cache_dir at another disk) and run again: resume=<run dir> continues a run from its last "
                   "checkpoint"),
    errno.EROFS: ("the file system is read-only", "point paths.log_dir / paths.cache_dir (or hydra.run.dir) at a "
                  "writable directory"),
    errno.EACCES: ("permission denied", "give this user access to it, or point paths.log_dir / paths.cache_dir "
                   "(or hydra.run.dir) at a directory you own"),
    errno.EPERM: ("operation not permitted", "give this user access to it, or point paths.log_dir / "
                  "paths.cache_dir (or hydra.run.dir) at a directory you own"),
}


def disk_error_message(err: BaseException) -> str | None:
    """One line for an OSError of `DISK_ERRORS` (found as `err`, its cause or context): the path, what happened
    and what to do; None for any other error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            what, todo = DISK_ERRORS[err.errno]
            path = err.filename if err.filename is not None else "(path not reported)"
            return f"{path}: {what} ({err.strerror or errno.errorcode[err.errno]}); {todo}"
        err = err.__cause__ or err.__context__
    return None


def _unwrapped(err: BaseException) -> BaseException:
    """The error under Hydra's InstantiationException ("Error in call to target ..."), when it is one of ours."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


@contextmanager
def exit_on_error(log: logging.Logger, failures: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """The entry points' exits. Bad input: its one line, exit code 2. A NaN loss (or one of the entry point's own
    `failures`, e.g. an export that does not match), a full or read-only disk: its line, exit 1. Ctrl-C /
    SIGTERM: 130 / 143. Hydra's InstantiationException around one of these is unwrapped.
    A log file that cannot be written (the run dir's disk is full) prints no traceback per record (Python's
    `logging.raiseExceptions`, meant to be off in production): the disk error is reported once, in one line,
    by the next write of a file the run needs."""
    raise_log_errors, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        yield
    except Exception as raised:  # noqa: BLE001 - sorted below; anything else is raised as it was
        err = _unwrapped(raised)
        if isinstance(err, InputError):
            log.error("%s", err)
            sys.exit(2)
        if isinstance(err, (NonFiniteLossError, *failures)):
            log.error("%s", err)
            sys.exit(1)
        if isinstance(err, Interrupted):
            log.warning("%s", err)
            sys.exit(err.exit_code)
        if message := disk_error_message(err):
            log.error("%s", message)
            sys.exit(1)
        raise
    finally:
        logging.raiseExceptions = raise_log_errors


class CheckOutputDir(Callback):
    """Hydra callback: the run dir (or a multirun's sweep dir) is created and written to once before Hydra
    does it, so that a read-only, foreign or full disk gives `disk_error_message`'s one line and exit 1
    instead of Hydra's tracebacks. A `resume=` dir that does not exist is left to CheckResumeDir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        if config.get("resume") and not run_dir.is_dir():
            return
        self._check(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def _check(directory: Path) -> None:
        with exit_on_error(logging.getLogger(__name__)):
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass


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
