"""The run config: one dataclass per section of a YAML file under configs/.

Every field has a default where a sensible one exists; `help` metadata documents it.
Validation that spans fields lives in `__post_init__` and raises ValueError, which the
loader turns into an error naming the file and the section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any = None, help: str = "", factory: Any = None) -> Any:  # noqa: A002 - mirrors PEFT's metadata
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ShapesConfig:
    """The embedded synthetic world (DESIGN.md section 4)."""

    images: int = _f(2000, "number of images over all splits")
    size: int = _f(64, "image side in pixels")
    seed: int = _f(0, "world seed: same seed, byte-identical files")
    image_format: Literal["png", "jpg"] = _f("png", "image file format")
    conversations: Literal["none", "llava", "sharegpt", "messages"] = _f(
        "none", "also write the world as conversation files in this format (one per split, beside the world) and "
        "prepare them as the `conversations` task, exactly as your own files are: the offline example of "
        "bringing your own data (configs/conversations_example.yaml)")

    def __post_init__(self) -> None:
        if self.images < 10:
            raise ValueError(f"images must be >= 10, got {self.images}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")


@dataclass
class ConversationsConfig:
    """How a conversation file is read (`structlora prepare conversations`; data/conversations.py)."""

    format: Literal["auto", "llava", "sharegpt", "messages"] = _f(
        "auto", "llava (JSON array, conversations + image), sharegpt (LLaMA-Factory: messages + images), messages "
        "(ms-swift JSONL); auto = from the first records")
    val_fraction: float = _f(0.05, "share of a single file's records for val (by a hash of the id)")
    test_fraction: float = _f(0.05, "share of a single file's records for test (by a hash of the id)")
    strict: bool = _f(False, "a bad record stops prepare (default: counted by reason and skipped)")
    tags: str | None = _f(None, "field and role names, e.g. 'role=from,content=value,user=human,assistant=gpt' "
                                "(LLaMA-Factory's dataset_info tags); default: both spellings recognised")


@dataclass
class SourceConfig:
    """One more source prepared into the same shards folder, mixed by `data.tasks` weights."""

    kind: Literal["coco", "vqav2", "gqa", "imagefolder", "conversations"] = _f(
        "conversations", "what the files are (its task: caption, vqav2, gqa, classification, conversations)")
    paths: dict[str, str] = _f(help="its files by role, as data.paths (conversations: file, or train/val/test; "
                                    "images)", factory=dict)
    conversations: ConversationsConfig = _f(help="how its conversation file is read", factory=ConversationsConfig)


@dataclass
class LongContextTrainConfig:
    """Long-context training examples (`data.long_context.LongContextMaker`): filler from the training stream only."""

    share: float = _f(0.0, "share of caption examples made long (0 = none: the stream is exactly as without)")
    min_tokens: int = _f(0, "shortest target length of a long example's row, image and answer included (0 = the "
                             "bare prompt)")
    max_tokens: int = _f(0, "longest target length (0 = data.max_length; never above it)")
    pool: int = _f(256, "captions of earlier training examples kept as filler")
    per: Literal["example", "batch"] = _f(
        "example", "example = each caption example is drawn on its own; batch = one draw per batch: with probability "
                   "share all its caption examples become long at one length (only that share of batches is padded "
                   "long: the same number of long examples for fewer padded tokens)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")
        if self.min_tokens < 0 or self.max_tokens < 0 or (self.max_tokens and self.min_tokens > self.max_tokens):
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")


@dataclass
class DataConfig:
    """Where the data comes from and how it is streamed."""

    source: Literal["shapes", "coco", "vqav2", "gqa", "imagefolder", "conversations", "shards"] = _f(
        "shapes", "shapes = generate the synthetic world; coco / vqav2 / gqa / imagefolder convert official files; "
        "conversations = your own conversation file (data.conversations says how to read it); shards = use "
        "ready shards"
    )
    conversations: ConversationsConfig = _f(help="how a conversation file (source: conversations) is read",
                                            factory=ConversationsConfig)
    sources: list[SourceConfig] = _f(
        help="more sources prepared beside the first into the same {task}/{split}/ folders and mixed with it by "
             "data.tasks weights, e.g. [{kind: conversations, paths: {file: my.json, images: imgs/}}]",
        factory=list)
    shapes: ShapesConfig = _f(help="settings of the synthetic world", factory=ShapesConfig)
    paths: dict[str, str] = _f(
        help="official input files by role (captions, questions, annotations, images, root, shards)", factory=dict
    )
    shard_size: int = _f(1000, "samples per WebDataset shard")
    prepare_workers: int = _f(0, "processes writing shards in prepare (0 = auto: one per core, at most 8, for "
                                 "official data; one for the small shapes world); the shards are byte-identical "
                                 "for any count")
    tasks: dict[str, float] = _f(
        help="task mixing weights for training, e.g. {caption: 1.0, vqav2: 1.0, gqa: 1.0}",
        factory=lambda: {"caption": 1.0, "vqav2": 1.0, "gqa": 1.0},
    )
    num_workers: int = _f(0, "DataLoader workers per process")
    max_length: int = _f(256, "token limit per sample; image tokens are never truncated")
    allow_remote: bool = _f(False, "allow `pipe:` (runs a shell command) and remote shard URLs (http(s), gs, hf, "
                                   "ais, ... opened by webdataset): off by default")
    sampling: Literal["epoch", "resample"] = _f(
        "epoch", "training stream: epoch = one pass over every source per epoch (every image and question "
        "seen); resample = shards drawn with replacement, endless (corpora longer than the run)")
    image_fit: Literal["center_crop", "pad_to_square"] = _f(
        "center_crop", "how an image becomes the tower's square input: center_crop = the processor's resize of the "
        "shortest side and centre crop (llava-hf's processor); pad_to_square = pad to a square with the mean "
        "colour first, then resize (LLaVA-1.5's training recipe; nothing is cut off). Saved with the model")
    questions: Literal["packed", "single"] = _f(
        "packed", "questions of one image in training: packed = one multi-turn conversation (as LLaVA trains), "
        "single = one example each")
    verify_shards: bool = _f(
        True, "when a stage opens a shard folder, check every shard's sha256 against its manifest (reads each "
        "byte once more; cost in BENCHMARKS.md); false checks byte sizes only, which misses in-place damage")
    damaged_shards: Literal["error", "skip"] = _f(
        "error", "a shard that fails that check: error = stop the stage with one line naming it; skip = leave it "
        "out, and report what it held as lost in the stage summary, manifest.json, metrics.json and report.md")
    caption_reference: Literal["random", "longest", "consensus"] = _f(
        "random", "the reference a caption example trains on: random = one of the image's references per step; "
                  "longest = its longest (most complete) one; consensus = the one sharing most n-grams with the "
                  "image's other references; the last two are the same reference every time")
    long_context: LongContextTrainConfig = _f(
        help="train with long contexts: a share of caption examples get other training captions between the "
             "image and the instruction, as the long-context evaluation builds its prompts",
        factory=lambda: LongContextTrainConfig())

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.tasks.values()):
            raise ValueError("tasks: mixing weights must be >= 0")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


@dataclass
class TinyPreset:
    """Sizes of the tiny LLaVA-architecture preset (CLIP-style vision tower + Llama-style LM)."""

    image_size: int = _f(64, "input image side")
    patch_size: int = _f(8, "ViT patch side: (image_size / patch_size)^2 image tokens")
    vision_hidden: int = _f(96, "vision tower width")
    vision_layers: int = _f(4, "vision tower depth (the last is unused with vision_feature_layer=-2)")
    vision_heads: int = _f(4, "vision attention heads")
    text_hidden: int = _f(128, "language model width")
    text_layers: int = _f(4, "language model depth")
    text_heads: int = _f(4, "language attention heads")
    text_intermediate: int = _f(256, "language MLP width")
    max_position: int = _f(512, "language model context length")
    num_labels: int = _f(10, "classes for the ViT preset")

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if name.startswith("vision") else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its head count {heads}")


@dataclass
class SkeletonPreset:
    """LLaVA-1.5-7B at its real widths with a few layers and random weights (`preset: llava15-7b-skeleton`):
    CLIP ViT-L/14 at 336 px (1024 wide, 16 heads, MLP 4096, 576 image tokens), projector
    1024 -> 4096 -> 4096, Llama (4096 wide, 32 heads, MLP 11008, vocabulary 32064, 4096 positions).
    Every shape a 7B run meets, on a machine without the weights: for tests and benchmarks."""

    vision_layers: int = _f(3, "CLIP layers (the last is unused with vision_feature_layer=-2)")
    text_layers: int = _f(2, "Llama layers")

    def __post_init__(self) -> None:
        if self.vision_layers < 2 or self.text_layers < 1:
            raise ValueError("the skeleton needs >= 2 vision layers (LLaVA reads the second to last) and >= 1 text layer")


@dataclass
class ModelConfig:
    """The backbone: a hub id / local directory loaded with from_pretrained, or a preset built from config."""

    arch: Literal["llava", "vit", "vlm"] = _f(
        "llava", "vlm = any AutoModelForImageTextToText (LLaVA-1.5, Qwen2.5-VL, LLaVA-OneVision, SmolVLM, Gemma 3, "
                 "...: towers from the model, prompts through its chat template); llava = the same path (a "
                 "spelling users know: LLaVA-1.5 is the llava family); vit = image classifier")
    name_or_path: str | None = _f(None, "hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    preset: Literal["tiny", "llava15-7b-skeleton", "tiny-llava", "tiny-llava_next", "tiny-llava_onevision",
                    "tiny-qwen2_vl", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-idefics3", "tiny-gemma3",
                    "tiny-paligemma", "tiny-mistral3", "tiny-internvl"] | None = _f(
        None, "build from config instead of loading weights: the tiny preset, LLaVA-1.5-7B's real widths with "
              "a few layers, or tiny-<family> (model.arch=vlm: that family's tiny random model and processor)")
    tiny: TinyPreset = _f(help="sizes of the tiny preset", factory=TinyPreset)
    skeleton: SkeletonPreset = _f(help="depth of the llava15-7b-skeleton preset", factory=SkeletonPreset)
    vit_impl: Literal["transformers", "timm"] = _f("transformers", "ViT implementation")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "weights dtype when loading")
    vision_feature_layer: int | None = _f(
        None, "the vision layer the model reads (LLaVA-1.5: -2); unset = the model's own; set = checked against a "
              "loaded model, used to build a preset (LLaVA presets: -2 when unset)")
    chat_template: str | None = _f(None, "a Jinja chat template file for a processor without one (PaliGemma's hub "
                                         "checkpoints) or to replace its own")
    processor_kwargs: dict[str, Any] = _f(help="passed to AutoProcessor.from_pretrained (e.g. Qwen-VL's "
                                               "min_pixels / max_pixels)", factory=dict)
    quantization: Literal["none", "nf4", "fp4", "int8"] = _f(
        "none", "QLoRA: load the frozen base with the language model's linears quantized by bitsandbytes (vision "
                "tower, projector and lm_head kept in the compute dtype, LLaVA's recipe); model.arch=llava or vlm")
    double_quant: bool = _f(True, "4-bit only: quantize the quantization constants too (QLoRA's double quant)")

    def __post_init__(self) -> None:
        if self.quantization != "none" and self.arch == "vit":
            raise ValueError(f"model.quantization={self.quantization} is built for model.arch=llava or vlm (a "
                             "language model to quantize), not vit")
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.name_or_path (load) or model.preset (build from config)")
        if self.arch == "vit" and self.preset not in (None, "tiny"):
            raise ValueError(f"model.arch=vit builds the tiny preset only, not {self.preset}")


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
