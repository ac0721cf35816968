"""Content addressing: document keys, the block-hash chain, key validation and fingerprints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvagent.errors import InvalidKeyError
from kvagent.kvcache.identity import (
    FORMAT_VERSION,
    KeyContext,
    block_hashes,
    document_key,
    sha256_hex,
    template_hash,
    tensor_fingerprint,
    token_bytes,
    validate_key,
)

CTX = KeyContext(
    model_fingerprint=sha256_hex(b"model"),
    tokenizer_fingerprint=sha256_hex(b"tokenizer"),
    dtype="float32",
    position_offset=0,
    template_hash=template_hash([1, 2, 3], "{{ document }}"),
)
TOKENS = [5, 17, 4_000_000_000, 0, 42, 42, 7, 99_999, 3]


def test_key_is_a_valid_stable_digest() -> None:
    k = document_key(CTX, TOKENS)
    assert validate_key(k) == k
    assert document_key(CTX, TOKENS) == k
    assert document_key(dataclasses.replace(CTX), list(TOKENS)) == k


def test_key_ignores_the_container_of_the_token_ids() -> None:
    k = document_key(CTX, TOKENS)
    assert document_key(CTX, np.array(TOKENS, dtype=np.uint32)) == k
    assert document_key(CTX, tuple(TOKENS)) == k


_STABILITY_SCRIPT = """
import json, sys
from kvagent.kvcache.identity import KeyContext, block_hashes, document_key
ctx = KeyContext(**json.loads(sys.argv[1]))
tokens = json.loads(sys.argv[2])
print(json.dumps([document_key(ctx, tokens), block_hashes(ctx, tokens, block_size=2)]))
"""


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_key_is_the_same_in_another_process(hashseed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [sys.executable, "-c", _STABILITY_SCRIPT, json.dumps(dataclasses.asdict(CTX)), json.dumps(TOKENS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    key, blocks = json.loads(out.stdout)
    assert key == document_key(CTX, TOKENS)
    assert blocks == block_hashes(CTX, TOKENS, block_size=2)


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": sha256_hex(b"other model")},
        {"tokenizer_fingerprint": sha256_hex(b"other tokenizer")},
        {"dtype": "bfloat16"},
        {"position_offset": 1},
        {"template_hash": template_hash([1, 2, 4], "{{ document }}")},
        {"format_version": FORMAT_VERSION + 1},
    ],
    ids=lambda c: next(iter(c)),
)
def test_key_changes_with_every_context_field(change: dict) -> None:
    other = dataclasses.replace(CTX, **change)
    assert document_key(other, TOKENS) != document_key(CTX, TOKENS)
    assert block_hashes(other, TOKENS, block_size=3)[0] != block_hashes(CTX, TOKENS, block_size=3)[0]


def test_key_changes_with_the_tokens() -> None:
    base = document_key(CTX, TOKENS)
    variants = {"base": base}
    for i in range(len(TOKENS)):
        changed = list(TOKENS)
        changed[i] ^= 1
        variants[f"flip {i}"] = document_key(CTX, changed)
    variants["appended"] = document_key(CTX, [*TOKENS, 0])
    variants["dropped last"] = document_key(CTX, TOKENS[:-1])
    variants["swapped"] = document_key(CTX, [TOKENS[1], TOKENS[0], *TOKENS[2:]])
    variants["empty"] = document_key(CTX, [])
    assert len(set(variants.values())) == len(variants), variants


def test_template_hash_depends_on_ids_and_text() -> None:
    base = template_hash([1, 2], "a")
    assert template_hash([1, 2], "a") == base
    assert (
        len({base, template_hash([1, 3], "a"), template_hash([1, 2], "b"), template_hash([1, 2], None)}) == 4
    )


def test_block_hashes_cover_only_full_blocks() -> None:
    tokens = list(range(100, 114))  # 3 full blocks of 4 and 2 spare tokens
    hashes = block_hashes(CTX, tokens, block_size=4)
    assert len(hashes) == 3
    assert all(validate_key(h) for h in hashes)
    assert block_hashes(CTX, tokens[:12], block_size=4) == hashes
    assert block_hashes(CTX, tokens[:11], block_size=4) == hashes[:2]
    assert block_hashes(CTX, tokens[:3], block_size=4) == []


def test_prompts_sharing_a_prefix_share_exactly_its_full_blocks() -> None:
    a = list(range(200, 214))
    b = a[:9] + [1] + a[10:] + [7, 7, 7]  # differs from a at token 9, inside block 2
    ha = block_hashes(CTX, a, block_size=4)
    hb = block_hashes(CTX, b, block_size=4)
    assert ha[:2] == hb[:2]
    assert ha[2] != hb[2]
    assert hb[3] not in ha
    # a change in the first token changes every later block: the hashes are a chain
    c = [a[0] + 1, *a[1:]]
    assert not set(block_hashes(CTX, c, block_size=4)) & set(ha)


def test_block_hash_equals_no_key_and_depends_on_block_size() -> None:
    tokens = list(range(8))
    assert block_hashes(CTX, tokens, block_size=8)[0] != document_key(CTX, tokens)
    assert block_hashes(CTX, tokens, block_size=8)[0] != block_hashes(CTX, tokens, block_size=4)[1]


@pytest.mark.parametrize("size", [0, -4])
def test_block_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError):
        block_hashes(CTX, TOKENS, block_size=size)


@pytest.mark.parametrize(
    "bad",
    [
        "../" + "a" * 61,
        "a" * 62 + "/.",
        "..",
        "A" * 64,
        "a" * 63 + "F",
        "a" * 63,
        "a" * 65,
        "a" * 64 + "\n",
        " " + "a" * 63,
        "g" * 64,
        "",
        None,
        b"a" * 64,
    ],
)
def test_validate_key_rejects(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(bad)  # type: ignore[arg-type]


def test_validate_key_accepts_a_digest() -> None:
    k = "0123456789abcdef" * 4
    assert validate_key(k) == k


def test_token_bytes_is_little_endian_uint32() -> None:
    assert token_bytes([1, 256, 2**32 - 1]) == b"\x01\0\0\0" + b"\0\x01\0\0" + b"\xff\xff\xff\xff"
    assert token_bytes([]) == b""


@pytest.mark.parametrize("bad", [[1, -1], [2**32], np.array([[1, 2], [3, 4]]), [[1, 2]]])
def test_token_bytes_rejects(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        token_bytes(bad)  # type: ignore[arg-type]


def _weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("layer.0.weight", torch.randn(4, 3, generator=g)),
        ("layer.0.bias", torch.randn(4, generator=g)),
        ("embed", torch.randn(5, 2, generator=g).to(torch.bfloat16)),
    ]


CONFIG = {"hidden_size": 64, "rope_theta": 10000.0, "layers": (1, 2), "act": "silu"}


def test_tensor_fingerprint_is_stable_and_order_independent() -> None:
    fp = tensor_fingerprint(_weights(), CONFIG)
    assert validate_key(fp) == fp
    assert tensor_fingerprint(_weights(), dict(CONFIG)) == fp
    assert tensor_fingerprint(list(reversed(_weights())), CONFIG) == fp
    assert tensor_fingerprint(iter(_weights()), CONFIG) == fp


def test_tensor_fingerprint_changes_with_one_weight_element() -> None:
    fp = tensor_fingerprint(_weights(), CONFIG)
    for i in range(3):
        w = _weights()
        t = w[i][1]
        bits = t.view(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])
        bits[-1] = bits[-1] ^ 1  # the lowest mantissa bit of the last element
        assert not torch.equal(t, _weights()[i][1])
        assert tensor_fingerprint(w, CONFIG) != fp, w[i][0]


def test_tensor_fingerprint_changes_with_name_dtype_shape_and_config() -> None:
    fp = tensor_fingerprint(_weights(), CONFIG)
    w = _weights()
    renamed = [("layer.1.weight", w[0][1]), *w[1:]]
    same_bytes_other_dtype = [("layer.0.weight", w[0][1].view(torch.int32)), *w[1:]]
    same_bytes_other_shape = [("layer.0.weight", w[0][1].reshape(3, 4)), *w[1:]]
    others = [
        tensor_fingerprint(renamed, CONFIG),
        tensor_fingerprint(same_bytes_other_dtype, CONFIG),
        tensor_fingerprint(same_bytes_other_shape, CONFIG),
        tensor_fingerprint(w, {**CONFIG, "rope_theta": 500000.0}),
        tensor_fingerprint(w[:2], CONFIG),
    ]
    assert len({fp, *others}) == len(others) + 1


def test_token_tuple_takes_integers_only():
    from kvagent.kvcache.identity import token_tuple

    assert token_tuple([1, 2, 3]) == (1, 2, 3)
    assert token_tuple(np.array([4, 5], dtype=np.int64)) == (4, 5)
    assert token_tuple(torch.tensor([6, 7])) == (6, 7)
    assert all(type(t) is int for t in token_tuple(np.array([8], dtype=np.uint32)))
    for bad in ([1.5], ["3"], [1, None], torch.tensor([0.5])):
        with pytest.raises(InvalidKeyError, match="token ids must be integers"):
            token_tuple(bad)
