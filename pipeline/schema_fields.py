"""The field helper of the config dataclasses (pipeline.schema, pipeline.schema_data, pipeline.schema_model):
a default (or a default factory) and the `help` metadata that documents the field."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any = None, help: str = "", factory: Any = None) -> Any:  # noqa: A002 - mirrors PEFT's metadata
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})
