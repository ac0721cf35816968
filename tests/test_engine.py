"""Token-exactness of every engine path on tiny random models of five architectures."""

from __future__ import annotations

import pytest
import torch

from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.errors import EngineError, UnsupportedModelError
from tests.conftest import TINY_ARCHS

GREEDY = GenerationParams(max_new_tokens=32)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("doc_len", [1, 37, 600])
def test_resume_equals_full_prefill(tiny_model, arch, doc_len):
    model = tiny_model(arch)
    engine = TransformersEngine(model)
    doc, suffix = _ids(doc_len, 1), _ids(9, 2)
    kv = engine.prefill(doc)
    assert kv.n_tokens == doc_len and kv.token_ids.tolist() == doc
    reused = engine.generate(kv, suffix, GREEDY).token_ids
    full = engine.generate(None, doc + suffix, GREEDY).token_ids
    # Independent reference: transformers' own generate over the concatenated ids.
    ref = model.generate(
        torch.tensor([doc + suffix]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )[0, doc_len + len(suffix):].tolist()
    assert len(reused) == 32
    assert reused == full == ref


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_resume_logits_match_full_prefill(tiny_model, arch):
    """Beyond argmax: next-token logits after reuse agree with a full forward to float tolerance."""
    from transformers import DynamicCache

    model = tiny_model(arch)
    engine = TransformersEngine(model)
    doc, suffix = _ids(300, 3), _ids(5, 4)
    kv = engine.prefill(doc)
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([doc + suffix])).logits[0, -len(suffix):]
        cache = DynamicCache(ddp_cache_data=list(zip(kv.keys, kv.values, strict=True)), config=model.config)
        reused = engine.forward(cache, input_ids=torch.tensor([suffix])).logits[0]
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_prefill_and_prefix_extension_are_exact(tiny_model, arch):
    model = tiny_model(arch)
    doc, suffix = _ids(700, 5), _ids(6, 6)
    one_shot = TransformersEngine(model)
    chunked = TransformersEngine(model, chunk_size=128)
    full = one_shot.generate(None, doc + suffix, GREEDY).token_ids
    assert chunked.generate(chunked.prefill(doc), suffix, GREEDY).token_ids == full
    # Extending a cached prefix (prefix-match path): KV of doc[:256] then the rest.
    extended = one_shot.prefill_from(one_shot.prefill(doc[:256]), doc[256:])
    assert extended.token_ids.tolist() == doc
    assert one_shot.generate(extended, suffix, GREEDY).token_ids == full


def test_truncated_kv_is_the_kv_of_the_prefix(tiny_model):
    engine = TransformersEngine(tiny_model("qwen3"))
    doc, suffix = _ids(400, 7), _ids(4, 8)
    kv = engine.prefill(doc).truncate(250)
    assert (
        engine.generate(kv, doc[250:] + suffix, GREEDY).token_ids
        == engine.generate(None, doc + suffix, GREEDY).token_ids
    )


def test_resume_never_mutates_the_cached_kv(tiny_model):
    engine = TransformersEngine(tiny_model("llama"))
    kv = engine.prefill(_ids(200, 9))
    before = [t.clone() for t in (*kv.keys, *kv.values)]
    for seed in range(3):
        list(engine.stream(kv, _ids(5, 10 + seed), GREEDY))
    assert all(torch.equal(a, b) for a, b in zip(before, (*kv.keys, *kv.values), strict=True))
    assert kv.n_tokens == 200


