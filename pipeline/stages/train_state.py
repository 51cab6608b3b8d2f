"""The training state of `TrainRecipe` (pipeline.stages.recipe) across ranks: checkpoints and resume.

What a checkpoint holds (checkpoint.py writes the directory atomically): the trainable tensors, the
optimizer (or, under DeepSpeed, every rank's partition through accelerate's save_state), scheduler,
grad scaler, step, data position, every rank's RNG state, the validation curve and StructLoRA's own
training state. Also the trainable tensors gathered whole from sharded ranks, and their checksums.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pipeline.stages import checkpoint as ckpt

log = logging.getLogger("structlora.train")

ACCELERATE_STATE = "accelerate_state"


class TrainStateMixin:
    """Saving, resuming and gathering the state of a TrainRecipe. Relies on the recipe's attributes: `adapted`,
    `cfg`, `accelerator`, `model`, `optimizer`, `scheduler`, `sharding`, `ckpt_root`, `state_by_every_rank`,
    `step`, `batches_seen`, `val_losses`; resuming sets the last four (and `_pending_rng`)."""

    def _maybe_resume(self) -> int | None:
        if self.cfg.resume != "auto":
            return None
        path = ckpt.latest_valid(self.ckpt_root)
        if path is None:
            return None
        from safetensors.torch import load_file

        self.adapted.load_trainable_state_dict(load_file(str(path / "trainable.safetensors")))
        extra = path / "method_state"
        if self.adapted.method == "structlora" and extra.is_dir():
            self.adapted.handle.load_training_state(extra, load_parameters=False)
        state = torch.load(path / "training_state.pt", weights_only=False)
        if (path / ACCELERATE_STATE).is_dir():
            self.accelerator.load_state(str(path / ACCELERATE_STATE))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.val_losses = [tuple(v) for v in state.get("val_losses", [])]
        self._pending_rng = state["rng"][self.accelerator.process_index] if isinstance(state["rng"], list) else state["rng"]
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        rng = [ckpt.capture_rng_state()]
        if acc.num_processes > 1:
            rng = acc.gather_for_metrics(rng, use_gather_object=True)
        trainable = self._gathered_trainable_state()
        shared = None
        if self.state_by_every_rank:  # every rank writes its partition of the optimizer state first
            shared = self.ckpt_root / f".shared-{ckpt.step_dir(self.ckpt_root, self.step).name}"
            # DeepSpeed saves the whole module too unless told to skip the frozen base
            extra = {"exclude_frozen_parameters": True} if self.sharding.kind == "deepspeed" else {}
            acc.save_state(str(shared), **extra)
        acc.wait_for_everyone()
        if acc.is_main_process:
            from safetensors.torch import save_file

            def write(tmp: Path) -> None:
                state = {k: v.contiguous().cpu() for k, v in trainable.items()}
                save_file(state, str(tmp / "trainable.safetensors"))
                torch.save({"optimizer": None if shared else self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(),
                            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                            "step": self.step, "batches_seen": self.batches_seen, "rng": rng,
                            "val_losses": self.val_losses}, tmp / "training_state.pt")
                if shared is not None:
                    os.replace(shared, tmp / ACCELERATE_STATE)
                if self.adapted.method == "structlora":
                    self.adapted.handle.save_training_state(tmp / "method_state")

            ckpt.write_checkpoint(self.ckpt_root, self.step, write, self.cfg.keep_last,
                                  meta={"writer_rank": acc.process_index, "world_size": acc.num_processes})
        acc.wait_for_everyone()

    def _gathered_trainable_state(self) -> dict[str, torch.Tensor]:
        """The full trainable tensors. Under ZeRO-3 / accelerate's FSDP each rank holds a shard, so every
        rank takes part in `get_state_dict` (a collective) and the main process gets whole tensors:
        without this gather, ZeRO-3 checkpoints hold empty adapters. Under our own FSDP wrapping the
        trainable tensors are replicated and whole on every rank."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if self.sharding.own_wrapping or acc.distributed_type not in (DistributedType.DEEPSPEED,
                                                                       DistributedType.FSDP):
            return self.adapted.trainable_state_dict()
        names = [n for n, p in self.adapted.model.named_parameters() if p.requires_grad]
        full = acc.get_state_dict(self.model)
        if not acc.is_main_process:
            return {}
        state = {n: full[n] for n in names if n in full}
        empty = [n for n, v in state.items() if v.numel() == 0]
        if len(state) != len(names) or empty:
            raise RuntimeError(f"gathered state is incomplete ({len(state)}/{len(names)} tensors, "
                               f"{len(empty)} empty): enable zero3_save_16bit_model / FULL_STATE_DICT")
        return state

    def rank_checksums(self) -> list[str]:
        """A sha256 of this process's trainable tensors, gathered from every rank (DDP must keep them equal)."""
        import hashlib

        digest = hashlib.sha256()
        for name, value in sorted(self.adapted.trainable_state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().float().numpy().tobytes())
        mine = digest.hexdigest()
        if self.accelerator.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return list(gather_object([mine]))
