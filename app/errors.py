"""Errors of the demo package; their messages are written for the person who reads them.

app/ must not import pipeline/, so the CLI maps `DemoError` to a one-line message (like
`data.errors.DataError`). `InputError` is one request refused; the server goes on serving.
"""

from __future__ import annotations


class DemoError(ValueError):
    """The demo cannot start: a missing model directory, a malformed registry or run file."""


class InputError(ValueError):
    """A request the demo refuses (not an image, too large, empty question, prompt too long)."""
