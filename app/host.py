"""The models the demo holds in memory: one served (adapted) model, and its base on demand.

With a registry the user picks a model by name; the host then frees the previous model before
loading the next, so only one adapted model (plus, once asked for, its base) is in memory.
All sessions share the host: switching models switches them for everyone, which is what a
local single-user demo wants and keeps memory bounded.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from app.errors import DemoError, InputError
from app.inference import LoadedModel
from app.sources import ModelSource

Loader = Callable[[str | Path], LoadedModel]


class ModelHost:
    """Owns the loaded models and the choice between registry entries.

    Args:
        sources: the models that can be served (one for ``demo MODEL_DIR``, the registry otherwise).
        loader: builds a `LoadedModel` from a directory or hub id (tests may pass their own).
        initial: name of the model loaded first (default: the first source).
    """

    def __init__(self, sources: Sequence[ModelSource], loader: Loader = LoadedModel,
                 initial: str | None = None) -> None:
        if not sources:
            raise DemoError("no models to serve: the registry is empty (run the publish stage first)")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DemoError(f"model names must be unique, got {names}")
        self.sources = {s.name: s for s in sources}
        self._loader = loader
        self._lock = threading.RLock()
        self._source: ModelSource | None = None
        self._adapted: LoadedModel | None = None
        self._base: LoadedModel | None = None
        self._base_error: str | None = None
        self.select(initial or names[0])

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    @property
    def source(self) -> ModelSource:
        assert self._source is not None
        return self._source

    @property
    def lock(self) -> threading.RLock:
        """Held while generating and while switching, so a switch never pulls a model from under a request."""
        return self._lock

    def select(self, name: str) -> ModelSource:
        """Serve the model called `name` (a no-op when it is already served)."""
        if name not in self.sources:
            raise InputError(f"No model named {name!r}; choose one of: {', '.join(self.sources)}.")
        with self._lock:
            if self._source is not None and self._source.name == name:
                return self._source
            self._adapted = self._base = None
            self._base_error = None
            self._free_memory()
            source = self.sources[name]
            self._adapted = self._loader(source.model_dir)
            self._source = source
            return source

    def adapted(self) -> LoadedModel:
        with self._lock:
            assert self._adapted is not None
            return self._adapted

    def has_base(self) -> bool:
        return self.source.base_model is not None

    def base(self) -> LoadedModel:
        """The served model's base, loaded on first use and kept.

        Raises:
            InputError: no base model is recorded, or it failed to load (the reason is kept,
                so a broken base is not retried on every request).
        """
        with self._lock:
            if self._base is not None:
                return self._base
            if self.source.base_model is None:
                raise InputError("No base model is recorded for this model (structlora_run.json 'base_model').")
            if self._base_error is None:
                try:
                    self._base = self._loader(self.source.base_model)
                    return self._base
                except Exception as err:  # noqa: BLE001 - any loading failure becomes a message
                    self._base_error = f"The base model {self.source.base_model!r} could not be loaded: {err}"
            raise InputError(self._base_error)

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
