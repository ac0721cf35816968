"""The cost model reproduces the paper's published figures from its parameters, and behaves sanely."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvagent.analysis import economics as econ
from kvagent.analysis.economics import main
from kvagent.errors import ConfigError

# Figures as published (abstract or summaries of arXiv 2606.13361); the model must land on them.
PAPER_AGENTS = 80_000_000
PAPER_RE_PREFILL_USD = 1.51e6
PAPER_REUSE_USD = 0.0304e6
PAPER_RATIO = 49.7
PAPER_MB_PER_TOKEN = 0.148
PAPER_ARTIFACT_GB = 0.54
PAPER_EGRESS_USD = 0.049
PAPER_SHIP_VS_PREFILL = 2.6
PAPER_BREAK_EVEN = 1.02
PAPER_USER_DISCOUNT = 10.0

settings.register_profile("economics", max_examples=60, deadline=None)


@pytest.fixture
def paper() -> econ.CostReport:
    return econ.report(econ.qwen3_4b(), PAPER_AGENTS)


def test_qwen3_4b_bytes_per_token_from_shape() -> None:
    b = econ.kv_bytes_per_token(num_layers=36, num_kv_heads=8, head_dim=128, dtype_bytes=2)
    assert b == econ.qwen3_4b().kv_bytes_per_token
    assert b == 147_456  # the summaries' own check: 2 x 36 x 8 x 128 x 2
    assert b / 1e6 == pytest.approx(PAPER_MB_PER_TOKEN, rel=0.005)  # 0.1475 MB, printed as 0.148
    assert econ.kv_bytes_per_token(36, 8, 128, 1) * 2 == b  # int8 halves it


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_kv_bytes_per_token_rejects_non_positive_ints(bad: object) -> None:
    with pytest.raises(ConfigError):
        econ.kv_bytes_per_token(36, 8, bad, 2)  # type: ignore[arg-type]


def test_headline_totals_for_80m_agents(paper: econ.CostReport) -> None:
    re_prefill = paper.strategy("re_prefill").total_usd
    reuse = paper.strategy("reuse").total_usd
    assert re_prefill == pytest.approx(PAPER_RE_PREFILL_USD, rel=0.01)
    assert reuse == pytest.approx(PAPER_REUSE_USD, rel=0.01)
    assert re_prefill / reuse == pytest.approx(PAPER_RATIO, rel=0.01)
    assert paper.prefill_per_load / paper.reuse_compute_per_load == pytest.approx(PAPER_RATIO)


def test_artifact_size_and_egress(paper: econ.CostReport) -> None:
    assert paper.artifact_gb == pytest.approx(PAPER_ARTIFACT_GB, rel=0.02)
    assert paper.egress_per_load == pytest.approx(PAPER_EGRESS_USD, rel=0.02)
    assert paper.ship_vs_prefill == pytest.approx(PAPER_SHIP_VS_PREFILL, rel=0.02)
    assert paper.strategy("shipping").break_even_agents == math.inf  # shipping never pays


def test_gib_convention_does_not_reproduce_the_paper() -> None:
    """Why bytes_per_gb is 1.024e9: with GiB the 2.6x egress figure is off by more than 2%."""
    gib = econ.report(econ.qwen3_4b(bytes_per_gb=1024**3), PAPER_AGENTS)
    assert gib.ship_vs_prefill != pytest.approx(PAPER_SHIP_VS_PREFILL, rel=0.02)
    assert gib.egress_per_load < econ.report(econ.qwen3_4b(), 1).egress_per_load


def test_break_even_general_formula_reduces_to_papers(paper: econ.CostReport) -> None:
    assert paper.paper_break_even == pytest.approx(PAPER_BREAK_EVEN, abs=0.005)
    assert paper.strategy("reuse").break_even_agents == pytest.approx(paper.paper_break_even)
    # with no storage, hosting breaks even exactly like reuse
    assert paper.strategy("hosting").break_even_agents == pytest.approx(paper.paper_break_even)


@given(r=st.floats(min_value=1.001, max_value=1e4), c=st.floats(min_value=1e-6, max_value=1e3))
@settings(settings.get_profile("economics"))
def test_break_even_is_where_totals_cross(r: float, c: float) -> None:
    n_star = econ.break_even(publish_cost=c, load_cost=c / r, prefill_cost=c)
    assert n_star == pytest.approx(econ.paper_break_even(r), rel=1e-9)
    assert c + n_star * c / r == pytest.approx(n_star * c, rel=1e-9)


@pytest.mark.parametrize("r", [1.0, 0.5])
def test_no_saving_means_never_breaks_even(r: float) -> None:
    assert econ.paper_break_even(r) == math.inf
    rep = econ.report(econ.qwen3_4b(reuse_ratio=r), 10)
    assert rep.strategy("reuse").break_even_agents == math.inf
    assert econ.break_even(1.0, 2.0, 2.0) == math.inf


def test_break_even_grows_without_bound_as_r_approaches_one() -> None:
    values = [econ.paper_break_even(1 + eps) for eps in (1e-1, 1e-3, 1e-6)]
    assert values == sorted(values) and values[-1] > 1e5


def test_storage_raises_hosting_break_even() -> None:
    free = econ.report(econ.qwen3_4b(), 100)
    paid = econ.report(econ.qwen3_4b(storage_usd_per_gb_month=0.023, storage_months=12), 100)
    assert paid.storage_usd == pytest.approx(paid.artifact_gb * 0.023 * 12)
    assert paid.strategy("hosting").break_even_agents > free.strategy("hosting").break_even_agents
    assert paid.strategy("hosting").total_usd == pytest.approx(
        free.strategy("hosting").total_usd + paid.storage_usd
    )
    assert econ.hosting_cost(paid.params, 100) == pytest.approx(
        paid.reuse_compute_per_load + paid.storage_usd / 100
    )


def test_tariff_gives_tenfold_discount_and_provider_margin(paper: econ.CostReport) -> None:
    t = paper.tariff
    assert t.user_discount == pytest.approx(PAPER_USER_DISCOUNT)
    assert t.user_discount < t.physical_saving  # the tariff leaves the provider part of the ~50x
    assert t.provider_margin_per_load > 0
    assert t.provider_margin_per_load == pytest.approx(t.user_price_per_load - paper.reuse_compute_per_load)
    assert t.provider_margin_fraction == pytest.approx(1 - 1 / (PAPER_RATIO * 0.1))


def test_tariff_below_reuse_cost_loses_money() -> None:
    rep = econ.report(econ.qwen3_4b(cache_read_tariff=0.01), 1000)  # 1/100 of prefill < 1/49.7
    assert rep.tariff.provider_margin_per_load < 0


@given(
    n=st.integers(min_value=1, max_value=10**12),
    k=st.integers(min_value=1, max_value=10**6),
    tokens=st.integers(min_value=1, max_value=200_000),
)
@settings(settings.get_profile("economics"))
def test_more_agents_never_lower_any_total(n: int, k: int, tokens: int) -> None:
    p = econ.qwen3_4b(document_tokens=tokens, storage_usd_per_gb_month=0.023)
    a, b = econ.strategy_costs(p, n), econ.strategy_costs(p, n + k)
    for before, after in zip(a, b, strict=True):
        assert after.total_usd >= before.total_usd
    assert b[0].total_usd > a[0].total_usd  # re-prefill strictly grows


@given(c1=st.floats(min_value=1.0, max_value=100.0), c2=st.floats(min_value=1.0, max_value=100.0))
@settings(settings.get_profile("economics"))
def test_more_compression_never_raises_shipping(c1: float, c2: float) -> None:
    lo, hi = sorted((c1, c2))
    ship = [econ.shipping_cost(econ.qwen3_4b(compression_ratio=c)) for c in (lo, hi)]
    assert ship[1] <= ship[0]
    if hi > lo * 1.001:
        assert ship[1] < ship[0]


def test_enough_compression_makes_shipping_pay() -> None:
    """Shipping beats re-prefill only once egress < prefill - reuse: the paper's open problem."""
    p = econ.qwen3_4b()
    needed = econ.egress_cost(p) / (econ.prefill_cost(p) - econ.reuse_compute_cost(p))
    assert (
        econ.report(econ.qwen3_4b(compression_ratio=needed * 0.99), 10**6)
        .strategy("shipping")
        .break_even_agents
        == math.inf
    )
    assert math.isfinite(
        econ.report(econ.qwen3_4b(compression_ratio=needed * 1.01), 10**6)
        .strategy("shipping")
        .break_even_agents
    )


