"""Errors raised by the data package.

`DataError` is a `ValueError` whose message names the file (and the field or record index)
at fault. data/ must not import pipeline/, so the CLI maps this class to a clean message.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data: the message names the file and the field or record."""


class OverlongBatchError(ValueError):
    """Every sample of a batch is longer than max_length with its image and first answer."""
