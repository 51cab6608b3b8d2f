"""What a stage function receives: the run's config and its directory.

A module of its own so that stages import it without importing the runner; the runner is
the only module that knows every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import RunConfig


@dataclass
class StageContext:
    """The config and run directory of the run a stage belongs to."""

    cfg: RunConfig
    run_dir: Path

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path
