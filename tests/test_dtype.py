"""One dtype setting, honoured everywhere (``kvagent.dtypes``): ``auto`` chooses as vLLM does from the
hardware's flags, float32 (token-exact) is the SDK's and the server's default, an explicit dtype reaches the
host's model (and through it every engine of the host), and a dtype that cannot be honoured is an error,
never ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvagent import ConfigError, KVAgent
from kvagent.config import Config
from kvagent.dtypes import DTYPE_CHOICES, auto_dtype, cpu_flags, resolve_dtype
from kvagent.server.__main__ import build_parser, settings_from_args
from kvagent.server.host import load_host_agent
from kvagent.server.settings import Settings
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, embedded: Any) -> Path:
    """A tiny llama with SmolLM2's tokenizer: a whole local model, for a host and an SDK agent alike."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-dtype-model"), seed=3, tokenizer=embedded.tokenizer)


@pytest.fixture()
def no_dtype_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults themselves: the suite's conftest runs everything else in float32."""
    monkeypatch.delenv("KVAGENT_DTYPE", raising=False)


@pytest.mark.parametrize(
    ("flags", "cuda_bf16", "want"),
    [
        ({"fpu", "avx2", "amx_bf16", "amx_tile"}, None, "bfloat16"),  # Sapphire Rapids and later
        ({"fpu", "avx512f", "avx512_bf16"}, None, "bfloat16"),  # Cooper Lake, Zen 4
        ({"fpu", "avx2", "avx512f", "avx512_fp16"}, None, "float32"),  # AVX-512 without BF16
        ({"fpu", "avx2", "amx_tile"}, None, "float32"),  # AMX tiles alone are not AMX-BF16
        (set(), None, "float32"),  # no /proc/cpuinfo
        ((), True, "bfloat16"),  # a GPU that supports bf16 (Ampere and later)
        ({"amx_bf16"}, False, "float32"),  # a GPU that does not: the GPU decides, not the host CPU
    ],
)
def test_auto_chooses_bf16_only_where_the_hardware_computes_it(flags: Any, cuda_bf16: Any, want: str) -> None:
    assert auto_dtype(flags, cuda_bf16) == want


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_on_this_machine_is_the_pure_choice_from_its_flags() -> None:
    assert resolve_dtype("auto") == auto_dtype(cpu_flags()) == resolve_dtype(None)
    assert resolve_dtype("float32") == "float32"


@pytest.mark.usefixtures("no_dtype_env")
def test_float32_is_the_default_of_the_sdk_and_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32, not auto, by default: auto picks bf16 on this CPU, where greedy reuse is not token-exact
    (docs/deploy.md); the SDK and the server share one default, so they share artifacts."""
    assert Config.from_env().dtype == "float32"
    monkeypatch.setenv("KVAGENT_DTYPE", "bfloat16")
    assert Config.from_env().dtype == "bfloat16"
    base = ["--data-dir", str(tmp_path)]
    assert settings_from_args(build_parser().parse_args(base)).dtype is None  # the host's Config's
    assert settings_from_args(build_parser().parse_args([*base, "--dtype", "float16"])).dtype == "float16"


@pytest.mark.parametrize("bad", ["float64", "bf16", "half", "AUTO"])
def test_an_unknown_dtype_is_an_error_everywhere(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Config.from_env(dtype=bad)
    monkeypatch.setenv("KVAGENT_DTYPE", bad)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Config.from_env()
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Settings(data_dir=tmp_path, token_file=None, dtype=bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data-dir", str(tmp_path), "--dtype", bad])
    assert bad not in DTYPE_CHOICES


def test_a_dtype_that_cannot_run_on_its_device_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="cannot run on cuda"):
        resolve_dtype("float16", device="cuda")


def test_an_explicit_dtype_the_given_model_is_not_in_is_an_error(tiny_model: Any, tmp_path: Path) -> None:
    """Before: ``KVAgent(model, dtype="bfloat16")`` ran the float32 model and keyed its KV float32."""
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="the model given is in float32"):
        KVAgent(model, dtype="bfloat16", cache_dir=tmp_path / "c")
    with KVAgent(model, dtype="float32", cache_dir=tmp_path / "c") as agent:
        assert agent.runtime.context.dtype == "float32"


@pytest.mark.usefixtures("no_dtype_env")
def test_auto_runs_a_given_model_as_it_is(tiny_model: Any, tmp_path: Path) -> None:
    with KVAgent(tiny_model("llama"), cache_dir=tmp_path / "c") as agent:
        assert agent.runtime.context.dtype == "float32"


@pytest.mark.parametrize("how", ["argument", "KVAGENT_DTYPE"])
def test_the_hosts_model_is_loaded_in_the_dtype_asked_for(
    how: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``load_host_agent`` loaded the model without the Config's dtype (always the checkpoint's,
    float32), so ``KVAGENT_DTYPE=bfloat16 kvagent serve`` ran float32, and so did ``--engine vllm``, which
    takes the host model's dtype."""
    monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
    if how == "KVAGENT_DTYPE":
        monkeypatch.setenv("KVAGENT_DTYPE", "bfloat16")
    runtime = load_host_agent(str(model_dir), tmp_path / "models", tmp_path / "cache",
                              dtype="bfloat16" if how == "argument" else None)
    try:
        assert runtime.engine.dtype == torch.bfloat16
        assert next(runtime.loaded.model.parameters()).dtype == torch.bfloat16
        assert runtime.context.dtype == "bfloat16"  # in every key the host computes
        assert runtime.config.dtype == "bfloat16"
    finally:
        runtime.close()


@pytest.mark.usefixtures("no_dtype_env")
def test_an_sdk_agent_and_a_host_share_keys_by_default(model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both at the default (float32): the same dtype, so the same content key for the same tokens."""
    monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
    host = load_host_agent(str(model_dir), tmp_path / "models", tmp_path / "host")
    try:
        with KVAgent(str(model_dir), cache_dir=tmp_path / "sdk", models_dir=tmp_path / "models") as agent:
            assert agent.runtime.context.dtype == host.context.dtype == "float32"
            assert agent.key_of(list(range(40))) == host.resolver.key_of(list(range(40)))
    finally:
        host.close()
