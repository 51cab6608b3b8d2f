"""How a run is spread over processes: DDP, FSDP2 (`fully_shard`) or DeepSpeed, checked at start-up.

StructLoRA reads every adapted module's factors and gates at the start of each forward pass
(the plan: gate masks and coordinator messages for all modules at once). Under FSDP or
ZeRO-3 a parameter is whole only inside its own module's forward, so the adapter must not
be sharded. The frozen base is what is worth sharding (7B parameters against ~20M adapter
values), so:

- FSDP2: we call `fully_shard` ourselves, the way accelerate does (one unit per transformer
  layer class, the input embedding, the tail [final norm, lm_head], then the root), with every
  trainable tensor in `ignored_params`: the adapter, gates and coordinator stay whole,
  replicated plain tensors, and `sync_replicated_gradients` averages their gradients over
  ranks as DDP would. accelerate's own `prepare` leaves a model that is already an
  `FSDPModule` as it is, so one code path serves `accelerate launch --config_file
  configs/accelerate/fsdp.yaml` on GPUs and `train.sharding=fsdp` under torchrun on CPU
  (where accelerate itself downgrades FSDP to plain multi-CPU DDP, which we report).
- DeepSpeed ZeRO-3: parameters below `stage3_param_persistence_threshold` are never
  partitioned; a run starts only if every adapter tensor is below it.
- Anything else that cannot work stops here, before the first step, with one line.

The stage's `Accelerator` (precision, gradient accumulation) is built here too: `make_accelerator`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.errors import UserError

log = logging.getLogger("structlora.sharding")

DEFAULT_LAYER_CLASSES = ("LlamaDecoderLayer", "CLIPEncoderLayer", "ViTLayer", "Block")


@dataclass
class ShardingPlan:
    """What the recipe does with the model.

    Attributes:
        kind: "none" (one process), "ddp", "fsdp" (our fully_shard, adapter replicated) or "deepspeed".
        replicated: trainable tensors whose gradients we average over ranks ourselves (fsdp).
        notes: what was decided and why, for the log.
    """

    kind: str
    replicated: list[nn.Parameter] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def own_wrapping(self) -> bool:
        return self.kind == "fsdp"


def _launcher_asked_for_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


QUANTIZED_SHARDING = ("{kind} with model.quantization: it would shard bitsandbytes' packed 4-bit / 8-bit weights, "
                      "which lose their quantization state when flattened (QLoRA under FSDP needs "
                      "bnb_4bit_quant_storage and is not built here); train the quantized base with DDP (a whole "
                      "4-bit copy per GPU, QLoRA's point) or shard an unquantized base")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def preflight(precision: str, sharding: str, method: str, quantization: str = "none") -> None:
    """What can be refused before any stage runs (the rest is checked when the train stage sets up)."""
    if sharding == "fsdp" and quantization != "none":
        raise UserError("train.sharding=" + QUANTIZED_SHARDING.format(kind="fsdp"))
    if quantization != "none":  # the launcher's choice, as `accelerate launch` passes it (checked again at setup)
        if _env_true("ACCELERATE_USE_FSDP") and torch.cuda.is_available():  # on CPU it falls back to DDP
            raise UserError("FSDP " + QUANTIZED_SHARDING.format(kind="(ACCELERATE_USE_FSDP, from the accelerate "
                                                                       "config or --use_fsdp)"))
        if _env_true("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            raise UserError("DeepSpeed ZeRO-3 " + QUANTIZED_SHARDING.format(kind="(partitioning parameters)")
                            .replace("or shard an unquantized base", "ZeRO-2, or shard an unquantized base"))
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a GPU: on CPU accelerate would silently train in float32 "
                        "(no autocast, no grad scaler); use bf16 or fp32")
    if sharding == "fsdp" and method == "full":
        raise UserError("train.sharding=fsdp with adapter.method=full: full fine-tuning would keep every "
                        "weight replicated; use DeepSpeed ZeRO or accelerate's own FSDP without StructLoRA")


def plan_sharding(accelerator, sharding: str, method: str, trainable: list[nn.Parameter],
                  precision: str, quantized: bool = False) -> ShardingPlan:
    """Decide (and validate) how to distribute training; raise UserError for what cannot work (`quantized`: the
    frozen base holds bitsandbytes layers)."""
    plan = _plan_sharding(accelerator, sharding, method, trainable, precision)
    if quantized and plan.kind == "fsdp":
        raise UserError("FSDP " + QUANTIZED_SHARDING.format(kind="(the accelerate config or train.sharding)"))
    if quantized and plan.kind == "deepspeed":
        stage = int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
        if stage == 3:
            raise UserError("DeepSpeed ZeRO-3 " + QUANTIZED_SHARDING.format(kind="(partitioning parameters)")
                            .replace("or shard an unquantized base", "ZeRO-2, or shard an unquantized base"))
    return plan


def _plan_sharding(accelerator, sharding: str, method: str, trainable: list[nn.Parameter],
                   precision: str) -> ShardingPlan:
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    world = accelerator.num_processes
    notes: list[str] = []
    if precision == "fp16" and accelerator.device.type == "cpu":
        preflight(precision, sharding, method)
    if _launcher_asked_for_fsdp() and dtype != DistributedType.FSDP:
        notes.append(f"the accelerate config asks for FSDP but accelerate runs {dtype.value} here "
                     f"(FSDP needs GPUs); set train.sharding=fsdp to shard with fully_shard on CPU")
    if dtype == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise UserError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                            "(StructLoRA keeps its adapter replicated through fully_shard's ignored_params)")
        sharding = "fsdp"
    if dtype == DistributedType.DEEPSPEED:
        if sharding == "fsdp":
            raise UserError("train.sharding=fsdp under a DeepSpeed accelerate config: choose one")
        _check_deepspeed(accelerator, trainable, method)
        return ShardingPlan("deepspeed", notes=notes)
    if sharding == "fsdp":
        if world < 2:
            notes.append("train.sharding=fsdp with one process: nothing to shard, training unsharded")
            return ShardingPlan("none", notes=notes)
        preflight("fp32", sharding, method)
        return ShardingPlan("fsdp", replicated=list(trainable), notes=notes)
    return ShardingPlan("ddp" if world > 1 else "none", notes=notes)


def _check_deepspeed(accelerator, trainable: list[nn.Parameter], method: str) -> None:
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    steps = config.get("gradient_accumulation_steps")
    wanted = accelerator.gradient_accumulation_steps
    if isinstance(steps, int) and steps != wanted:
        raise UserError(f"DeepSpeed config has gradient_accumulation_steps={steps} but train.grad_accum={wanted}: "
                        "remove it from the DeepSpeed config (accelerate then takes train.grad_accum) or set them equal")
    if stage == 3 and method == "structlora":
        threshold = config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000)
        largest = max((p.numel() for p in trainable), default=0)
        if not isinstance(threshold, int) or largest >= threshold:
            raise UserError(f"ZeRO-3 would partition adapter tensors of {largest} elements "
                            f"(stage3_param_persistence_threshold={threshold}): StructLoRA reads every module's "
                            f"factors each step; set the threshold above {largest}, or use ZeRO-2 or FSDP")


def configure_deepspeed(accelerator, micro_batch_size: int) -> None:
    """Fill the DeepSpeed config fields accelerate would read off a prepared DataLoader: the recipe
    streams its own batches, so without this `accelerator.prepare` refuses to start."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size


