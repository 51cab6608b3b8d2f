"""Errors that are the user's to fix: the CLI prints them on one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a config key, a file, a path) with a message that says what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the file and the dotted key."""
