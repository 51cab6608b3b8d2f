"""The run config: one dataclass per section of a YAML file under configs/.

The `data` and `model` sections live in pipeline.schema_data and pipeline.schema_model; this module holds
the stage sections (base, adapter, train, eval, merge, publish) and RunConfig, which composes them all.
Every field has a default where a sensible one exists; `help` metadata documents it.
Validation that spans fields lives in `__post_init__` and raises ValueError, which the
loader turns into an error naming the file and the section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from eval.budget import check_budgets, default_budgets
from pipeline.schema_data import DataConfig
from pipeline.schema_fields import option as _f
from pipeline.schema_model import ModelConfig


@dataclass
class BaseStageConfig:
    """Pretraining of the tiny base model (only for presets, which have no downloadable weights)."""

    enabled: bool = _f(False, "run the base stage (tiny preset only)")
    max_steps: int = _f(600, "optimizer steps")
    batch_size: int = _f(32, "samples per step")
    lr: float = _f(2e-3, "AdamW learning rate")
    tasks: dict[str, float] = _f(help="what the base model learns", factory=lambda: {"caption": 1.0})


@dataclass
class AdapterConfig:
    """Which adaptation method, on which parts of the model."""

    method: Literal["structlora", "lora", "dora", "adalora", "vera", "full"] = _f("structlora", "adaptation method")
    vision: Literal["frozen", "lora", "full"] = _f("lora", "vision tower: frozen, adapted, or fully trained")
    projector: Literal["frozen", "lora", "full"] = _f("lora", "multi-modal projector")
    language: Literal["frozen", "lora", "full"] = _f("lora", "language model")
    rank: int = _f(8, "adapter rank r")
    alpha: float = _f(16.0, "scale numerator: s = alpha / r")
    dropout: float = _f(0.0, "dropout on the adapter input")
    targets: list[str] = _f(help="module names to adapt in each tower", factory=lambda: ["q_proj", "v_proj"])
    vera_rank: int = _f(256, "VeRA's shared rank (its paper's value; VeRA trains r + out values per module)")
    structlora: dict[str, Any] = _f(
        help="StructLoRA options (gate, coordinator): see structlora.StructLoRAConfig", factory=dict
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclass
class TrainConfig:
    """The training recipe (accelerate: 1 CPU process up to N GPUs)."""

    max_steps: int = _f(300, "optimizer steps")
    batch_size: int = _f(16, "samples per process per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-3, "learning rate of A and B")
    lr_gate: float | None = _f(None, "learning rate of the gate logits (default: 10 x lr, study v2's choice: at "
                                     "the factors' rate the expected-L0 term barely moves the gates)")
    lr_coordinator: float | None = _f(None, "learning rate of the coordinator (default: lr)")
    data_fraction: float = _f(1.0, "train on this share of the training images (a stable hash of each key), "
                                   "for low-data studies")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "linear warmup share of a cosine schedule")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "auto = bf16 on GPUs that support it, fp32 on CPU")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    sharding: Literal["auto", "fsdp"] = _f(
        "auto", "auto = follow the accelerate config (DDP, FSDP, DeepSpeed); fsdp = shard the frozen base with "
                "fully_shard even where accelerate would not (e.g. torchrun on CPU); the adapter stays replicated")
    find_unused_parameters: bool | None = _f(
        None, "DDP's find_unused_parameters. None (auto) = on when the data has a conversations task: a rank "
              "whose batch holds only text-only rows leaves the vision tower's adapters without gradients, which "
              "DDP refuses otherwise; off elsewhere (it costs a graph walk per step)")
    fsdp_layer_classes: list[str] = _f(
        help="module classes that become FSDP units (default: the accelerate config's, else the model's "
             "decoder / encoder layers)", factory=list)
    save_every: int = _f(100, "checkpoint every N steps (and at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    resume: Literal["auto", "never"] = _f("auto", "auto = continue from the newest complete checkpoint")
    log_every: int = _f(10, "log metrics every N steps")
    eval_every: int = _f(100, "validation loss every N steps")
    val_batches: int = _f(4, "batches of the fixed validation set (batch_size each; the same at every evaluation)")
    seed: int = _f(0, "training seed")

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.val_batches < 1:
            raise ValueError("max_steps, batch_size, grad_accum and val_batches must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")

    @property
    def gate_lr(self) -> float:
        """The gate logits' learning rate: `lr_gate`, else 10 x `lr`."""
        return self.lr_gate if self.lr_gate is not None else 10.0 * self.lr


