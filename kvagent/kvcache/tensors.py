"""In-memory KV cache of one document: per-layer keys and values plus the token ids they encode, and what
its leading positions are a copy of (:class:`KVSource`)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's KV: ``num_layers`` pairs of ``[1, num_kv_heads, seq, head_dim]`` tensors."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


#: sources a KV's lineage keeps (itself and the prefixes it was computed after): past it, the ones just
#: above the first are forgotten (they name fewer positions than the newer ones, and other principals' KV
#: less often than the first, often a published artifact's)
MAX_LINEAGE = 8


@dataclass(frozen=True)
class KVSource:
    """What a KV's first ``n`` positions are: a copy of the KV that ``digest`` names, bit for bit.

    ``digest`` names KV bytes, never token ids alone: for a published artifact
    ``artifact:<key>:<codec>:<payload sha256>`` (its checksum-verified bytes; ``published`` True: the same
    bytes for everyone entitled to the artifact, ``artifact`` its key); for KV computed or stored here a name
    of that one computation or stored artifact (``published`` False: private to the namespace holding it;
    ``artifact``: the published artifact its positions copy, if any, so that deleting it reaches them). Two
    KVs with equal digests hold the same K/V over their common ``n``; the batching engine shares a prefix
    only on that proof.

    ``base``: for KV computed after a prefix (its positions copied in first), the prefix's source, naming
    those first ``base.n`` positions; so a KV extended from a short prefix still names its own positions
    (``digest``), and one extended from a published artifact still names the artifact's (``base``). See
    :meth:`lineage`."""

    digest: str
    n: int
    published: bool = False
    artifact: str | None = None
    base: KVSource | None = None

    def clipped(self, n: int) -> KVSource:
        """The same source over at most ``n`` positions (its base's, when they lie within the base)."""
        if n >= self.n:
            return self
        if self.base is not None and n <= self.base.n:
            return self.base.clipped(n)
        return replace(self, n=n)

    def lineage(self) -> tuple[KVSource, ...]:
        """This source and those it copies (its base, the base's base, ...), most positions first: each
        names the first ``n`` positions of this KV."""
        out: list[KVSource] = []
        s: KVSource | None = self
        while s is not None:
            out.append(s)
            s = s.base
        return tuple(out)

    def published_part(self) -> KVSource | None:
        """The published artifact's source in this lineage (naming the most positions), or None."""
        return next((s for s in self.lineage() if s.published), None)


def computed_source(n: int, base: KVSource | None = None) -> KVSource:
    """A private source for ``n`` positions just computed: named by nothing else (a fresh random name);
    ``base``: the source of the prefix whose positions it copied first (at most ``MAX_LINEAGE`` - 1 deep)."""
    if base is not None:
        chain = base.lineage()
        if len(chain) >= MAX_LINEAGE:  # keep the newest and the first (a published artifact, often)
            kept, base = (*chain[: MAX_LINEAGE - 2], chain[-1]), None
            for s in reversed(kept):
                base = replace(s, base=base)
    artifact = base.artifact if base is not None else None
    return KVSource("computed:" + secrets.token_hex(16), n, artifact=artifact, base=base)


@dataclass(frozen=True)
class KVCache:
    """Keys and values for ``token_ids`` (1-D int64), one ``[1, H, S, D]`` tensor per layer each.

    Treated as immutable: engines copy-on-extend, so a resume never changes these tensors. ``source``: what
    its leading positions are a copy of (None: unknown, never shared between requests by the batching engine).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor
    source: KVSource | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("KVCache needs the same, non-zero number of key and value layers")
        n = int(self.token_ids.numel())
        for t in (*self.keys, *self.values):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != n:
                raise ValueError(
                    f"KV tensor of shape {tuple(t.shape)} does not hold {n} tokens as [1, H, S, D]"
                )

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def layout(self) -> KVLayout:
        k = self.keys[0]
        return KVLayout(num_layers=len(self.keys), num_kv_heads=int(k.shape[1]), head_dim=int(k.shape[3]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def truncate(self, n: int) -> KVCache:
        """The KV of the first ``n`` tokens (views, no copy). Valid because attention is causal."""
        if not 0 < n <= self.n_tokens:
            raise ValueError(f"cannot truncate a {self.n_tokens}-token KV to {n} tokens")
        if n == self.n_tokens:
            return self
        return KVCache(
            keys=tuple(k[:, :, :n] for k in self.keys),
            values=tuple(v[:, :, :n] for v in self.values),
            token_ids=self.token_ids[:n],
            source=None if self.source is None else self.source.clipped(n),
        )

    def with_source(self, source: KVSource | None) -> KVCache:
        """The same tensors with ``source`` (clipped to this KV's length)."""
        return replace(self, source=None if source is None else source.clipped(self.n_tokens))


def extended_source(prefix: KVCache | None, n: int) -> KVSource:
    """The source of an ``n``-position KV computed after ``prefix`` (its positions copied in first): a fresh
    computed one whose base is the prefix's own source where it has one (so the positions both name stay
    named), the prefix's source itself where the KV adds no position to it."""
    src = None if prefix is None or prefix.source is None else prefix.source.clipped(prefix.n_tokens)
    if src is not None and n <= src.n:
        return src.clipped(n)
    return computed_source(n, src)
