"""StructLoRA diagnostics plots (paper appendix E/J) from plain dicts and arrays.

The structlora library computes the numbers (cosines of vec(dW) of adjacent layers, drift
energy, gate values, kept ranks); this module only draws them, so it needs no model and never
imports the method. Figures are drawn on matplotlib's Agg canvas directly (no display on
servers and in CI), without pyplot: no global backend switch and no global figure registry,
so plotting is safe from the demo's worker threads and cannot leak figures in a loop. Files
are saved with the temp-then-rename rule.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data.files import write_bytes_atomic


def new_figure(size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A figure and axes on an Agg canvas."""
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save_figure(fig: Any, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically (temp file and rename)."""
    path = Path(path)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _ragged_matrix(rows: Mapping[str, Sequence[float]]) -> np.ndarray:
    width = max((len(v) for v in rows.values()), default=0)
    matrix = np.full((len(rows), width), np.nan)
    for i, values in enumerate(rows.values()):
        matrix[i, : len(values)] = np.asarray(values, dtype=float)
    return matrix


def plot_adjacent_cosine(cosines: Mapping[str, Sequence[float]] | np.ndarray, path: Path,
                         title: str = "Adjacent-layer cosine of vec(dW)") -> Path:
    """Heatmap of CosAdj: one row per chain (e.g. 'vision.q_proj'), column l = cos(dW_l, dW_l+1).

    A 2-D array is drawn as it is (e.g. a full layer x layer cosine matrix). Chains of
    different depth are padded with blanks. Colour range is fixed to [-1, 1] so runs compare.
    """
    if isinstance(cosines, Mapping):
        matrix, labels = _ragged_matrix(cosines), list(cosines)
        xlabel = "layer pair (l, l+1)"
    else:
        matrix = np.atleast_2d(np.asarray(cosines, dtype=float))
        labels, xlabel = [str(i) for i in range(matrix.shape[0])], "layer"
    if matrix.size == 0:
        raise ValueError("no cosines to plot")
    height = max(2.5, 0.45 * matrix.shape[0] + 1.5)
    width = max(5.0, 0.45 * matrix.shape[1] + 3.0)
    fig, ax = new_figure((width, height))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if matrix.shape[0] * matrix.shape[1] <= 200:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="cosine")
    return save_figure(fig, path)


_ENERGY_LABEL = "E = sum over depth edges ||u_l - u_j||^2"


def plot_drift_energy(energy: Mapping[str, float] | Mapping[str, Sequence[float]], path: Path,
                      steps: Sequence[int] | None = None, title: str = "Drift energy") -> Path:
    """Drift energy E = sum over depth edges ||u_l - u_j||^2.

    A dict of numbers (e.g. per tower or per run) is drawn as bars; a dict of sequences as
    curves over training steps (`steps`, default 0..n-1).
    """
    if not energy:
        raise ValueError("no drift energy values to plot")
    fig, ax = new_figure((6.0, 4.0))
    values = list(energy.values())
    if all(np.isscalar(v) for v in values):
        names = list(energy)
        ax.bar(range(len(names)), [float(v) for v in values], color="tab:purple")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(_ENERGY_LABEL)
    else:
        for name, series in energy.items():
            y = np.asarray(series, dtype=float)
            x = np.asarray(steps if steps is not None else range(len(y)))[: len(y)]
            ax.plot(x, y, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(_ENERGY_LABEL)
        ax.legend()
        ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_kept_rank(kept: Mapping[str, int], path: Path, max_rank: int | None = None,
                   title: str = "Kept rank per module") -> Path:
    """Bar chart of directions kept after gate pruning, one bar per adapted module, with r as a line."""
    if not kept:
        raise ValueError("no kept ranks to plot")
    names = list(kept)
    fig, ax = new_figure((max(6.0, 0.25 * len(names) + 2.0), 4.5))
    ax.bar(range(len(names)), [int(v) for v in kept.values()], color="tab:blue")
    if max_rank is not None:
        ax.axhline(max_rank, color="gray", linestyle="--", linewidth=1, label=f"r = {max_rank}")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("kept directions")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_gate_histogram(gates: Mapping[str, Sequence[float]] | Sequence[float] | np.ndarray, path: Path,
                        threshold: float | None = 0.05, bins: int = 20,
                        title: str = "Gate values sigmoid(phi)") -> Path:
    """Histogram of deterministic gate values in [0, 1], with the pruning threshold marked.

    A dict (e.g. per tower) is stacked by key; a flat array is one histogram.
    """
    groups = {k: np.asarray(v, dtype=float).ravel() for k, v in gates.items()} if isinstance(gates, Mapping) \
        else {"gates": np.asarray(gates, dtype=float).ravel()}
    if sum(v.size for v in groups.values()) == 0:
        raise ValueError("no gate values to plot")
    fig, ax = new_figure((6.0, 4.0))
    ax.hist(list(groups.values()), bins=np.linspace(0.0, 1.0, bins + 1), stacked=True, label=list(groups))
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", linewidth=1, label=f"prune < {threshold}")
    ax.set_xlabel("gate value")
    ax.set_ylabel("directions")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_diagnostics(diagnostics: Mapping[str, Any], out_dir: Path, max_rank: int | None = None,
                     threshold: float | None = 0.05) -> dict[str, Path]:
    """Every plot whose data is present in `diagnostics`.

    Keys read: ``adjacent_cosine``, ``drift_energy``, ``kept_rank``, ``gates`` (the structlora
    diagnostics dict). Returns {name: png path}.
    """
    out_dir = Path(out_dir)
    plots: dict[str, Path] = {}
    if diagnostics.get("adjacent_cosine") is not None:
        plots["adjacent_cosine"] = plot_adjacent_cosine(diagnostics["adjacent_cosine"], out_dir / "adjacent_cosine.png")
    if diagnostics.get("drift_energy") is not None:
        energy = diagnostics["drift_energy"]
        energy = {"drift energy": energy} if np.isscalar(energy) else energy
        plots["drift_energy"] = plot_drift_energy(energy, out_dir / "drift_energy.png")
    if diagnostics.get("kept_rank"):
        plots["kept_rank"] = plot_kept_rank(diagnostics["kept_rank"], out_dir / "kept_rank.png", max_rank)
    if diagnostics.get("gates") is not None:
        plots["gates"] = plot_gate_histogram(diagnostics["gates"], out_dir / "gate_histogram.png", threshold)
    return plots
