"""Worker for tests/test_sharded_training.py: train StructLoRA on fixed global batches, save the adapter.

    torchrun --nproc_per_node 2 tests/dist_worker.py --sharding fsdp --grad-accum 1 --micro-batch 2 --out F
    python tests/dist_worker.py --world 2 --grad-accum 1 --micro-batch 2 --out F     (one process, whole batch)

Every step has one global batch of world x grad_accum x micro_batch examples, drawn from a
seeded generator (random images, prompts and answers of different lengths, so that ranks and
micro-batches hold different numbers of label tokens). A rank takes its contiguous slice,
split into micro-batches; one process takes all of it at once. The pipeline's own pieces do
the rest: the smoke config, `pipeline.stages.common.attach` (StructLoRA with the full coordinator and
a semantic-edge refresh at step 0 and every 2 steps) and the `TrainRecipe`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def global_batches(model, size: int, step: int, text_tokens: int = 24) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(1000 + step)
    vocab, image_token = cfg.text_config.vocab_size, cfg.image_token_id
    image_tokens = cfg.image_seq_length
    size_px = cfg.vision_config.image_size
    words = torch.randint(5, vocab, (size, text_tokens), generator=g)
    words[words == image_token] = 5
    ids = torch.cat([torch.ones(size, 1, dtype=torch.long), torch.full((size, image_tokens), image_token), words], 1)
    labels = ids.clone()
    prompt = 1 + image_tokens + torch.randint(2, text_tokens - 2, (size,), generator=g)
    labels[torch.arange(ids.shape[1])[None, :] < prompt[:, None]] = -100
    return {"pixel_values": torch.randn(size, 3, size_px, size_px, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharding", default="auto", choices=["auto", "fsdp"])
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--world", type=int, default=None, help="one process: the world size to imitate")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from accelerate import PartialState

    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages.common import attach, load_base
    from pipeline.stages.recipe import TrainRecipe

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    imitated = args.world or world
    accum = args.grad_accum if args.world is None else 1
    micro = args.micro_batch if args.world is None else args.micro_batch * args.grad_accum * imitated
    overrides = ["base.enabled=false", "model.tiny.vision_layers=3", "model.tiny.text_layers=2",
                 f"train.max_steps={args.steps}", f"train.grad_accum={accum}", f"train.batch_size={micro}",
                 f"train.sharding={args.sharding}", f"train.precision={args.precision}", "train.eval_every=0",
                 "train.save_every=1000", "train.lr=0.01", "train.warmup_ratio=0.0", "adapter.rank=4",
                 # the gate as first built: sampled per optimizer step, the hard case for "N ranks x M
                 # micro-batches train what one process does" (every rank and micro-batch must share a draw)
                 "adapter.structlora={coordinator: {refresh_every: 2}, gate: {sampling: step, penalty: kl, "
                 "prior: 0.1, lambda_ib: 1.0e-3, init_prob: 0.9, hard_concrete: false}}", *args.set]
    cfg = load_config(RunConfig, ROOT / "configs" / "smoke.yaml", overrides)
    work = Path(tempfile.mkdtemp(prefix=f"dist-worker-{rank}-"))
    ctx = StageContext(cfg=cfg, run_dir=work)
    model, processor = load_base(ctx)
    adapted = attach(ctx, model, processor)

    def batches():
        per_rank = accum * micro
        for step in range(args.steps):
            full = global_batches(model, per_rank * world, step)
            mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}
            for m in range(accum):
                yield {k: v[m * micro:(m + 1) * micro] for k, v in mine.items()}

    recipe = TrainRecipe(adapted, cfg.train, work / "train", batches, [])
    recipe.setup()
    result = recipe.train()
    trainable = recipe._gathered_trainable_state()
    checksums = recipe.rank_checksums()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, args.out)
        import json

        units = sum(type(m).__name__.startswith("FSDP") for m in recipe.model.modules())
        Path(args.out + ".json").write_text(json.dumps({
            "sharding": recipe.sharding.kind, "world": world, "loss": result.final_train_loss,
            "identical_ranks": len(set(checksums)) == 1, "fsdp_units": units}))
    recipe.cleanup()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