def layer_classes(model: nn.Module, accelerator, configured: list[str]) -> set[type]:
    """The module classes that become FSDP units: the accelerate plugin's, the config's, or defaults."""
    names: list[str] = list(configured)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    wrap = getattr(plugin, "transformer_cls_names_to_wrap", None) if plugin is not None else None
    if not names and wrap:
        names = list(wrap)
    if not names:
        names = list(getattr(model, "_no_split_modules", None) or []) + list(DEFAULT_LAYER_CLASSES)
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise UserError(f"FSDP: no module of the classes {sorted(names)} in {type(model).__name__}: "
                        "set train.fsdp_layer_classes")
    return found


def apply_fsdp2(model: nn.Module, accelerator, replicated: list[nn.Parameter], configured_classes: list[str],
                precision: str) -> nn.Module:
    """Shard the frozen base with `fully_shard` as accelerate's FSDP2 does; `replicated` stay whole."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    reshard = getattr(plugin, "reshard_after_forward", True) if plugin is not None else True
    if precision in ("bf16", "fp16"):
        low = torch.bfloat16 if precision == "bf16" else torch.float16
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    mesh = None
    if accelerator.device.type == "cpu":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    kwargs = {"reshard_after_forward": reshard, "mp_policy": mp, "ignored_params": set(replicated), "mesh": mesh}
    classes = tuple(layer_classes(model, accelerator, configured_classes))
    units = 0
    for module in reversed(list(model.modules())):  # bottom-up, as accelerate does
        if module is not model and isinstance(module, classes) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
            units += 1
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if embed is not None and not isinstance(embed, FSDPModule):
        fully_shard(embed, **kwargs)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None and head is not embed and not isinstance(head, FSDPModule):
        fully_shard(head, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **kwargs)
    log.info("FSDP2: %d layer units (%s) + embeddings + root; %d trainable tensors replicated",
             units, ", ".join(sorted(c.__name__ for c in classes)), len(replicated))
    return model


def sync_replicated_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of replicated tensors over ranks (what DDP does), in one flat bucket."""
    if world_size < 2 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp32."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def make_accelerator(precision: str, grad_accum: int, find_unused_parameters: bool = False):
    """An Accelerator for one stage. accelerate keeps one global state per process: a stage that
    needs another precision than the previous one (the tiny base stage trains in fp32, the train
    stage may run bf16) resets it; the process group (PartialState) is kept. `find_unused_parameters`
    goes to DDP (parameters a rank's batch does not reach, e.g. vision adapters on text-only rows)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = {"fp32": "no"}.get(precision, precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum,
                       cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