def test_resume_from_a_stored_artifact_leaves_its_tensors_and_file_unchanged(tiny_model, tmp_path):
    """The cache starts from the stored tensors without copying them, and nothing writes to them:
    not a resume, a stream, a sampled generation nor a prefix extension, on the store's mmap'd tensors."""
    from _kvfixtures import same_kv

    from kvagent.artifacts import format as art
    from kvagent.kvcache.identity import sha256_hex
    from kvagent.kvcache.tensors import KVCache
    from kvagent.tiers.store import KVStore

    engine = TransformersEngine(tiny_model("qwen3"))
    doc = _ids(300, 15)
    fresh = engine.prefill(doc)
    header, blob = art.encode(
        fresh,
        model_fingerprint=sha256_hex(b"m"),
        tokenizer_fingerprint=sha256_hex(b"t"),
        template_hash=sha256_hex(b"p"),
    )
    with KVStore(tmp_path / "kv") as store:
        store.put(header, blob)
        kv = store.get(header.key).artifact.kv  # tensors are views of a private mmap of the stored file
        snapshot = KVCache(
            tuple(t.clone() for t in kv.keys), tuple(t.clone() for t in kv.values), kv.token_ids.clone()
        )
        cache = engine.new_cache(kv)
        assert all(
            layer.keys.data_ptr() == k.data_ptr() for layer, k in zip(cache.layers, kv.keys, strict=True)
        )
        eight = GenerationParams(max_new_tokens=8)
        want = engine.generate(None, doc + [1, 2, 3], eight).token_ids
        assert engine.generate(kv, [1, 2, 3], eight).token_ids == want
        list(engine.stream(kv, [4, 5], GenerationParams(max_new_tokens=8, temperature=0.9, seed=1)))
        longer = engine.prefill_from(kv.truncate(200), doc[200:])
        assert same_kv(kv, snapshot) and same_kv(kv, fresh)
        assert torch.equal(longer.keys[1], fresh.keys[1])
        (path,) = (tmp_path / "kv").rglob("*.val")
        assert path.read_bytes() == blob
        assert store.get(header.key).artifact is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_future_warning_from_prefill_resume_or_stream(tiny_model, arch):
    """transformers 5 deprecates ``past_key_values=``; the engine uses the argument the model declares."""
    import warnings

    engine = TransformersEngine(tiny_model(arch))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = engine.prefill_from(engine.prefill(_ids(40, 16)), _ids(8, 17))
        assert len(engine.generate(kv, [1, 2], GenerationParams(max_new_tokens=3)).token_ids) == 3
        assert len(list(engine.stream(None, [3, 4], GenerationParams(max_new_tokens=3)))) == 3


@pytest.mark.slow
def test_no_future_warning_on_the_embedded_model(embedded):
    import warnings

    engine = TransformersEngine(embedded.model)
    ids = embedded.tokenizer.encode("The ferry leaves at nine and returns at five.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = engine.prefill(ids)
        assert len(engine.generate(kv, ids[:3], GenerationParams(max_new_tokens=2)).token_ids) == 2
        assert len(list(engine.stream(kv, ids[:3], GenerationParams(max_new_tokens=2)))) == 2


def test_sampling_is_seeded_and_params_validated(tiny_model):
    engine = TransformersEngine(tiny_model("llama"))
    kv = engine.prefill(_ids(50, 11))
    p = GenerationParams(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=42)
    a = engine.generate(kv, [1, 2, 3], p).token_ids
    assert a == engine.generate(kv, [1, 2, 3], p).token_ids
    assert a == engine.generate(None, _ids(50, 11) + [1, 2, 3], p).token_ids
    for bad in (
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_k": -2},
    ):
        with pytest.raises(EngineError):
            GenerationParams(**bad)


def test_stop_tokens_end_generation(tiny_model):
    engine = TransformersEngine(tiny_model("llama"))
    doc = _ids(40, 12)
    free = engine.generate(None, doc, GenerationParams(max_new_tokens=12)).token_ids
    stop = free[4]
    first = free.index(stop)
    out = engine.generate(None, doc, GenerationParams(max_new_tokens=12, stop_token_ids=(stop,)))
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"


def test_bad_inputs_are_clear_errors(tiny_model):
    engine = TransformersEngine(tiny_model("llama"))
    with pytest.raises(EngineError):
        engine.prefill([])
    with pytest.raises(EngineError):
        engine.prefill([0, 512])  # out of vocabulary
    with pytest.raises(EngineError):
        list(engine.stream(None, [1] * 4000, GenerationParams(max_new_tokens=200)))  # past max positions
    other = TransformersEngine(tiny_model("gpt2"))  # 4 KV heads vs 2
    with pytest.raises(EngineError):
        list(engine.stream(other.prefill([1, 2, 3]), [4], GREEDY))  # KV of another layout


def test_sliding_window_overflow_is_refused(tiny_model):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=32)
    engine = TransformersEngine(AutoModelForCausalLM.from_config(cfg))
    assert engine.prefill(_ids(20, 13)).n_tokens == 20  # within the window: plain K/V, fine
    with pytest.raises(UnsupportedModelError):
        engine.prefill(_ids(100, 14))