def test_params_from_measurement_derives_ratio_and_price() -> None:
    p = econ.params_from_measurement(
        bytes_per_token=4096, prefill_seconds=2.0, reuse_seconds=0.05, tokens=1000, gpu_dollars_per_hour=3.6
    )
    assert p.reuse_ratio == pytest.approx(40.0)
    assert econ.prefill_cost(p) == pytest.approx(3.6 * 2.0 / 3600)  # the GPU time of one prefill
    assert p.kv_bytes_per_token == 4096 and p.document_tokens == 1000
    with pytest.raises(ConfigError):
        econ.params_from_measurement(4096, 2.0, 0.0, 1000, 3.6)


@pytest.mark.parametrize(
    "field,value",
    [
        ("document_tokens", 0),
        ("reuse_ratio", 0.0),
        ("compression_ratio", -1.0),
        ("egress_usd_per_gb", math.nan),
    ],
)
def test_invalid_params_raise_config_error(field: str, value: float) -> None:
    with pytest.raises(ConfigError):
        econ.qwen3_4b(**{field: value})
    with pytest.raises(ConfigError):
        econ.report(econ.qwen3_4b(), 0)


def test_format_table_lists_every_strategy(paper: econ.CostReport) -> None:
    text = econ.format_table(paper)
    for label in econ.STRATEGY_LABELS.values():
        assert label in text
    assert "never" in text  # shipping
    assert "$1.51M" in text


