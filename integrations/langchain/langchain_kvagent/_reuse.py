"""Generate from arbitrary prompt ids, resuming from the longest cached KV that is a prefix of them.

LangChain hands a model a whole prompt, not a (document, question) pair, so reuse is found by
token ids: this process's in-memory KVs are compared directly, the local store is searched by
block hashes (as ``KVAgent._cached_prefix`` does). The KV of the prompt minus its last token is then
kept (memory and local store) so the next prompt sharing its beginning - the same document with
another question - resumes from it. Without reuse the prompt is prefilled in full: the reference path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kvagent import CacheInfo, GenerationParams, KVAgent, KVCache, block_hashes

from ._stops import scan


def chat_template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, generation prompt added."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded  # a list before transformers 5
    return [int(t) for t in ids]


def shared_prefix(cached: torch.Tensor, ids: torch.Tensor) -> int:
    """How many leading tokens two 1-D id tensors share."""
    m = min(int(cached.numel()), int(ids.numel()))
    if m == 0:
        return 0
    diff = (cached[:m] != ids[:m]).nonzero()
    return int(diff[0]) if diff.numel() else m


def longest_cached_prefix(agent: KVAgent, ids: Sequence[int]) -> tuple[KVCache | None, str]:
    """The longest KV (memory or local store) whose tokens are a prefix of ``ids``, truncated to it."""
    target = torch.as_tensor(list(ids), dtype=torch.int64)
    best: KVCache | None = None
    best_n, where = 0, ""
    with agent._lock:
        in_memory = list(agent._memory.values())
    for kv in in_memory:
        n = shared_prefix(kv.token_ids, target)
        if n > best_n:
            best, best_n, where = kv, n, "in memory"
    stored, why = _stored_prefix(agent, target, best_n)
    if stored is not None:
        best, best_n, where = stored, shared_prefix(stored.token_ids, target), "in the local store"
    if best is None:
        return None, f"no cached KV shares a prefix with the prompt ({why})"
    return best.truncate(best_n), f"reused {best_n} cached prompt tokens {where}"


def _stored_prefix(agent: KVAgent, target: torch.Tensor, to_beat: int) -> tuple[KVCache | None, str]:
    """The local-store artifact indexed under the longest shared block, if it can beat ``to_beat`` tokens."""
    block = agent.config.block_size
    hashes = block_hashes(agent.context, target.tolist(), block)
    hit = agent.store.find_prefix(hashes) if hashes else None
    if hit is None:
        return None, f"no stored KV shares the first {block}-token block"
    key, blocks = hit
    with agent._lock:
        if key in agent._memory:  # already compared above
            return None, "the best stored KV is also in memory"
    if (blocks + 1) * block <= to_beat:
        return None, "a KV in memory covers more"
    found = agent.store.get(key, expect=agent.expect)
    if found.artifact is None:
        return None, f"stored prefix candidate unusable: {found.reason}"
    kv = found.artifact.kv
    if shared_prefix(kv.token_ids, target) <= to_beat:
        return None, "a KV in memory covers more"
    agent._remember(key, kv)
    return kv, "hit"


@dataclass
class Completion:
    """One generation: its text deltas while iterating, then the totals and what the cache did."""

    info: CacheInfo
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """What LangChain shows as ``generation_info`` / ``response_metadata``."""
        return {
            "kv_status": self.info.status,
            "kv_hit": self.info.status == "prefix",
            "kv_cached_tokens": self.info.cached_tokens,
            "kv_prefilled_tokens": self.info.prefilled_tokens,
            "kv_reason": self.info.reason,
            "kv_prefill_seconds": round(self.info.prefill_seconds, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 4),
        }


class PromptRunner:
    """Runs prompts (as token ids) on one agent with longest-prefix KV reuse."""

    def __init__(self, agent: KVAgent, *, reuse: bool = True, save: bool = True, min_save_tokens: int = 32):
        self.agent = agent
        self.reuse = reuse
        self.save = save
        self.min_save_tokens = min_save_tokens

    def start(self, ids: Sequence[int]) -> tuple[KVCache | None, CacheInfo]:
        """The KV of ``ids[:-1]`` (None with reuse off: the caller prefills everything) and what it cost."""
        ids = [int(t) for t in ids]
        if not self.reuse:
            return None, CacheInfo("disabled", "KV reuse disabled: full prefill", 0, len(ids))
        context = ids[:-1]
        if not context:
            return None, CacheInfo("prefill", "one-token prompt", 0, len(ids))
        t0 = time.perf_counter()
        prefix, reason = longest_cached_prefix(self.agent, context)
        t1 = time.perf_counter()
        engine = self.agent.engine
        reused = prefix.n_tokens if prefix is not None else 0
        if prefix is None:
            kv = engine.prefill(context)
        elif reused < len(context):
            kv = engine.prefill_from(prefix, context[reused:])
        else:
            kv = prefix
        prefill_s = time.perf_counter() - t1
        if self.save and len(context) - reused >= self.min_save_tokens:
            key = self.agent.key_of(context)
            self.agent._save(key, kv, tuple(context))
            self.agent._remember(key, kv)
        status = "prefix" if reused else "prefill"
        info = CacheInfo(
            status, reason, reused, len(ids) - reused, load_seconds=t1 - t0, prefill_seconds=prefill_s
        )
        self.agent.counters["prefix_hits" if reused else "prefills"] += 1
        self.agent.counters["tokens_saved"] += reused
        return kv, info

    def run(
        self, ids: Sequence[int], params: GenerationParams, stops: Sequence[str] = ()
    ) -> tuple[Completion, Iterator[str]]:
        """Start a generation; iterate the returned deltas to drive it (the Completion fills in as it goes)."""
        t0 = time.perf_counter()
        ids = [int(t) for t in ids]
        kv, info = self.start(ids)
        tokens = self.agent.engine.stream(kv, ids[-1:] if kv is not None else ids, params)
        done = Completion(info=info, prompt_tokens=len(ids))
        return done, self._deltas(done, tokens, params, stops, t0)

    def complete(self, ids: Sequence[int], params: GenerationParams, stops: Sequence[str] = ()) -> Completion:
        done, deltas = self.run(ids, params, stops)
        for _ in deltas:
            pass
        return done

    def _deltas(
        self,
        done: Completion,
        tokens: Iterator[int],
        params: GenerationParams,
        stops: Sequence[str],
        t0: float,
    ) -> Iterator[str]:
        tokenizer = self.agent.tokenizer
        stop_ids = set(params.stop_token_ids)
        shown = ""
        stopped = False
        for tok in tokens:
            if tok in stop_ids:
                done.finish_reason = "stop"
                break
            done.token_ids.append(tok)
            text = tokenizer.decode(done.token_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            safe, stopped = scan(text, stops)
            if len(safe) > len(shown):
                yield safe[len(shown) :]
                shown = safe
            if stopped:
                done.finish_reason = "stop"
                break
        if not stopped:  # flush a held-back tail that never became a stop string
            text = tokenizer.decode(done.token_ids, skip_special_tokens=True)
            cut, hit = scan(text, stops)
            safe = cut if hit else text
            if hit:
                done.finish_reason = "stop"
            if len(safe) > len(shown):
                yield safe[len(shown) :]
                shown = safe
        done.text = shown
        done.seconds = time.perf_counter() - t0