@dataclass
class EvalConfig:
    """What the eval stage measures."""

    tasks: list[Literal["caption", "vqav2", "gqa", "classification", "conversations", "long_context", "test_loss"]] = _f(
        help="what to evaluate (conversations: the last answer of each held-out conversation; test_loss: the "
             "teacher-forced loss of the other tasks' reference answers, lower is better)",
        factory=lambda: ["caption", "vqav2", "gqa"])
    conversation_metric: Literal["auto", "exact_match", "token_f1", "anls", "bleu4", "cider"] = _f(
        "auto", "headline of the conversations task: auto = exact match for short answers (median reference <= 3 "
        "words), CIDEr for sentences; every metric is reported either way")
    max_new_tokens: dict[str, int | Literal["auto"]] = _f(
        help="generation budget per task in new tokens (caption, vqav2, gqa, conversations; a task not named keeps "
             "its default: 64 for caption and conversations, 16 for short answers). conversations: auto = measured "
             "on the training split's answers in the model's own tokens (p99 + a margin, capped at 1024 or the "
             "model's context; data.answer_budget), stated in the report, which also counts the answers that hit "
             "their budget; the merged model's demo budget is the same", factory=default_budgets)
    split: str = _f("test", "split scored")
    max_samples: int | None = _f(None, "cap per task (None = all)")
    batch_size: int = _f(16, "generation batch size")
    long_context_lengths: list[int] = _f(help="context-length buckets in tokens", factory=lambda: [256, 512, 1024, 2048])
    long_context_samples: int = _f(48, "images captioned at every context length")
    long_context_filler: Literal["captions", "neutral", "both"] = _f(
        "captions", "long-context filler: captions = other images' reference captions (the val split's); neutral = "
                    "data/neutral_filler.txt (the shapes world's words, no scene described: a collapse from length "
                    "alone, not from copying captions); both = captions as `long_context` and neutral beside it as "
                    "`long_context_neutral`, same images and lengths")
    compare_base: bool = _f(True, "also score the base model")

    def __post_init__(self) -> None:
        self.max_new_tokens = check_budgets(self.max_new_tokens, "max_new_tokens")


@dataclass
class MergeConfig:
    """Folding the adapter into the weights."""

    export_peft: bool = _f(True, "also write a standard PEFT LoRA adapter")
    svd_rank: int | None = _f(None, "compress the exported adapter to this rank by SVD (None = exact)")
    check_tolerance: float = _f(1e-3, "max abs logit difference (float32) allowed between merged and adapted model: "
                                "folding reorders sums, ~1e-5 for the tiny preset, more for wide models")
    quantization_paths: Literal["auto", "true", "false"] = _f(
        "auto", "a quantized base: also measure the two merges this one avoids (requantizing the merged weights; "
                "folding into the original float base) into merge_check.json; needs a float copy of the base on the "
                "CPU (auto: when the base has at most 2 B parameters)")


@dataclass
class PublishConfig:
    """Registering the merged model with the demo."""

    registry: str = _f("runs/registry", "model registry folder for `structlora demo --registry`")
    name: str | None = _f(None, "model name in the registry (default: the run directory's name)")


@dataclass
class RunConfig:
    """A whole pipeline run: `structlora run CONFIG`."""

    run_dir: str = _f("runs/default", "where every stage writes (override with --run-dir)")
    seed: int = _f(0, "global seed")
    distributed_timeout_minutes: int = _f(
        240, "timeout of collectives between ranks: rank 0 alone prepares, merges and scores while the others "
             "wait (the NCCL default of 10 minutes is shorter than converting COCO)")
    data: DataConfig = _f(help="data source and streaming", factory=DataConfig)
    model: ModelConfig = _f(help="backbone", factory=lambda: ModelConfig(preset="tiny"))
    base: BaseStageConfig = _f(help="tiny base pretraining", factory=BaseStageConfig)
    adapter: AdapterConfig = _f(help="adaptation method", factory=AdapterConfig)
    train: TrainConfig = _f(help="training recipe", factory=TrainConfig)
    eval: EvalConfig = _f(help="evaluation", factory=EvalConfig)
    merge: MergeConfig = _f(help="merge stage", factory=MergeConfig)
    publish: PublishConfig = _f(help="publish stage", factory=PublishConfig)

    def __post_init__(self) -> None:
        if self.model.quantization != "none" and (self.adapter.method == "full" or self.adapter.language == "full"):
            raise ValueError(f"model.quantization={self.model.quantization} with "
                             + ("adapter.method=full" if self.adapter.method == "full" else "adapter.language=full")
                             + ": the quantized language model's weights are packed integers and cannot be trained; "
                               "adapt it (lora) or load it unquantized")
        if self.model.quantization != "none" and self.adapter.method in ("adalora", "vera"):
            raise ValueError(f"model.quantization={self.model.quantization} with adapter.method={self.adapter.method}: "
                             "the merge into a dequantized base is built for structlora, lora and dora (PEFT's "
                             f"{self.adapter.method} layers keep their bitsandbytes forms and cannot merge there); "
                             "use one of those or load the base unquantized")
        if self.data.long_context.share > 0 and self.model.arch == "vit":
            raise ValueError("data.long_context: long-context training examples are for VLMs, not model.arch=vit")
        if self.base.enabled and self.model.preset is None:
            raise ValueError("base.enabled is only for presets: a loaded model is already pretrained")
