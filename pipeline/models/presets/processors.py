"""Each VLM family's own processor, built offline for the tiny models of `pipeline.models.presets.tiny`, and chat labels.

`tiny_processor(family)` builds the family's processor class from config values only (no hub access):
- its image processor (and video processor where the processor class requires one) set up for the tiny
  models' 16 x 16 images with 4 x 4 patches, so that the image tokens the processor inserts are exactly
  what the tiny model expects (`pipeline.models.presets.tiny.image_token_count`);
- a small byte-level BPE tokenizer (`tokenizers`, wrapped in `PreTrainedTokenizerFast`) whose 1000 ids fit
  the tiny models' vocabulary: the family's turn markers and bos/eos/pad first, its image / video / vision
  start-end / boi-eoi tokens at the very ids `tiny_config` gives them, read from the config;
- a chat template with `{% generation %}` around every assistant reply and its end-of-turn marker.

Templates (`TEMPLATE_SOURCE`): "real" = the hub template's text (role markers, image placeholder, generation
prompt) with only `{% generation %}` markers added; "simplified" = its structure, with the parts named there
left out or changed.

`chat_labels(processor, messages, images)` renders the conversations with the processor's
template, tokenises them through the processor (image tokens expanded, padding) and labels the tokens
that overlap a `{% generation %}` span: the assistant replies and their end-of-turn markers. Nothing is
counted by hand: the spans are character offsets of the rendered text, moved through the processor's own
text edits (inserted text, image placeholder expansion) and mapped to tokens by the tokenizer's offsets.
Image tokens and padding are always -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# chat labels live in data.chat_template (the training collator uses them); re-exported here
from data.chat_template import IGNORE_INDEX, chat_labels, multimodal_ids, render  # noqa: F401
from pipeline.models.families import FAMILIES
from pipeline.models.presets.tiny import IMAGE, PATCH, VOCAB, tiny_config

_GRID = IMAGE // PATCH  # 4 x 4 patches per 16 x 16 image
_SPLIT = r"\w+|[^\w\s]|\s"  # words, single punctuation marks and single whitespace characters
_CORPUS = ("What is in the image? It is a red square on a white background. Describe the picture in one sentence.",
           "The cat sits on the mat and the dog looks at the camera. Yes, there are two of them; no, not three.",
           "Which colour is the sky? Blue. How many people are there? Four people stand near the old green car.")
_QWEN_FRONT = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # im_start = 1, im_end = 2 = tiny eos
_LLAMA_FRONT = ("<unk>", "<s>", "</s>", "<pad>")
_GEMMA_FRONT = ("<pad>", "<eos>", "<bos>", "<unk>")

# {% generation %} wraps every assistant reply together with its end-of-turn marker.
_LLAVA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' ' }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + eos_token }}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_LLAVA_NEXT = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text']"
    " + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' }}{% generation %}{{ message['content'][0]['text'] + eos_token }}"
    "{% endgeneration %}{{ ' ' }}{% endif %}{% endfor %}"
)
_ONEVISION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ '\\n' }}{% generation %}{{ content['text'] + '<|im_end|>' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chatml(default_system: str | None, image: str, video: str) -> str:
    """ChatML as Qwen-VL / InternVL write it: `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
    system = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + default_system
              + "<|im_end|>\n{% endif %}") if default_system else ""
    return (
        "{% macro body(message) %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}" + image
        + "{% elif content['type'] == 'video' %}" + video + "{% elif 'text' in content %}{{ content['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{% endmacro %}{% for message in messages %}" + system
        + "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ body(message) }}<|im_end|>{% endgeneration %}{% else %}{{ body(message) }}<|im_end|>{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


_QWEN_IMAGE, _QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
_IDEFICS3 = (
    "{% macro body(message) %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endmacro %}<|im_start|>"
    "{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'][0]['type'] == 'image' %}"
    "{{ ':' }}{% else %}{{ ': ' }}{% endif %}{% if message['role'] == 'assistant' %}{% generation %}{{ body(message) }}"
    "<end_of_utterance>{% endgeneration %}{% else %}{{ body(message) }}<end_of_utterance>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_GEMMA3 = (
    "{% macro body(message) %}{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'model' %}{% generation %}"
    "{{ body(message) }}{{ '<end_of_turn>' }}{% endgeneration %}{% else %}{{ body(message) }}{{ '<end_of_turn>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_PALIGEMMA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% else %}{{ '\\n' }}{% generation %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)
_MISTRAL3 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + "
    "message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}{{ '[INST]' }}"
    "{% for block in message['content'] %}{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] =="
    " 'image' %}{{ '[IMG]' }}{% endif %}{% endfor %}{{ '[/INST]' }}{% else %}{% generation %}{% for block in "
    "message['content'] %}{{ block['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)

TEMPLATE_SOURCE: dict[str, str] = {
    "llava": "simplified: llava-hf/llava-1.5 template with eos `</s>` instead of the ' ' after each answer "
             "(the project's format, data.prompts / data.chat)",
    "llava_next": "real: llava-hf/llava-v1.6-mistral template (the revision with `</s> `, not `<\\s> `)",
    "llava_onevision": "real: llava-hf/llava-onevision-qwen2 template, generation block widened to `<|im_end|>`",
    "qwen2_vl": "real: Qwen2-VL-Instruct template with its default system prompt (add_vision_id left out)",
    "qwen2_5_vl": "real: Qwen2.5-VL-Instruct template, the same as Qwen2-VL's (add_vision_id left out)",
    "qwen3_vl": "simplified: Qwen3-VL-Instruct ChatML core only (no tools, reasoning or timestamps)",
    "idefics3": "real: SmolVLM / Idefics3 template",
    "gemma3": "simplified: gemma-3-it template without its system-prompt folding and role-alternation check",
    "paligemma": "simplified: PaliGemma has no chat template; turns are prefix '\\n' suffix<eos> (big_vision format)",
    "mistral3": "simplified: Mistral-Small-3.1 [INST] format without its default system prompt and tool calls",
    "internvl": "real: the ChatML template transformers' InternVL conversion script writes (`<IMG_CONTEXT>\\n`)",
}
# What a generation prompt ends with (the assistant marker).
ASSISTANT_MARKER: dict[str, str] = {
    "llava": "ASSISTANT:", "llava_next": "[/INST]", "llava_onevision": "<|im_start|>assistant\n",
    "qwen2_vl": "<|im_start|>assistant\n", "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n", "idefics3": "Assistant:", "gemma3": "<start_of_turn>model\n",
    "paligemma": "\n", "mistral3": "[/INST]", "internvl": "<|im_start|>assistant\n",
}


@dataclass(frozen=True)
class _Spec:
    """How one family's tokenizer is laid out: `front` tokens take ids 0.., `tail` maps tiny-config
    attributes (e.g. "image_token_id") to the token that must sit at that id; `named` become tokenizer
    attributes (bos_token, image_token, boi_token, ...); `bos` adds a Llama-style bos at tokenisation."""

    front: tuple[str, ...]
    tail: dict[str, str]
    named: dict[str, str] = field(default_factory=dict)
    template: str = ""
    bos: bool = False


_QWEN_TAIL = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
              "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
_QWEN_NAMED = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<|image_pad|>",
               "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
               "vision_end_token": "<|vision_end|>"}
_LLAMA_NAMED = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_SPECS: dict[str, _Spec] = {
    "llava": _Spec(_LLAMA_FRONT, {"image_token_index": "<image>"}, {**_LLAMA_NAMED, "image_token": "<image>"},
                   _LLAVA, bos=True),
    "llava_next": _Spec(_LLAMA_FRONT, {"image_token_index": "<image>"}, {**_LLAMA_NAMED, "image_token": "<image>"},
                        _LLAVA_NEXT, bos=True),
    "llava_onevision": _Spec(_QWEN_FRONT, {"image_token_index": "<image>", "video_token_index": "<video>"},
                             {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<image>",
                              "video_token": "<video>"}, _ONEVISION),
    "qwen2_vl": _Spec(_QWEN_FRONT, _QWEN_TAIL, _QWEN_NAMED,
                      _chatml("You are a helpful assistant.", _QWEN_IMAGE, _QWEN_VIDEO)),
    "qwen2_5_vl": _Spec(_QWEN_FRONT, _QWEN_TAIL, _QWEN_NAMED,
                        _chatml("You are a helpful assistant.", _QWEN_IMAGE, _QWEN_VIDEO)),
    "qwen3_vl": _Spec(_QWEN_FRONT, _QWEN_TAIL, _QWEN_NAMED, _chatml(None, _QWEN_IMAGE, _QWEN_VIDEO)),
    "idefics3": _Spec(_QWEN_FRONT + ("<end_of_utterance>", "<fake_token_around_image>", "<global-img>")
                      + tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
                      {"image_token_id": "<image>"},
                      {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"},
                      _IDEFICS3),
    "gemma3": _Spec(_GEMMA_FRONT + ("<start_of_turn>", "<end_of_turn>"),
                    {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                     "image_token_index": "<image_soft_token>"},
                    {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                     "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"}, _GEMMA3),
    "paligemma": _Spec(_GEMMA_FRONT, {"image_token_index": "<image>"},
                       {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                        "image_token": "<image>"}, _PALIGEMMA),
    "mistral3": _Spec(("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                       "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), {"image_token_index": "[IMG]"},
                      {**_LLAMA_NAMED}, _MISTRAL3),
    "internvl": _Spec(_QWEN_FRONT + ("<img>", "</img>", "<video>"), {"image_token_id": "<IMG_CONTEXT>"},
                      {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "start_image_token": "<img>",
                       "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
                      _chatml(None, "<IMG_CONTEXT>\n", "<video>\n")),
}
SUPPORTED = tuple(f for f in FAMILIES if f in _SPECS)


# ----------------------------------------------------------------------------- tokenizer

def tiny_tokenizer(family: str) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly VOCAB ids for `family`.

    ids 0.. hold the family's front tokens (bos/eos/pad, turn markers, ...), then the 256 bytes and the
    merges learned from a fixed three-sentence corpus; unused ids up to the tail are `<unused_i>`; the
    tail tokens sit at the ids `tiny_config(family)` uses. Words merge, but whitespace and punctuation are
    always single tokens, so no token straddles a template / message boundary (see `chat_labels`).
    """
    import tokenizers as tk
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    spec = _SPECS[family]
    config = tiny_config(family)
    tail = {int(getattr(config, attr)): token for attr, token in spec.tail.items()}
    split = pre.Sequence([pre.Split(tk.Regex(_SPLIT), behavior="isolated"),
                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained = tk.Tokenizer(tk.models.BPE())
    trained.pre_tokenizer = split
    trained.train_from_iterator(_CORPUS, tk.trainers.BpeTrainer(
        vocab_size=VOCAB - 64, special_tokens=list(spec.front), show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet()))
    vocab = trained.get_vocab()
    if len(vocab) > min(tail):
        raise ValueError(f"{family}: {len(vocab)} trained ids overlap the tail ids {sorted(tail)}")
    vocab.update({tail.get(i, f"<unused_{i}>"): i for i in range(len(vocab), VOCAB)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = split
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in (*spec.front, *tail.values())])
    if spec.bos:  # Llama / Mistral sentencepiece tokenizers prepend <s>
        tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                              special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_specific_special_tokens=dict(spec.named))


# ----------------------------------------------------------------------------- processors

def _image_parts(family: str) -> dict[str, Any]:
    """The image processor (+ video processor) and processor kwargs of `family`, for 16 x 16 images with
    4 x 4 patches: the processor must insert exactly `families.image_token_count(family)` tokens."""
    import transformers as tf

    square = {"height": IMAGE, "width": IMAGE}
    pixels = {"shortest_edge": IMAGE * IMAGE, "longest_edge": IMAGE * IMAGE}  # Qwen: min = max = one 16 x 16 image
    qwen = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": 2, "size": pixels}
    if family in ("llava", "llava_next"):  # CLIP: CLS + patches, the "default" strategy drops CLS
        clip = {"size": {"shortest_edge": IMAGE}, "crop_size": square}
        image = (tf.CLIPImageProcessor(**clip) if family == "llava"
                 else tf.LlavaNextImageProcessor(**clip, image_grid_pinpoints=[[IMAGE, IMAGE]]))
        return {"image_processor": image, "patch_size": PATCH, "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1}
    if family == "llava_onevision":  # SigLIP: no CLS, "full" strategy
        return {"image_processor": tf.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=[[IMAGE, IMAGE]]),
                "video_processor": tf.LlavaOnevisionVideoProcessor(size=square),
                "num_image_tokens": _GRID * _GRID, "vision_feature_select_strategy": "full"}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {"image_processor": tf.Qwen2VLImageProcessor(**qwen), "video_processor": tf.Qwen2VLVideoProcessor(**qwen)}
    if family == "qwen3_vl":
        return {"image_processor": tf.Qwen2VLImageProcessor(**qwen), "video_processor": tf.Qwen3VLVideoProcessor(**qwen)}
    if family == "idefics3":  # no splitting: one global image of image_seq_len = (4 x 4) / scale_factor^2 tokens
        edge = {"longest_edge": IMAGE}
        return {"image_processor": tf.Idefics3ImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge),
                "image_seq_len": (_GRID // 2) ** 2}
    if family == "gemma3":
        return {"image_processor": tf.Gemma3ImageProcessor(size=square), "image_seq_length": 4}
    if family == "paligemma":
        image = tf.SiglipImageProcessor(size=square)
        image.image_seq_length = _GRID * _GRID  # PaliGemmaProcessor reads it from the image processor
        return {"image_processor": image}
    if family == "mistral3":  # the processor resizes to multiples of patch x spatial_merge_size
        return {"image_processor": tf.PixtralImageProcessor(size={"longest_edge": IMAGE}, patch_size=PATCH),
                "patch_size": PATCH, "spatial_merge_size": 2}
    if family == "internvl":  # tiles of 16 x 16 (InternVLProcessor crops to patches): a 16 x 16 image is one tile
        return {"image_processor": tf.GotOcr2ImageProcessor(size=square),
                "video_processor": tf.InternVLVideoProcessor(size=square), "image_seq_length": (_GRID // 2) ** 2}
    raise ValueError(f"unknown family {family!r}")


PROCESSOR_CLASS: dict[str, str] = {
    "llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor", "llava_onevision": "LlavaOnevisionProcessor",
    "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor", "gemma3": "Gemma3Processor", "paligemma": "PaliGemmaProcessor",
    "mistral3": "PixtralProcessor", "internvl": "InternVLProcessor",
}


def tiny_processor(family: str) -> Any:
    """`family`'s own processor class (PROCESSOR_CLASS), offline, for the tiny model of `pipeline.models.presets.tiny`."""
    import transformers as tf

    if family not in _SPECS:
        raise ValueError(f"unsupported family {family!r}: expected one of {', '.join(SUPPORTED)}")
    cls = getattr(tf, PROCESSOR_CLASS[family])
    return cls(tokenizer=tiny_tokenizer(family), chat_template=_SPECS[family].template, **_image_parts(family))
