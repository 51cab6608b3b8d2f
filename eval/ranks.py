"""Work split over ranks: one rank does a thing and every rank learns whether it failed; wall-time records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def on_main(accelerator, fn: Callable[[], Any], what: str = "evaluation") -> Any:
    """`fn()` on the main process (None elsewhere); if it fails there, every rank raises, so that none
    waits at a barrier forever. `accelerator`: anything with ``is_main_process`` and ``num_processes``
    (an Accelerator, a PartialState); `what` names the work in the other ranks' error."""
    error: list[str | None] = [None]
    result: Any = None
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except BaseException as err:  # re-raised below, on every rank
            failure, error = err, [f"{type(err).__name__}: {err}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error)
    if failure is not None:
        raise failure
    if error[0]:
        raise RuntimeError(f"{what} failed on the main process: {error[0]}")
    return result


def timing_record(samples: int, seconds: float) -> dict[str, float]:
    return {"samples": samples, "seconds": round(seconds, 3),
            "samples_per_second": round(samples / seconds, 4) if seconds > 0 else 0.0}
