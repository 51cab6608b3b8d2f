"""The adapted linear layer and the one pure function that defines its update.

`update_factors` turns a module's factors (A, B, gate mask, coordinator message M) into one
low-rank pair (A', B') with dW = scale * B' A'. The forward pass, merge, unmerge and the PEFT
export all call it, so they cannot drift apart:

    A' = [A_1 ; ... ; A_k ; P_in^T]                   (sum of kept ranks + p) x in
    B' = [s B_1 diag(m_1) | ... | s B_k diag(m_k) | P_out M]   out x (sum of kept ranks + p)

where 1..k are the adapted row slices (one for a plain linear; e.g. q and v of timm's fused
qkv, zero-padded to the full output) and the last block is the coordinator's branch
y += P_out (M (P_in^T x)), present only while the coordinator is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from structlora.config import GateConfig
from structlora.gate import RankGate

DEFAULT_SLICE = "default"


@dataclass
class SliceUpdate:
    """The factors of one adapted row slice of a linear layer.

    Attributes:
        A: r x in.  B: rows x r.  scale: alpha / r.
        rows: (start, stop) of the slice in the output, None for all rows.
        mask: gate values m (r,), None when gates are off.
        keep: boolean (r,) of directions to keep (export drops the others), None keeps all.
        p_out: rows x p projection of the output space, with `delta` (p x p, the coordinator's M).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None
    mask: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    p_out: torch.Tensor | None = None
    delta: torch.Tensor | None = None


def _pad_rows(block: torch.Tensor, rows: tuple[int, int] | None, out_features: int) -> torch.Tensor:
    if rows is None or (rows[0] == 0 and rows[1] == out_features):
        return block
    return F.pad(block, (0, 0, rows[0], out_features - rows[1]))


def update_factors(slices: list[SliceUpdate], out_features: int,
                   p_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', scale) with dW = scale * B' A' for a layer's adapted slices (see the module docstring).

    A single full-width slice with no gate, no pruning and no coordinator returns (A, B, s)
    untouched, so that the plain-LoRA path computes exactly what PEFT's LoRA computes.
    """
    plain = (len(slices) == 1 and slices[0].mask is None and slices[0].keep is None and slices[0].delta is None
             and slices[0].rows in (None, (0, out_features)))
    if plain:
        return slices[0].A, slices[0].B, slices[0].scale
    a_blocks, b_blocks = [], []
    for s in slices:
        column_scale = s.scale if s.mask is None else s.mask * s.scale
        A, B = s.A, s.B * column_scale
        if s.keep is not None:
            A, B = A[s.keep], B[:, s.keep]
        a_blocks.append(A)
        b_blocks.append(_pad_rows(B, s.rows, out_features))
    coordinated = [s for s in slices if s.delta is not None]
    if coordinated:
        if p_in is None:
            raise ValueError("a coordinator message needs the input projection p_in")
        a_blocks.append(p_in.T.to(a_blocks[0].dtype))
        branch = [_pad_rows(s.p_out @ s.delta, s.rows, out_features) for s in coordinated]
        b_blocks.append(branch[0] if len(branch) == 1 else torch.stack(branch).sum(0))
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 1), 1.0


def factor_sketch(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """H = P_out^T dW P_in = s (P_out^T B) diag(m) (A P_in), p x p, in O(r (in + out) p)."""
    left = p_out.T @ B
    if mask is not None:
        left = left * mask
    return scale * (left @ (A @ p_in))


def _hidden(obj: nn.Module, name: str, value) -> None:
    """Set an attribute without registering a submodule (shared objects owned elsewhere)."""
    object.__setattr__(obj, name, value)


class StructLoRALinear(nn.Module):
    """A frozen nn.Linear plus gated low-rank updates on one or more of its row slices.

    Adapter tensors (all trainable): `lora_A[slice]` (r x in, Kaiming-uniform),
    `lora_B[slice]` (rows x r, zero so that the layer starts as its base), and
    `gates[slice].logits` (r). The coordinator's message M and the projections P are
    owned by the StructLoRAModel and handed to the layer for each forward pass.

    Args:
        base_layer: the frozen linear layer (out x in).
        rank, alpha: r and s = alpha / r.
        dropout: dropout on the adapter input.
        gate: gate config, or None for plain LoRA directions.
        fused: names of equal row chunks of the output (e.g. [q, k, v]); empty for a plain linear.
        slices: which chunks to adapt (e.g. [q, v]).
    """

    adapter_tensor_names = ("lora_A", "lora_B", "gates")

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 gate: GateConfig | None = None, fused: list[str] | None = None, slices: list[str] | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"StructLoRA adapts nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scale = rank, alpha / rank
        self.slice_rows = self._slice_rows(fused or [], slices or [])
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, self.in_features))
                                        for n in self.slice_rows})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.empty(self._rows(n), rank)) for n in self.slice_rows})
        self.gates = nn.ModuleDict({n: RankGate(rank, gate) for n in self.slice_rows}) if gate and gate.enabled \
            else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.capture = False  # accumulate gradient sketches in backward (refresh steps only)
        self.grad_sketch: dict[str, torch.Tensor] = {}
        _hidden(self, "_basis", None)
        _hidden(self, "_prepare", None)
        self.in_space: str | None = None
        self.out_spaces: dict[str, str] = {}
        self.plan: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
        self.reset_parameters()

    def _slice_rows(self, fused: list[str], slices: list[str]) -> dict[str, tuple[int, int] | None]:
        if not fused:
            return {DEFAULT_SLICE: None}
        if self.out_features % len(fused):
            raise ValueError(f"fused output of {self.out_features} rows does not split into {len(fused)} chunks")
        size = self.out_features // len(fused)
        return {n: (fused.index(n) * size, (fused.index(n) + 1) * size) for n in slices}

    def _rows(self, name: str) -> int:
        rows = self.slice_rows[name]
        return self.out_features if rows is None else rows[1] - rows[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in self.slice_rows:
                nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
                self.lora_B[name].zero_()
            for gate in (self.gates or {}).values():
                gate.reset_parameters()

    # --- wiring done by StructLoRAModel ------------------------------------------------------

    def attach(self, basis, prepare) -> None:
        """Give the layer the shared sketch basis and the model's plan-preparing callback.

        `in_space` and `out_spaces` (set by the model) name the projections it reads from `basis`.
        """
        _hidden(self, "_basis", basis)
        _hidden(self, "_prepare", prepare)

    @property
    def coordinated(self) -> bool:
        return self._basis is not None

    def projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) of a slice: in x p and rows x p."""
        return self._basis[self.in_space], self._basis[self.out_spaces[name]]

    # --- the update -------------------------------------------------------------------------

    def own_mask(self, name: str, training: bool | None = None) -> torch.Tensor | None:
        return None if self.gates is None else self.gates[name].mask(training)

    def sketch(self, name: str, mask: torch.Tensor | None) -> torch.Tensor:
        """H of one slice (p x p) for the coordinator."""
        p_in, p_out = self.projections(name)
        return factor_sketch(self.lora_A[name], self.lora_B[name], mask, self.scale, p_in, p_out)

    def slice_updates(self, plan: dict | None = None, drop_pruned: bool = False) -> list[SliceUpdate]:
        """The factors of every slice under `plan` ({slice: (mask, M)}), or the layer's own gates."""
        updates = []
        for name, rows in self.slice_rows.items():
            mask, delta = plan[name] if plan is not None else (self.own_mask(name), None)
            keep = self.gates[name].kept() if drop_pruned and self.gates is not None else None
            p_out = self.projections(name)[1] if delta is not None else None
            updates.append(SliceUpdate(self.lora_A[name], self.lora_B[name], self.scale, rows, mask, keep,
                                       p_out, delta))
        return updates

    def factors(self, plan: dict | None = None, drop_pruned: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
        updates = self.slice_updates(plan, drop_pruned)
        p_in = self.projections(next(iter(self.slice_rows)))[0] if any(u.delta is not None for u in updates) else None
        return update_factors(updates, self.out_features, p_in)

    def delta_weight(self, plan: dict | None = None) -> torch.Tensor:
        """dW (out x in, float32) under `plan`; what merge adds to the base weight.

        Without a plan the deterministic (eval) gates are used; a coordinated layer needs the
        model's plan, since its message M depends on every other module.
        """
        if plan is None:
            if self.coordinated:
                raise RuntimeError("a coordinated layer merges through StructLoRAModel.merge()")
            plan = {n: (self.own_mask(n, training=False), None) for n in self.slice_rows}
        A, B, scale = self.factors(plan)
        return (B.float() @ A.float()) * scale

    def _current_plan(self) -> dict | None:
        if self._prepare is not None:
            self._prepare()  # the model's ensure_plan: a no-op inside its forward pass
        return self.plan

    @property
    def per_example_gates(self) -> bool:
        """Training with `gate.sampling: example`: each example gets its own mask."""
        return self.gates is not None and self.training and \
            next(iter(self.gates.values())).cfg.sampling == "example"

    def _example_column_masks(self, batch: int, plan: dict | None) -> torch.Tensor:
        """(batch, columns of A'): per-example gate samples for every slice, ones for the coordinator branch."""
        blocks = [self.gates[name].example_masks(batch) for name in self.slice_rows]
        p = next((delta.shape[0] for _, delta in (plan or {}).values() if delta is not None), 0)
        if p:
            blocks.append(blocks[0].new_ones(batch, p))
        return torch.cat(blocks, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        plan = self._current_plan()
        columns = None
        if self.per_example_gates:  # factors without the gate, the gate applied per example on A' x
            plan = {n: (None, plan[n][1] if plan is not None else None) for n in self.slice_rows}
            columns = self._example_column_masks(x.shape[0], plan)
        A, B, scale = self.factors(plan)
        x = x.to(A.dtype)
        hidden = F.linear(self.dropout(x), A)
        if columns is not None:
            hidden = hidden * columns.to(hidden.dtype).reshape(x.shape[0], *([1] * (hidden.dim() - 2)), -1)
        update = F.linear(hidden, B.to(A.dtype))
        if scale != 1.0:
            update = update * scale
        out = result + update.to(result.dtype)
        if self.capture and out.requires_grad and self.coordinated:
            self._register_sketch_hook(out, x)
        return out

    # --- gradient sketches: G = sum over tokens (P_out^T grad_out)(P_in^T x)^T ----------------

    def _register_sketch_hook(self, out: torch.Tensor, x: torch.Tensor) -> None:
        p_in = self._basis[self.in_space]
        # the forward may run under autocast (bf16 / fp16), the backward hook does not: take the
        # sketch in float32 with autocast off, or the two products below meet in different dtypes
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_proj = x.detach().reshape(-1, self.in_features).float() @ p_in.float()

        def hook(grad: torch.Tensor) -> None:
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad = grad.detach().reshape(-1, self.out_features).float()
                for name, rows in self.slice_rows.items():
                    g = grad if rows is None else grad[:, rows[0]:rows[1]]
                    sketch = (g @ self._basis[self.out_spaces[name]].float()).T @ x_proj
                    previous = self.grad_sketch.get(name)
                    self.grad_sketch[name] = sketch if previous is None else previous + sketch

        out.register_hook(hook)

    # --- merge --------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, plan: dict | None = None) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.add_(self.delta_weight(plan).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, plan: dict | None = None) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight(plan).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        slices = ",".join(self.slice_rows)
        return f"rank={self.rank}, scale={self.scale:g}, slices=[{slices}], gated={self.gates is not None}"
