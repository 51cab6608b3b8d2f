"""Errors raised by the evaluation package.

They say which file and which field (or record index / id) is wrong, so that a user can fix
a predictions or annotations file without reading a traceback.
"""

from __future__ import annotations


class EvalInputError(ValueError):
    """An input file or record is malformed: the message names the file and the field, index or id."""


class JavaNotFoundError(RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR run Java; no `java` executable was found on PATH."""
