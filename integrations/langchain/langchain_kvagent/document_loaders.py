"""``KVDocumentLoader``: load documents and read each one into the KV cache on the way."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

from kvagent import KVAgent
from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

Source = Union[BaseLoader, Document, str, os.PathLike]  # noqa: UP007 - a runtime alias


class KVDocumentLoader(BaseLoader):
    """Wrap a loader, paths (``os.PathLike``), texts (``str``) or Documents; prefill-and-cache each.

    Each yielded Document carries ``kv_key``, ``kv_status`` (``"prefill"``, ``"memory"``,
    ``"local"``...), ``kv_tokens`` and ``kv_reason`` in its metadata. A document's KV is cached under
    the agent's prompt layout, so a prompt that starts with the document the same way resumes from it.
    ``agent`` may be a ``KVAgent`` or a ``KVAgentLLM``/``ChatKVAgent`` (whose agent is used).

    A document longer than the model's context raises ``kvagent.errors.ContextLengthError`` before any
    prefill, unless the agent opts in (``KVAgent(allow_context_overflow=True)``,
    ``KVAGENT_ALLOW_CONTEXT_OVERFLOW=1``) for a model known to extrapolate.
    """

    def __init__(self, source: Source | Iterable[Source], *, agent: Any) -> None:
        self.agent: KVAgent = agent if isinstance(agent, KVAgent) else agent.kv_agent
        self.sources: list[Source] = (
            [source] if isinstance(source, (BaseLoader, Document, str, os.PathLike)) else list(source)
        )

    def lazy_load(self) -> Iterator[Document]:
        for source in self.sources:
            if isinstance(source, BaseLoader):
                yield from (self._read(doc) for doc in source.lazy_load())
            elif isinstance(source, Document):
                yield self._read(source)
            elif isinstance(source, os.PathLike):
                text = Path(source).read_text(encoding="utf-8")
                yield self._read(Document(page_content=text, metadata={"source": str(source)}))
            elif isinstance(source, str):
                yield self._read(Document(page_content=source))
            else:
                raise TypeError(f"KVDocumentLoader cannot load a {type(source).__name__}")

    def _read(self, doc: Document) -> Document:
        if not doc.page_content:
            meta = {"kv_key": None, "kv_status": "skipped", "kv_tokens": 0, "kv_reason": "empty document"}
            return Document(page_content=doc.page_content, metadata={**doc.metadata, **meta}, id=doc.id)
        handle = self.agent.read(doc.page_content)
        meta = {
            "kv_key": handle.key,
            "kv_status": handle.cache.status,
            "kv_tokens": handle.n_tokens,
            "kv_reason": handle.cache.reason,
        }
        return Document(page_content=doc.page_content, metadata={**doc.metadata, **meta}, id=doc.id)