def test_main_json_parses_and_honours_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert econ.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_agents"] == PAPER_AGENTS
    assert data["strategies"][2]["break_even_agents"] is None  # inf -> null, strict JSON
    assert econ.main(["--json", "--agents", "5", "--tokens", "255", "--ratio", "9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["document_tokens"] == 255 and data["n_agents"] == 5
    assert data["strategies"][1]["break_even_agents"] == pytest.approx(econ.paper_break_even(9))


def test_main_text_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert econ.main([]) == 0
    assert "re-prefill" in capsys.readouterr().out
    assert econ.main(["--compression", "0"]) == 2
    assert "compression_ratio" in capsys.readouterr().err


def test_cli_derives_parameters_from_a_benchmark_result(tmp_path, capsys) -> None:
    bench = {"rows": [
        {"tokens": 1024, "cold_s": 2.0, "raw_reuse_s": 0.1, "sdk_warm_s": 0.125, "kv_bytes": 1024 * 46080},
        {"tokens": 4096, "cold_s": 12.0, "raw_reuse_s": 0.3, "sdk_warm_s": 0.4, "kv_bytes": 4096 * 46080},
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert (
        main(["--from-benchmark", str(path), "--tokens", "4000", "--dollars-per-hour", "3.6", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    text = json.dumps(out)
    assert "4096" in text and "46080" in text
    # r = 12.0 / 0.4 = 30 for the SDK path (nearest row to 4000 tokens)
    assert any(abs(v - 30.0) < 1e-9 for v in _numbers(out))
    assert main(["--from-benchmark", str(tmp_path / "missing.json")]) == 2


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def test_old_import_path_and_the_command_are_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    """The cost model lives in kvagent.analysis; ``kvagent.economics`` is the same module, and
    ``kvagent economics`` prints exactly what the module's own entry point prints."""
    import kvagent.economics as old
    from kvagent import cli

    assert old is econ and old.main is main
    assert main(["--json"]) == 0
    direct = capsys.readouterr().out
    assert cli.main(["economics", "--json"]) == 0
    assert capsys.readouterr().out == direct and json.loads(direct)
