"""Errors caused by the user's input. The entry points print their one-line message, without a traceback."""


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
