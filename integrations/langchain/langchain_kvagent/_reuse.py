"""Generate from arbitrary prompt ids through kvagent's prompt-turn core.

LangChain hands a model a whole prompt, not a (document, question) pair, so reuse is found by token ids:
``kvagent.PromptTurns`` (the same core the OpenAI-compatible endpoint uses) resolves the KV of the prompt
minus its last token from the best tier that has any of it (this process's memory, the local store, or the
registry, with its cost policy, verification, entitlements and fallback), leaves only what no tier covers to
the agent's batching engine, which prefills it in chunks between its decode steps (calls from several threads
decode together), and keeps the prompt's KV so the next prompt sharing its beginning resumes from it. Only kvagent's public API is used
here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvagent import (
    CacheInfo,
    GenerationParams,
    KVCache,
    PromptTurns,
    Reply,
    Runtime,
    TransformersBatchEngine,
    Turn,
)


def chat_template_ids(tokenizer: Any, messages: list[dict[str, Any]], **template_kw: Any) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, generation prompt added."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **template_kw
    )
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded  # a list before transformers 5
    return [int(t) for t in ids]


@dataclass
class Completion:
    """One generation: its text deltas while iterating, then the totals and what the cache did."""

    info: CacheInfo
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    seconds: float = 0.0
    #: seconds spent prefilling the prompt's uncached part (by the resolver, or by the engine's first forwards)
    prefill_seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """What LangChain shows as ``generation_info`` / ``response_metadata``."""
        return {
            "kv_status": self.info.status,
            "kv_hit": self.info.cached_tokens > 0,
            "kv_source": self.info.source or None,
            "kv_cached_tokens": self.info.cached_tokens,
            "kv_prefilled_tokens": self.info.prefilled_tokens,
            "kv_reason": self.info.reason,
            "kv_prefill_seconds": round(self.prefill_seconds, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 4),
        }


class PromptRunner:
    """Runs prompts (as token ids) on one runtime, resuming through its resolver."""

    def __init__(self, agent: Runtime, *, reuse: bool = True, save: bool = True, min_save_tokens: int = 32):
        self.agent = agent
        self.reuse = reuse
        self.save = save
        self.min_save_tokens = min_save_tokens
        batch = TransformersBatchEngine.shared(agent.engine, agent.tokenizer)
        self.turns = PromptTurns(batch, agent.resolver, agent.tokenizer)

    def prepare(self, ids: Sequence[int], params: GenerationParams, stops: Sequence[str] = ()) -> Turn:
        """Resolve the prompt's KV and build the request. A KV the resolver computes (a model that does not
        batch) is stored at once; one the reply's forward computes, in memory at once and in the store once
        the reply has ended."""
        return self.turns.prepare(ids, params, stops=stops, reuse=self.reuse, keep=self.save,
                                  min_save_tokens=self.min_save_tokens, defer_save=False)

    def start(self, ids: Sequence[int]) -> tuple[KVCache | None, list[int], CacheInfo]:
        """The KV of a prefix of ``ids`` (None with reuse off, or when nothing is cached: the caller prefills
        everything), the ids the first forward still has to run after it, and what it cost.

        Nothing is prefilled here: what no tier covers (a new question, or the whole prompt on a miss) is run
        by the reply's first forward, on the batching engine, in chunks between its decode steps.
        """
        turn = self.prepare(ids, GenerationParams(max_new_tokens=1))
        return turn.request.prefix, list(turn.request.prompt_ids), turn.info

    def run(
        self, ids: Sequence[int], params: GenerationParams, stops: Sequence[str] = ()
    ) -> tuple[Completion, Iterator[str]]:
        """Start a generation; iterate the returned deltas to drive it (the Completion fills in meanwhile)."""
        t0 = time.perf_counter()
        turn = self.prepare(ids, params, stops)
        done = Completion(info=turn.info, prompt_tokens=len(turn.ids), prefill_seconds=turn.prefill_seconds)
        return done, self._deltas(done, turn, params, stops, t0)

    def complete(self, ids: Sequence[int], params: GenerationParams, stops: Sequence[str] = ()) -> Completion:
        done, deltas = self.run(ids, params, stops)
        for _ in deltas:
            pass
        return done

    def _deltas(
        self, done: Completion, turn: Turn, params: GenerationParams, stops: Sequence[str], t0: float
    ) -> Iterator[str]:
        reply = Reply(self.agent.tokenizer, params, stops)
        done.token_ids = reply.stream.token_ids  # the ids shown (a stop token is not)
        yield from reply.deltas(self.turns.events(turn))
        done.prefill_seconds = turn.prefill_seconds
        done.finish_reason = reply.finish_reason
        done.text = reply.text
        done.seconds = time.perf_counter() - t0
