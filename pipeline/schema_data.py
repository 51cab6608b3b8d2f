"""The `data` section of the run config: where the data comes from and how it is streamed.

DataConfig and its parts: the synthetic shapes world, how a conversation file is read, more sources
mixed into the same shards, long-context training examples. pipeline.schema composes it into RunConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.schema_fields import option as _f


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
    val_fraction: float = _f(0.05, "share of a single file's images for val (records that share an image stay "
                                   "in one split; text-only records by a hash of their id)")
    test_fraction: float = _f(0.05, "share of a single file's images for test (as val_fraction)")
    strict: bool = _f(False, "the first bad record stops prepare, before any shard is written (default: counted "
                             "by reason and skipped)")
    dedupe: Literal["content", "id", "off"] = _f(
        "content", "content: a record repeating an earlier one's messages and images is a duplicate, a reused id "
        "with other content is kept under a derived id (ID#<8 hex>) and counted as `id reused`; id: a repeated id "
        "is a duplicate; off: every record is kept")
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
