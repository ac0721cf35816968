"""Engines by name (kvagent.plugins) and the prompt-turn core's path for an engine that resolves the
prompt's KV itself (``resolves_prefix``): whole prompts in the caller's namespace, nothing resolved, the reuse
reported from the engine's Finish."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from kvagent.chat.turn import Cached, PromptTurns, settled
from kvagent.engines import Finish, GenerationRequest, Sink, Token, Usage
from kvagent.engines.params import GenerationParams
from kvagent.errors import ConfigError
from kvagent.plugins import ENTRY_POINT_GROUP, load_engine_factory, transformers_engine
from kvagent.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def fake_factory(ctx: Any) -> Any:
    return WholePromptEngine()


class WholePromptEngine:
    """An engine that finds cached KV itself: it says it reused half of every prompt."""

    max_positions = None
    resolves_prefix = True

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def submit(self, request: GenerationRequest, sink: Sink) -> Any:
        self.requests.append(request)
        n = len(request.prompt_ids)
        sink(Token(7))
        sink(Finish("stop", Usage(n, n // 2, 1)))
        return self


class NoResolver:
    def resolve(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("an engine that resolves the prefix itself must not get a resolved one")


def test_engines_by_name_and_by_module_attr() -> None:
    assert load_engine_factory("transformers") is transformers_engine
    assert load_engine_factory(f"{__name__}:fake_factory") is fake_factory


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuch", "unknown engine 'nosuch'"),
        ("vllm", "vllm-kvagent"),
        ("no_such_module_xyz:factory", "cannot be imported"),
        (f"{__name__}:missing", "has no attribute"),
        (f"{__name__}:ROOT", "not an engine factory"),
        ("bad name!", "engine must be a name"),
    ],
)
def test_a_bad_engine_is_a_config_error_that_says_what_to_do(
    name: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "vllm":  # as where vllm-kvagent is not installed
        monkeypatch.setattr("importlib.metadata.entry_points", lambda **kw: [])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_engine_factory(name)


def test_settings_check_the_engine_name(tmp_path: Path) -> None:
    assert Settings(tmp_path, None, engine="vllm").engine == "vllm"
    with pytest.raises(ConfigError):
        Settings(tmp_path, None, engine="no spaces allowed")


def test_the_vllm_integration_declares_its_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "integrations/vllm/pyproject.toml").read_text())
    spec = meta["project"]["entry-points"][ENTRY_POINT_GROUP]["vllm"]
    sys.path.insert(0, str(ROOT / "integrations/vllm"))
    try:
        factory = load_engine_factory(spec)  # importable without vLLM itself
    finally:
        sys.path.remove(str(ROOT / "integrations/vllm"))
    assert factory.__name__ == "create_engine"


def test_a_whole_prompt_engine_gets_the_whole_prompt_in_its_namespace() -> None:
    engine = WholePromptEngine()
    turns = PromptTurns(engine, NoResolver())  # type: ignore[arg-type]
    params = GenerationParams(max_new_tokens=4)
    turn = turns.prepare(list(range(10, 30)), params, stops=("x",), namespace="ns-alice")
    assert turn.request.prompt_ids == tuple(range(10, 30)) and turn.request.prefix is None
    assert turn.request.namespace == "ns-alice" and turn.request.stop_strings == ("x",)
    evs = list(turns.events(turn))
    assert isinstance(evs[0], Cached) and evs[0].info.status == "engine"
    finish = evs[-1]
    assert isinstance(finish, Finish)
    assert not evs[0].info.hit  # nothing known reused before the engine's Finish
    info = settled(evs[0].info, finish.usage)
    assert (info.cached_tokens, info.prefilled_tokens, info.source) == (10, 10, "engine")
    assert info.hit  # the engine's own prefix reuse is a hit
    assert not settled(evs[0].info, Usage(20, 0, 1)).hit  # the engine found nothing: not a hit
    # the reference (no reuse): a namespace of its own, never the caller's
    ref = turns.prepare(list(range(10, 30)), params, namespace="ns-alice", reuse=False)
    assert ref.request.namespace not in (None, "ns-alice") and ref.info.status == "disabled"
    assert settled(ref.info, finish.usage) is ref.info
    assert not ref.info.hit


def test_cache_status_is_typed_and_still_a_string() -> None:
    """Every status a read reports is a CacheStatus member that compares, hashes, prints and is written to
    JSON as its string; a string given is taken as its member, an unknown one refused; the docstring names
    them all."""
    import json
    from dataclasses import asdict

    from kvagent import CacheInfo, CacheStatus

    assert [s.value for s in CacheStatus] == [
        "memory", "local", "prefix", "remote", "remote-generate", "engine", "prefill", "disabled"]
    info = CacheInfo("prefix", "a cached prefix", 64, 3)  # type: ignore[arg-type]
    assert info.status is CacheStatus.PREFIX and info.status == "prefix" and info.hit
    assert f"{info.status}" == str(info.status) == "prefix" and {"prefix": 1}[info.status] == 1
    assert json.loads(json.dumps(asdict(info)))["status"] == "prefix"
    hits = {s for s in CacheStatus if CacheInfo(s, "", 5, 0).hit}
    assert hits == {"memory", "local", "prefix", "remote", "remote-generate", "engine"}
    assert not CacheInfo(CacheStatus.ENGINE, "", 0, 5).hit
    with pytest.raises(ValueError):
        CacheInfo("hit", "", 1, 0)  # type: ignore[arg-type]
    assert all(f'"{s.value}"' in (CacheInfo.__doc__ or "") + (CacheStatus.__doc__ or "") for s in CacheStatus)


def test_a_whole_prompt_engine_gets_the_published_kv_its_caller_may_read() -> None:
    """The caller's registry source (the server's own, entitlements applied) travels with the request, so
    the engine can stage what the caller may see; never with the reference, which reuses nothing."""
    turns = PromptTurns(WholePromptEngine(), NoResolver())  # type: ignore[arg-type]
    source = object()
    params = GenerationParams(max_new_tokens=4)
    turn = turns.prepare([1, 2, 3], params, namespace="ns-bob", registry=source)
    assert turn.request.registry is source and turn.request.namespace == "ns-bob"
    ref = turns.prepare([1, 2, 3], params, namespace="ns-bob", registry=source, reuse=False)
    assert ref.request.registry is None
    assert turns.prepare([1, 2, 3], params).request.registry is None


def test_healthz_turns_503_once_the_engine_can_no_longer_generate() -> None:
    """A node whose engine core died answers /v1/healthz with 503 and the reason (a load balancer drains
    it); a healthy engine, an engine without the optional ``failure`` attribute and a registry-only node
    answer 200."""
    from types import SimpleNamespace

    from kvagent.server.app import health

    host = SimpleNamespace(fingerprint="f" * 64, batch=SimpleNamespace(failure=None))
    assert health(host) == (200, {"ok": True, "model_fingerprint": "f" * 64})
    assert health(SimpleNamespace(fingerprint="f" * 64, batch=object()))[0] == 200
    assert health(None) == (200, {"ok": True, "model_fingerprint": None})
    host.batch.failure = "the vLLM engine stopped: EngineDeadError()"
    status, body = health(host)
    assert status == 503 and body["ok"] is False and "EngineDeadError" in body["error"]
