"""The one renderer: prompts and training labels through the processor's own chat template, for every family.

Training (`data.chat_collate`), evaluation (`eval.generate`, `eval.long_context`, the test loss) and the demo
render every conversation here, so a model is asked the way it was trained and tokenizes the same text the
same way. LLaVA-1.5 is no exception: its processor carries the LLaVA-1.5 conversation template
("USER: <image>\\n{prompt} ASSISTANT: {answer}</s>"; registered by `pipeline.models` on a LLaVA processor
saved without one).

- `to_template_messages(messages)`: canonical messages (content a string with `<image>` tags, `data.conversations`)
  as the template wants them (content lists of {"type": "image"} / {"type": "text"} items).
- `chat_prompt(processor, user_text, images)`: the generation prompt of one user turn (images first, as
  LLaVA asks), for evaluation and the demo.
- `chat_labels(processor, messages, images)`: a padded training batch labelled on the assistant replies (each
  with its end-of-turn marker, found turn by turn: `render`), moved through the processor's own text edits and
  mapped to tokens by the tokenizer's offsets. Nothing is counted by hand; image tokens and padding are always -100.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from data.prompts import IMAGE_TOKEN

IGNORE_INDEX = -100

# LLaVA-1.5's conversation (llava-hf/llava-1.5 style): "{system} USER: <image>\n{text} ASSISTANT: {answer}</s>"
USER_ROLE, ASSISTANT_ROLE = "USER", "ASSISTANT"
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_ROLE + ": {% elif message['role'] == 'assistant' %}"
    + ASSISTANT_ROLE + ": {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_ROLE + ":{% endif %}"
)


class MissingChatTemplateError(ValueError):
    """A processor without a chat template: every prompt is rendered through one."""


def ensure_chat_template(processor: Any, name: str, template_file: str | None = None) -> Any:
    """`processor` with a chat template: `template_file`'s (a Jinja file) when given; LLaVA-1.5's conversation
    template on a LLaVA processor saved without one (llava-hf's LLaVA-1.5 text); else its own, or
    MissingChatTemplateError in one line naming `name`."""
    from pathlib import Path

    from transformers import LlavaProcessor

    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise MissingChatTemplateError(f"chat template {path}: not a file (a Jinja chat template, e.g. the hub's "
                                           "chat_template.jinja)")
        processor.chat_template = path.read_text()
        processor.tokenizer.chat_template = processor.chat_template
    elif type(processor) is LlavaProcessor and (not getattr(processor, "chat_template", None)
                                                 or not end_of_turn_ids(processor)):
        # none, or llava-hf's LLaVA-1.5 template, which ends a reply with " " where LLaVA-1.5 trained "</s>"
        # (its conv_vicuna_v1): trained through it a model would never learn to stop. Both render the same
        # generation prompt ("USER: <image>\n{prompt} ASSISTANT:").
        processor.chat_template = LLAVA15_CHAT_TEMPLATE
    if not getattr(processor, "chat_template", None):
        raise MissingChatTemplateError(
            f"{name}: its processor has no chat template, and every prompt is rendered through one: give one as a "
            "Jinja file (model.chat_template=FILE in a run, --chat-template FILE for eval and the demo; PaliGemma's "
            "hub checkpoints ship none), or use a checkpoint whose processor has one (e.g. the -Instruct / -hf one)")
    return processor

_REPLY_PROBE = "Zq9 reply probe"


def end_of_turn_ids(processor: Any) -> list[int]:
    """The special tokens a template writes right after an assistant reply, labelled with it (Llama-3's
    <|eot_id|>, Qwen's <|im_end|>, Gemma's <end_of_turn>, LLaVA-1.5's </s>): what training teaches the model to
    end a reply with, so generation must stop there. Empty when the template ends a reply with plain text."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello"}]},
                {"role": "assistant", "content": [{"type": "text", "text": _REPLY_PROBE}]}]
    try:
        batch = chat_labels(processor, [messages], [[Image.new("RGB", (32, 32))]])
    except Exception:  # noqa: BLE001 - a template that cannot render the probe has no end we can find
        return []
    ids = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    special = (set(processor.tokenizer.all_special_ids) | {
        i for i, t in processor.tokenizer.added_tokens_decoder.items() if t.special}) - {processor.tokenizer.unk_token_id}
    tail: list[int] = []
    for token in reversed(ids):
        if token not in special:
            break
        tail.insert(0, token)
    return tail


