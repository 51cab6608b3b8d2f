"""Where a model comes from: a local directory or a hub id (failing fast when offline), dtypes, parameter counts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from data.loading import LOADING  # noqa: F401 - re-exported: the door and the stages take it from here
from pipeline.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True


def resolve_pretrained(name_or_path: str, revision: str | None = None, probe_timeout: float = 5.0) -> str:
    """Return a local directory or a hub id that from_pretrained can load without minutes of retries.

    A local directory is used as is. A hub id is accepted if it is in the local cache, or if
    the hub answers a metadata request within `probe_timeout` seconds; otherwise this raises
    a one-line UserError that says to pass a local directory.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise UserError(f"model directory not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    try:  # already downloaded?
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    advice = f"pass a local directory instead (model.name_or_path=/path/to/{name_or_path.split('/')[-1]})"
    if _hub_offline():
        raise UserError(f"cannot load '{name_or_path}': it is not a local directory and the hub is offline "
                        f"(HF_HUB_OFFLINE is set); {advice}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name_or_path, revision=revision, timeout=probe_timeout)
    except Exception as err:  # noqa: BLE001 - connection, DNS, 401, 404: all mean "cannot load from the hub"
        reason = type(err).__name__
        raise UserError(f"cannot load '{name_or_path}': it is not a local directory and the Hugging Face Hub "
                        f"cannot be reached ({reason}); {advice}") from None
    return name_or_path


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
