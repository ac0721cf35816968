"""How a document and a question become token ids.

The chat template is rendered once with sentinel strings and split into three fixed pieces::

    <prefix> DOCUMENT <middle> QUESTION <tail>

The document's ids are ``ids(prefix) + ids(document)``; a question's ids are
``ids(middle + question + tail)``. Ids are concatenated, never re-tokenised as one string, so
the document's KV is identical for every question and a resume sees exactly the ids a full
prefill of ``document_ids + question_ids`` sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..kvcache.identity import template_hash

_DOC = "\x00KVAGENT_DOCUMENT\x00"
_QUESTION = "\x00KVAGENT_QUESTION\x00"
DEFAULT_LAYOUT = _DOC + "\n\nQuestion: " + _QUESTION


@dataclass(frozen=True)
class PromptTemplate:
    """The fixed text around a document and a question, and the ids of what precedes the document."""

    prefix_text: str
    middle_text: str
    tail_text: str
    prefix_ids: tuple[int, ...]
    stop_token_ids: tuple[int, ...]

    @property
    def hash(self) -> str:
        return template_hash(
            self.prefix_ids, self.prefix_text + "\x00" + self.middle_text + "\x00" + self.tail_text
        )

    def document_ids(self, tokenizer: Any, text: str) -> list[int]:
        return list(self.prefix_ids) + list(tokenizer.encode(text, add_special_tokens=False))

    def question_ids(self, tokenizer: Any, question: str) -> list[int]:
        return list(tokenizer.encode(self.middle_text + question + self.tail_text, add_special_tokens=False))


def build_template(tokenizer: Any, system_prompt: str | None = None) -> PromptTemplate:
    """Derive the template from the tokenizer's chat template, or a plain Q/A layout without one."""
    stops = _stop_ids(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": DEFAULT_LAYOUT})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(_DOC) != 1 or rendered.count(_QUESTION) != 1:
            raise ConfigError("the tokenizer's chat template does not place the user message verbatim")
        prefix, rest = rendered.split(_DOC)
        middle, tail = rest.split(_QUESTION)
    else:
        prefix = (system_prompt + "\n\n") if system_prompt else ""
        middle, tail = "\n\nQuestion: ", "\nAnswer:"
    prefix_ids = list(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and _adds_bos(tokenizer) and (not prefix_ids or prefix_ids[0] != bos):
        prefix_ids.insert(0, bos)
    return PromptTemplate(prefix, middle, tail, tuple(prefix_ids), stops)


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return tuple(sorted(ids))