def user_content(text: str, images: int = 0) -> list[dict[str, Any]]:
    """Template content of a user turn: `images` leading images, then `text` with its own `<image>` tags as
    image items in place. Whitespace inside the turn is kept (a template that moves images to the front still
    gets "Compare  and  please", not "Compareandplease"); the newline of LLaVA's "<image>\\n" goes with its tag."""
    items: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    parts = text.split(IMAGE_TOKEN)
    for k, piece in enumerate(parts):
        if k:
            items.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        piece = piece.lstrip() if k == 0 else piece
        piece = piece.rstrip() if k == len(parts) - 1 else piece
        if piece.strip():
            items.append({"type": "text", "text": piece})
    return items


def to_template_messages(messages: Sequence[dict[str, str]], carried_images: int = 0) -> list[dict[str, Any]]:
    """Canonical messages (string content with `<image>` tags) as content lists; `carried_images` images
    lead the first user turn (a row that continues a conversation sees the images of earlier turns)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "user":
            first = not any(o["role"] == "user" for o in out)
            out.append({"role": "user", "content": user_content(m["content"], carried_images if first else 0)})
        else:
            out.append({"role": m["role"], "content": [{"type": "text", "text": m["content"].strip()}]})
    return out


_SYSTEM_PROBE = "Zq9 system probe"


@functools.lru_cache(maxsize=32)
def _renders_system(template: str) -> bool:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": [{"type": "text", "text": _SYSTEM_PROBE}]},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    try:
        texts, spans = render_jinja_template(conversations=[messages], chat_template=template,
                                             return_assistant_tokens_mask=True)
    except Exception:  # noqa: BLE001 - a template that refuses a system turn (raise_exception) has none
        return False
    start = texts[0].find(_SYSTEM_PROBE)
    return start >= 0 and not any(a <= start < b for a, b in spans[0])


def fold_system(processor: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A template that does not render a system turn as such (PaliGemma's: it would pass for a reply, or vanish)
    gets the system text at the head of the first user turn's text, as its own paragraph."""
    if not messages or messages[0]["role"] != "system" or _renders_system(processor.chat_template or ""):
        return messages
    system = " ".join(c["text"] for c in messages[0]["content"] if c["type"] == "text").strip()
    rest = [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            content = [dict(c) for c in m["content"]]
            text = next((c for c in content if c["type"] == "text"), None)
            if text is None:
                content.append({"type": "text", "text": system})
            else:
                text["text"] = f"{system}\n\n{text['text']}"
            m["content"] = content
            break
    return rest


def chat_prompt(processor: Any, user_text: str, images: int = 1) -> str:
    """The rendered generation prompt of one user turn with `images` images before its text."""
    messages = [{"role": "user", "content": user_content(user_text, images)}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def messages_prompt(processor: Any, messages: Sequence[dict[str, str]]) -> str:
    """The rendered generation prompt of canonical messages ending in a user turn (earlier turns as context)."""
    rendered = fold_system(processor, to_template_messages(messages))
    return processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)


def add_special_tokens_for(processor: Any, texts: Sequence[str]) -> bool:
    """As `processor.apply_chat_template` tokenises: a template that writes the bos itself gets no second one."""
    bos = getattr(processor.tokenizer, "bos_token", None)
    return not (bos and texts and texts[0].startswith(bos))


def _insertion_map(rendered: str, prepared: str) -> list[int]:
    """Position in `prepared` of every character of `rendered` (plus one past the end), where `prepared`
    is `rendered` with text inserted (PaliGemma's processor adds `<bos>` after the image and a final
    '\\n'). ValueError if the processor changed the text in any other way."""
    if rendered == prepared:
        return list(range(len(rendered) + 1))
    where = [0] * (len(rendered) + 1)
    for op, a0, a1, b0, _ in difflib.SequenceMatcher(None, rendered, prepared, autojunk=False).get_opcodes():
        if op not in ("equal", "insert"):
            raise ValueError(f"the processor {op}d template text ({rendered[a0:a1]!r}); cannot place the labels")
        for k in range(a0, a1):
            where[k] = b0 + k - a0
    where[len(rendered)] = len(prepared)
    return where


def _expanded(position: int, replacements: Sequence[dict[str, Any]]) -> int:
    """Where a position of the processor's input text lands once its image placeholders are expanded."""
    shift = 0
    for r in replacements:
        if r["span"][1] <= position:
            shift += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
    return position + shift


GENERATION_BLOCK = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


@functools.lru_cache(maxsize=8192)
def _render_cached(template: str, conversation: str, add_generation_prompt: bool, special: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(conversations=[json.loads(conversation)], chat_template=template,
                                     add_generation_prompt=add_generation_prompt, **json.loads(special))
    return texts[0]


def render_text(processor: Any, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """One conversation rendered with the processor's chat template and the tokenizer's special tokens as template
    variables (as `processor.apply_chat_template` renders it). Memoised: a collator renders the same prefixes of a
    conversation many times (lengths, then the reply spans turn by turn)."""
    return _render_cached(processor.chat_template, json.dumps(list(conversation), sort_keys=True),
                          add_generation_prompt, json.dumps(processor.tokenizer.special_tokens_map, sort_keys=True))



def _prefix_spans(processor: Any, conversation: Sequence[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Reply spans of a template without `{% generation %}` blocks (most hub templates: Qwen2.5-VL's, SmolVLM's...):
    a reply is what rendering the conversation up to it adds to the rendering up to its generation prompt,
    its end-of-turn marker included, whitespace around it not (LLaMA-Factory and TRL label the same tokens)."""
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        earlier = render_text(processor, conversation[:i], add_generation_prompt=False)
        before = render_text(processor, conversation[:i], add_generation_prompt=True)
        upto = render_text(processor, conversation[:i + 1], add_generation_prompt=False).rstrip()
        if not (upto.startswith(earlier) and text.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as the sum of its turns (it rewrites "
                             "earlier turns), so replies cannot be told apart: give the processor a template with "
                             "{% generation %} ... {% endgeneration %} around each assistant reply")
        # where the reply starts: past the generation prompt, or past as much of it as the rendered turn repeats
        # (LLaVA-OneVision's prompt is "<|im_start|>assistant\n", its rendered turn "<|im_start|>assistant \n")
        start = len(os.path.commonprefix([before, upto]))
        start += len(upto[start:]) - len(upto[start:].lstrip())
        spans.append((start, len(upto)))
    return spans


def render(processor: Any, conversations: Sequence[Sequence[dict[str, Any]]], add_generation_prompt: bool = False,
           spans: str = "turns") -> tuple[list[str], list[list[tuple[int, int]]]]:
    """(rendered texts, per text the character spans of its assistant replies), with the processor's chat template
    and the tokenizer's special tokens as template variables (as `processor.apply_chat_template` renders them).

    The spans are found turn by turn (`_prefix_spans`: every reply with its end-of-turn marker, whatever the
    template); `spans="blocks"` takes the template's `{% generation %}` blocks instead, which is also the fallback
    for a template that rewrites earlier turns. Blocks alone are not trusted: llava-hf's OneVision template puts
    its `<|im_end|>` outside them, so a model trained on them would never learn to stop."""
    from transformers.utils.chat_template_utils import render_jinja_template

    has_blocks = bool(GENERATION_BLOCK.search(processor.chat_template or ""))
    if spans == "turns" or not has_blocks:
        texts = [render_text(processor, c, add_generation_prompt) for c in conversations]
        try:
            return texts, [_prefix_spans(processor, c, t) for c, t in zip(conversations, texts)]
        except ValueError:
            if not has_blocks:
                raise
    return render_jinja_template(conversations=[list(c) for c in conversations], chat_template=processor.chat_template,
                                 return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt,
                                 **processor.tokenizer.special_tokens_map)


def multimodal_ids(processor: Any) -> set[int]:
    """Ids of every image / video placeholder token the processor inserts (never labelled)."""
    tok = processor.tokenizer
    found = [*(getattr(processor, "image_token_ids", None) or []), getattr(processor, "image_token_id", None),
             getattr(processor, "video_token_id", None), getattr(tok, "image_token_id", None),
             getattr(tok, "video_token_id", None)]
    return {i for i in found if isinstance(i, int)}


def chat_labels(processor: Any, messages: Sequence[Any], images: Sequence[Any],
                spans: str = "turns") -> dict[str, torch.Tensor]:
    """A padded training batch of chat conversations, labelled on the assistant replies only.

    Args:
        processor: a processor with a chat template (the replies are found turn by turn, or from its
            `{% generation %}` blocks with `spans="blocks"`: see `render`).
        messages: one conversation (a list of {"role", "content"} messages, content a list of
            {"type": "image"} / {"type": "text", "text"} items) or a list of them.
        images: the images of one conversation, in order, or one such list per conversation.

    Returns:
        The processor's tensors (input_ids, attention_mask, pixel_values and its extras such as
        image_grid_thw, image_sizes, mm_token_type_ids / token_type_ids, pixel_attention_mask) and
        `labels`: the input ids on tokens that overlap an assistant span, -100 elsewhere (system and user
        turns, role markers, image tokens, padding). For PaliGemma `token_type_ids` is 0 up to the first
        reply and 1 from there: its prefix-LM mask is bidirectional where it is 0, so the processor's
        all-zero ids would let every token see the answers.
    """
    batched = bool(messages) and isinstance(messages[0], (list, tuple))
    convs = list(messages) if batched else [messages]
    per_conv = [list(x) for x in images] if batched else [list(images)]
    texts, reply_spans = render(processor, convs, spans=spans)
    has_images = any(per_conv)
    enc = processor(text=list(texts), images=per_conv if has_images else None, padding=True,
                    add_special_tokens=add_special_tokens_for(processor, texts), return_offsets_mapping=True,
                    return_text_replacement_offsets=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")
    replacements = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
    prepared = processor.prepare_inputs_layout(images=per_conv if has_images else None, text=list(texts))[1]
    ids = enc["input_ids"]
    assistant = torch.zeros_like(ids, dtype=torch.bool)
    for row, (text, ready, row_spans) in enumerate(zip(texts, prepared, reply_spans)):
        where = _insertion_map(text, ready)
        for start, end in row_spans:
            if end <= start:  # an empty reply
                continue
            first = _expanded(where[start], replacements[row])
            last = _expanded(where[end - 1], replacements[row]) + 1
            tok_start, tok_end = offsets[row, :, 0], offsets[row, :, 1]
            assistant[row] |= (tok_start < last) & (tok_end > first) & (tok_end > tok_start)
    keep = assistant & enc["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(multimodal_ids(processor))))
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    out["labels"] = ids.masked_fill(~keep, IGNORE_INDEX)
    if "pixel_attention_mask" in out:  # Idefics3 / SmolVLM: int64 per pixel (15 MB per 13-tile sample); a mask,
        out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()  # as the model's own default: 8x smaller
    from transformers import PaliGemmaProcessor

    if isinstance(processor, PaliGemmaProcessor):
        out["token_type_ids"] = (keep.long().cumsum(dim=1) > 0).long()
    return out
