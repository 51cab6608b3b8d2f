"""Where a served model comes from: its directory, its base model, its run and what the run wrote.

A merged model directory may carry a small ``structlora_run.json`` (written by the merge
stage) that links it to the rest of its run::

    {"base_model": "/abs/path/to/base/model" | "hub/id" | null,
     "run_dir": "/abs/path/to/RUN" | null,
     "method": "structlora"}            # optional, shown in the header

Relative paths are read relative to the model directory. With it the demo shows the run's
metrics table and plots (``RUN/eval/metrics.json``, ``RUN/eval/*.png``) and a side-by-side
base vs adapted comparison. A registry entry can give the same fields (``base_model``,
``run_dir``); the file in the model directory wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import DemoError
from eval.report import flatten_scores

RUN_INFO_NAME = "structlora_run.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_EXAMPLES = 6
# Example images, first match wins: shipped with the model, with the run, or the run's test split.
EXAMPLE_FOLDERS_IN_MODEL = ("examples",)
EXAMPLE_FOLDERS_IN_RUN = ("examples", "prepare/world/images/test")


def _resolve(value: Any, relative_to: Path) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (relative_to / path)


@dataclass(frozen=True)
class ModelSource:
    """A merged model to serve and what is known about it.

    Args:
        name: shown in the header and the registry dropdown.
        model_dir: a transformers model directory (config.json, safetensors, processor files).
        base_model: the model it was adapted from (local directory or hub id), if recorded.
        run_dir: the pipeline run that produced it, if recorded.
        info: extra fields (``method``, ``task``, registry ``metrics``) for display only.
    """

    name: str
    model_dir: Path
    base_model: str | None = None
    run_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_dir(cls, model_dir: Path, name: str | None = None,
                       defaults: Mapping[str, Any] | None = None) -> ModelSource:
        """Read ``structlora_run.json`` if present; `defaults` (a registry entry) fills the gaps."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise DemoError(f"{model_dir}: not a transformers model directory (no config.json); "
                                    "give the merged model folder, e.g. RUN/merge/model")
        run_info: dict[str, Any] = {}
        info_file = model_dir / RUN_INFO_NAME
        if info_file.is_file():
            try:
                run_info = json.loads(info_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DemoError(f"{info_file}: not valid JSON ({err})") from err
            if not isinstance(run_info, dict):
                raise DemoError(f"{info_file}: expected a JSON object with 'base_model' and 'run_dir'")
        merged = {**dict(defaults or {}), **{k: v for k, v in run_info.items() if v is not None}}
        base = merged.get("base_model")
        base_path = _resolve(base, model_dir)
        base_model = str(base_path.resolve()) if base_path is not None and base_path.exists() else base
        run_dir = _resolve(merged.get("run_dir"), model_dir)
        default_name = run_dir.resolve().name if run_dir is not None else model_dir.resolve().name
        return cls(name=name or merged.get("name") or default_name, model_dir=model_dir,
                   base_model=base_model if isinstance(base_model, str) and base_model else None,
                   run_dir=run_dir,
                   info={k: merged[k] for k in ("method", "task", "created", "metrics") if k in merged})

    @classmethod
    def from_registry_entry(cls, entry: Mapping[str, Any], registry: Path) -> ModelSource:
        path = _resolve(entry["path"], Path(registry))
        assert path is not None
        defaults = dict(entry)
        if isinstance(entry.get("run_dir"), str):
            defaults["run_dir"] = str(_resolve(entry["run_dir"], Path(registry)))
        return cls.from_model_dir(path, name=entry["name"], defaults=defaults)

    def _example_folder(self) -> Path | None:
        """The first example folder (the model's, then the run's) that holds images."""
        folders = [self.model_dir / f for f in EXAMPLE_FOLDERS_IN_MODEL]
        if self.run_dir is not None:
            folders += [self.run_dir / f for f in EXAMPLE_FOLDERS_IN_RUN]
        for folder in folders:
            if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir()):
                return folder
        return None

    def example_images(self, limit: int = MAX_EXAMPLES) -> list[Path]:
        """Up to `limit` example images shipped with the model or the run (sorted by name)."""
        folder = self._example_folder()
        if folder is None:
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]

    def example_prompts(self) -> dict[str, str]:
        """{example image file name: its prompt} from `prompts.json` beside the example images (the publish
        stage writes it from the test split of your own conversations); {} when there is none."""
        folder = self._example_folder()
        path = folder / "prompts.json" if folder is not None else None
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def plots(self) -> list[Path]:
        """The run's evaluation plots (long-context CIDEr, adjacent-layer cosine, ...)."""
        if self.run_dir is None or not (self.run_dir / "eval").is_dir():
            return []
        return sorted((self.run_dir / "eval").glob("*.png"))

    def metrics(self) -> dict[str, Any] | None:
        """``RUN/eval/metrics.json`` as a dict, or None when there is none (or it is unreadable)."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "eval" / "metrics.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def model_card(self) -> str:
        """The model directory's README.md without its YAML front matter ('' when absent)."""
        path = self.model_dir / "README.md"
        if not path.is_file():
            return ""
        text = path.read_text(encoding="utf-8")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            text = text[end + 4:] if end >= 0 else text
        return text.strip()


def metrics_rows(metrics: Mapping[str, Any] | None) -> list[list[Any]]:
    """Rows [score, base, adapted, adapted - base] for the metrics table.

    Scores are flattened as in the run's report (``eval.report.flatten_scores``: per-item
    tables and counts left out). Accepts the run's metrics.json (``metrics`` = adapted scores, ``base``) and the
    ``{"adapted": {...}, "base": {...}}`` headline layout of a registry entry.
    """
    if not metrics:
        return []
    adapted_block = metrics.get("metrics", metrics.get("adapted")) or {}
    adapted = flatten_scores(adapted_block)
    base = flatten_scores(metrics.get("base") or {})
    rows = []
    for key in sorted(set(adapted) | set(base)):
        a, b = adapted.get(key), base.get(key)
        delta = round(a - b, 4) if a is not None and b is not None else None
        rows.append([key, None if b is None else round(b, 4), None if a is None else round(a, 4), delta])
    return rows
