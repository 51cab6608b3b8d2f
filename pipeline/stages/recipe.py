"""The training recipe: setup -> train -> validate -> save_checkpoint -> cleanup.

One recipe for every method and every scale: accelerate runs it on one CPU process or on
N GPUs over M nodes. The loss step shows every term that is summed. A killed run resumes
from the newest complete checkpoint and ends exactly where an uninterrupted run would: the
data stream is replayed to its position and every RNG state is restored.

The optimizer and schedule are pipeline.stages.optimization; saving and resuming the recipe's state
(checkpoints, the trainable tensors gathered over ranks) is pipeline.stages.train_state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eval.token_loss import task_loss
from pipeline.errors import UserError
from pipeline.schema import TrainConfig
from pipeline.stages import checkpoint as ckpt
from pipeline.stages.methods import AdaptedModel
from pipeline.stages.optimization import make_optimizer
from pipeline.stages.train_state import TrainStateMixin

log = logging.getLogger("structlora.train")

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    val_losses: list[tuple[int, float]]
    trainable_parameters: int
    seconds: float
    resumed_from: int | None


class TrainRecipe(TrainStateMixin):
    """Trains an `AdaptedModel` on a stream of batches.

    Args:
        adapted: the backbone with its method attached.
        cfg: the train section of the run config.
        out_dir: the stage directory (checkpoints/, metrics.jsonl, tensorboard/).
        make_batches: returns a fresh, deterministic iterator of training batches for this rank;
            resuming replays it to the saved position.
        val_batches: fixed validation batches (the same every time).
        accelerator: an `accelerate.Accelerator`, or None to build one from the config.
    """

    def __init__(self, adapted: AdaptedModel, cfg: TrainConfig, out_dir: Path,
                 make_batches: Callable[[], Iterator[Batch]], val_batches: list[Batch], accelerator: Any = None):
        self.adapted, self.cfg, self.out_dir = adapted, cfg, Path(out_dir)
        self.make_batches, self.val_batches = make_batches, val_batches
        self.accelerator = accelerator
        self.step = 0
        self.batches_seen = 0
        self.val_losses: list[tuple[int, float]] = []

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from pipeline.stages.sharding import apply_fsdp2, make_accelerator, plan_sharding, resolve_precision

        cfg = self.cfg
        self.precision = resolve_precision(cfg.precision)
        if self.accelerator is None:
            self.accelerator = make_accelerator(self.precision, cfg.grad_accum, bool(cfg.find_unused_parameters))
        acc = self.accelerator
        if acc.gradient_accumulation_steps != cfg.grad_accum:
            raise UserError(f"the accelerator accumulates {acc.gradient_accumulation_steps} micro-batches but "
                            f"train.grad_accum={cfg.grad_accum}")
        model = self.adapted.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        from pipeline.models.quantize import is_quantized_linear

        self.sharding = plan_sharding(acc, cfg.sharding, self.adapted.method, trainable, self.precision,
                                      quantized=any(is_quantized_linear(m) for m in model.modules()))
        for note in self.sharding.notes:
            log.warning(note)
            if acc.is_main_process:
                print(f"note: {note}")
        set_seed(cfg.seed)
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer, self.scheduler = make_optimizer(self.adapted.param_groups(cfg), cfg)
        if self.sharding.kind == "deepspeed":
            from pipeline.stages.sharding import configure_deepspeed

            configure_deepspeed(acc, cfg.batch_size)
        if self.sharding.own_wrapping:
            # the frozen base is sharded here; accelerate sees an FSDPModule and leaves it as it is
            model.to(acc.device)
            self.model = apply_fsdp2(model, acc, self.sharding.replicated, cfg.fsdp_layer_classes, self.precision)
            self.optimizer = acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
        # DeepSpeed partitions the optimizer state over ranks: every rank writes its part (accelerate's
        # save_state); elsewhere the trainable tensors are whole on rank 0 and it writes the state alone
        self.state_by_every_rank = self.sharding.kind == "deepspeed"
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resumed_from = self._maybe_resume()
        self.batches = self.make_batches()
        for _ in range(self.batches_seen):  # replay the stream to where the checkpoint left it
            next(self.batches)
        if self.resumed_from is not None:
            ckpt.restore_rng_state(self._pending_rng)  # after the replay, which may draw random numbers
        self._writer = None
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    # --- the loss step: every term in plain sight --------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def loss_step(self, batch: Batch, num_items: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Task loss and every regulariser, by name; `loss` is their sum.

        With `num_items` (label tokens of the whole optimizer step, over micro-batches and ranks),
        the task term is this micro-batch's summed token loss / num_items: the losses of one step
        add up to the mean over the global batch however it is split, as in one process.
        """
        with self.accelerator.autocast():
            terms = {"task": self._batch_loss(self._to_device(batch), num_items)}
        terms.update(self.adapted.regularization())
        terms["loss"] = sum(terms.values())
        return terms

    def _batch_loss(self, inputs: Batch, num_items: torch.Tensor | None = None) -> torch.Tensor:
        """The task loss of one batch: a causal LM's from its labelled positions only (eval.token_loss; over
        `num_items` when given, else the batch's mean), per-example labels (classification) as the model gives it."""
        labels = inputs.get("labels")
        if labels is None or labels.dim() < 2:
            return self.model(**inputs).loss
        return task_loss(self.model, {k: v for k, v in inputs.items() if k != "labels"}, labels, num_items)

    def _num_items(self, micro_batches: list[Batch]) -> torch.Tensor | None:
        """Label tokens the loss counts (after the causal shift) in this step, summed over ranks;
        None for per-example labels (classification), whose mean is already exact."""
        labels = [b.get("labels") for b in micro_batches]
        if any(x is None or x.dim() < 2 for x in labels):
            return None
        count = sum(int((x[:, 1:] != -100).sum()) for x in labels)
        total = torch.tensor([count], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return total.reshape(()).clamp_min(1)

    # --- train --------------------------------------------------------------------------------

    def train(self, until: int | None = None) -> TrainResult:
        """Train to `cfg.max_steps` (or stop early after step `until`, as a kill would)."""
        cfg, acc = self.cfg, self.accelerator
        end = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        start = time.monotonic()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        last: dict[str, float] = {}
        self.model.train()
        world, accum = acc.num_processes, cfg.grad_accum
        while self.step < end:
            micro_batches = [next(self.batches) for _ in range(accum)]
            self.batches_seen += accum
            num_items = self._num_items(micro_batches)
            # accelerate divides each backward by grad_accum and DDP averages over ranks; with token
            # counts the loss is already a share of the global mean, so scale those back out
            rescale = float(world * accum) if num_items is not None else 1.0
            totals: dict[str, float] = {}
            finite = True
            for batch in micro_batches:
                with acc.accumulate(self.model):
                    terms = self.loss_step(batch, num_items)
                    if rescale != 1.0:
                        terms["loss"] = terms["loss"] + terms["task"] * (rescale - 1.0)
                    acc.backward(terms["loss"])
                finite = finite and bool(torch.isfinite(terms["loss"].detach()))
                for key, value in terms.items():  # logged: the task loss of the global batch, as one process sees it
                    if key == "loss":
                        continue
                    share = float(value.detach().float())
                    totals[key] = totals.get(key, 0.0) + (share * world if key == "task" and num_items is not None
                                                          else share / accum)
            if world > 1 and num_items is not None:  # this rank's share x world -> the global batch's mean
                totals["task"] = float(acc.reduce(torch.tensor([totals["task"]], device=acc.device), "mean"))
            totals["loss"] = sum(totals.values()) if finite else float("nan")
            if self.sharding.own_wrapping:
                from pipeline.stages.sharding import sync_replicated_gradients

                sync_replicated_gradients(self.sharding.replicated, world)
            if cfg.max_grad_norm > 0:
                norm = acc.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.max_grad_norm)
                if norm is not None:  # None under DeepSpeed, whose engine clips (gradient_clipping)
                    totals["grad_norm"] = float(norm)
            # under fp16 the grad scaler skips steps whose gradients overflow: an infinite norm is
            # expected there; a non-finite loss is not
            checked = {k: v for k, v in totals.items() if not (k == "grad_norm" and acc.scaler is not None)}
            bad = {k: v for k, v in checked.items() if not math.isfinite(v)}
            if bad:  # stop before the step: the last checkpoint stays the last good state
                raise FloatingPointError(
                    f"training diverged at step {self.step + 1}: {bad}; lower train.lr or enable clipping, then "
                    f"re-run to resume from the last checkpoint ({self.ckpt_root})")
            self.optimizer.step()
            self.adapted.after_optimizer_step(self.step)
            if not acc.optimizer_step_was_skipped:  # fp16: the scaler skipped an overflowing step
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.adapted.on_step(self.step)
            last = totals
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(totals)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                self.val_losses.append((self.step, self.validate()))
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        return TrainResult(steps=self.step, final_train_loss=last.get("task", float("nan")),
                           val_losses=self.val_losses, trainable_parameters=self.adapted.num_trainable(),
                           seconds=time.monotonic() - start, resumed_from=self.resumed_from)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean task loss over the fixed validation batches (eval mode: deterministic gates)."""
        self.model.eval()
        losses = [float(self._batch_loss(self._to_device(batch))) for batch in self.val_batches]
        self.model.train()
        value = float(np.mean(losses)) if losses else float("nan")
        gathered = self.accelerator.gather_for_metrics(torch.tensor([value]))
        value = float(gathered.mean())
        if self._writer is not None:
            self._writer.add_scalar("val/loss", value, self.step)
            self._append_jsonl({"step": self.step, "val_loss": value})
        return value

    def _log(self, totals: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record: dict[str, Any] = {"step": self.step, **{f"train/{k}": v for k, v in totals.items()}}
        for group in self.optimizer.param_groups:
            record[f"lr/{group.get('name', 'group')}"] = group["lr"]
        record.update(self._diagnostics())
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._writer.add_scalar(key, value, self.step)
        self._append_jsonl(record)

    def _diagnostics(self) -> dict[str, float]:
        if self.adapted.method != "structlora":
            return {}
        return {f"diag/{k}": float(v) for k, v in self.adapted.handle.scalar_diagnostics().items()}

    def _append_jsonl(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def cleanup(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.accelerator.wait_for_everyone()
