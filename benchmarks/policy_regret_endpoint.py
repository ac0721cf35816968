"""Regret of the cost policy in a long-running host: ``/v1/chat/completions`` on ``kvagent serve --model
smollm2``.

Three hosts run side by side, one per mode: the default policy, a forced fetch and a forced prefill
(``KVAGENT_POLICY``, read by the host's runtime). Each host first serves the same history of chats of
mixed lengths from one principal (its cost model calibrates itself on them, as a provider's would); then, per
length and repeat, a publisher principal publishes a new document to all three, and a third principal asks
about it on each host, the hosts' order rotated every round. Each host sees each document once, so no answer
comes from its own prompt cache. A chat's time is the request's wall time with ``max_tokens=1`` (its time to
first token); regret is the default's median over the faster forced mode's median.

Each host's Prometheus histogram ``kvagent_cost_prediction_ratio`` (actual over predicted seconds of every
read, prompt and chat) gives the share of decisions that predicted their own cost within 2x; each host's own
calibration file (one per host, fresh) gives the whole distribution of those ratios: count, share within 2x,
percentiles and the worst, per ``kind/path``, and every decision outside 2x (``distribution``).

    python -m benchmarks.policy_regret --endpoint-only [--endpoint-lengths 512,1024,2048] [--repeats 3]
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from tests.registry_server import ServerProcess, start_server

MODES = ("default", "fetch", "prefill")
POLICIES = {  # KVAGENT_POLICY per mode ("" keeps the defaults)
    "default": "",
    "fetch": "min_tokens=0,prefill_tokens_per_s=1,bandwidth_bytes_per_s=1e15",
    "prefill": "min_tokens=1000000000",
}
TOKENS = {
    "pub-token-00001": {"principal": "publisher", "publish": True},
    "ask-token-00002": {"principal": "asker", "publish": False},
    "his-token-00003": {"principal": "history", "publish": False},
}
HISTORY_LENGTHS = (60, 400, 120, 900, 250)  # the history's message lengths (tokens), cycled


def _chat(url: str, token: str, text: str) -> dict[str, Any]:
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 1,
            "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"},
                   timeout=1800)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    out = r.json()
    return {"seconds": seconds, "cached_tokens": out["usage"]["prompt_tokens_details"]["cached_tokens"],
            "prompt_tokens": out["usage"]["prompt_tokens"], **out["kvagent"]["cache"]}


def prediction_share(url: str) -> dict[str, Any]:
    """From the host's ``kvagent_cost_prediction_ratio`` histogram: decisions checked, and the share whose
    actual seconds were within 2x of the prediction (0.5 < ratio <= 2), in all and per ``kind/path``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    le: dict[str, dict[float, float]] = {}
    for m in re.finditer(r'^kvagent_cost_prediction_ratio_bucket\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        b = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        for name in ("all", f"{labels.get('kind')}/{labels.get('path')}"):
            le.setdefault(name, {})
            le[name][b] = le[name].get(b, 0.0) + float(m.group(2))

    def share(buckets: dict[float, float]) -> dict[str, float]:
        total = buckets.get(float("inf"), 0.0)
        within = buckets.get(2.0, 0.0) - buckets.get(0.5, 0.0)
        return {"decisions": total, "within_2x": within / total if total else float("nan")}

    out: dict[str, Any] = share(le.get("all", {}))
    out["by_path"] = {name: share(b) for name, b in le.items() if name != "all"}
    return out


def distribution(calibration: Path) -> dict[str, Any]:
    """Every decision a host checked against its cost (its calibration file's outcomes): the distribution of
    actual/predicted (``kvagent.costs.calibration.prediction_errors``) and the decisions outside 2x."""
    from kvagent.costs.calibration import CalibrationFile, prediction_errors

    rows = CalibrationFile(calibration).read()["outcomes"]
    out = prediction_errors(rows)
    out["misses"] = [{"kind": o[1], "path": o[2], "tokens": int(o[3]), "past": int(o[4]), "predicted_s": o[5],
                      "actual_s": o[6], "ratio": o[6] / o[5]} for o in rows if not 0.5 <= o[6] / o[5] <= 2.0]
    return out


def print_distribution(label: str, d: dict[str, Any]) -> None:
    """``distribution``'s figures, one line overall and one per ``kind/path``, then the misses."""
    if not d.get("count"):
        print(f"{label}: no decision checked against its cost")
        return

    def line(name: str, e: dict[str, Any]) -> str:
        return (f"{name}: {e['count']} decisions, {100 * e['within_2x']:.0f}% within 2x "
                f"({100 * e['slower_than_2x']:.0f}% slower, {100 * e['faster_than_2x']:.0f}% faster), "
                f"actual/predicted p05 {e['p05_ratio']:.2f} p25 {e['p25_ratio']:.2f} median "
                f"{e['median_ratio']:.2f} p75 {e['p75_ratio']:.2f} p95 {e['p95_ratio']:.2f} worst "
                f"{e['worst_ratio']:.2f}")

    print(line(f"{label} (goal: 95% within 2x)", d))
    for name, e in d.get("by_kind_path", {}).items():
        print("  " + line(name, e))
    for m in d.get("misses", []):
        print(f"  miss: {m['kind']}/{m['path']} {m['tokens']} tokens after {m['past']}: predicted "
              f"{m['predicted_s']:.3f} s, took {m['actual_s']:.3f} s ({m['ratio']:.2f}x)")


def endpoint_regret(lengths: list[int], repeats: int, history: int, work: Path,
                    documents: Any) -> dict[str, Any]:
    """The chat endpoint's regret table (see the module docstring); ``documents(lengths, dir, tag)`` writes
    the texts."""
    from kvagent import KVAgent
    from kvagent.costs.calibration.outcomes import OUTCOME_FLUSH_S
    from kvagent.costs.policy import PolicyParams

    servers: dict[str, ServerProcess] = {}
    calibration = {mode: work / f"host-{mode}-calibration.json" for mode in MODES}  # fresh, one per host
    try:
        for mode in MODES:
            env = {"KVAGENT_CALIBRATION": str(calibration[mode]), "KVAGENT_CALIBRATE_AT_START": "1"}
            if POLICIES[mode]:
                env["KVAGENT_POLICY"] = POLICIES[mode]
            servers[mode] = start_server(work / f"host-{mode}", TOKENS, model="smollm2", extra_env=env,
                                         timeout=600)
        hist = documents(sorted(set(HISTORY_LENGTHS)), work, "history")
        for i in range(history):  # the same history on every host, one host after another
            text = hist[HISTORY_LENGTHS[i % len(HISTORY_LENGTHS)]].read_text()
            for mode in MODES:
                _chat(servers[mode].url, "his-token-00003", f"Chat {i}: {text}\n\nSay yes.")
        publisher = KVAgent(cache_dir=work / "publisher", local_only=True)
        publishers = {mode: KVAgent(publisher.loaded.model, tokenizer=publisher.tokenizer,
                                    cache_dir=work / "publisher", registry_url=servers[mode].url,
                                    token="pub-token-00001", policy=PolicyParams(min_tokens=0))
                      for mode in MODES}
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {m: [] for m in MODES} for n in lengths}
        for rep in range(repeats):
            docs = documents(lengths, work, f"endpoint{rep}")
            order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
            for n, path in docs.items():
                text = path.read_text()
                for mode in MODES:  # one prefill (the first), then the publisher's local store
                    pub = publishers[mode]
                    pub.publish(pub.read(text), "public")
                for mode in order:
                    runs[n][mode].append(_chat(servers[mode].url, "ask-token-00002",
                                               f"{text}\n\nQuestion: what is this document about?"))
                last = {m: runs[n][m][-1] for m in MODES}
                print(f"endpoint {n:5d} tokens, round {rep + 1}: "
                      + ", ".join(f"{m} {last[m]['seconds']:.2f} s ({last[m]['status']}, "
                                  f"{last[m]['cached_tokens']} cached)" for m in MODES), flush=True)
        for pub in publishers.values():
            pub.close()
        publisher.close()
        rows = []
        for n in lengths:
            row: dict[str, Any] = {"tokens": n}
            for mode in MODES:
                recs = runs[n][mode]
                row[mode] = statistics.median(r["seconds"] for r in recs)
                row[f"{mode}_all"] = [r["seconds"] for r in recs]
                row[f"{mode}_cached_all"] = [r["cached_tokens"] for r in recs]
                row[f"{mode}_status"] = "/".join(sorted({r["status"] for r in recs}))
            row["default_reason"] = runs[n]["default"][0]["reason"]
            row["regret"] = row["default"] / min(row["fetch"], row["prefill"])
            rows.append(row)
        result = {"history_chats": history, "repeats": repeats, "rows": rows,
                  "predictions": {mode: prediction_share(servers[mode].url) for mode in MODES}}
        time.sleep(2 * OUTCOME_FLUSH_S)  # the hosts write their outcomes in the background
    finally:
        for srv in servers.values():
            srv.stop()
    result["distribution"] = {mode: distribution(calibration[mode]) for mode in MODES}
    return result


def table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"\nchat endpoint after {result['history_chats']} chats, medians of {result['repeats']}:")
    print("| tokens | default chose | default | forced fetch | forced prefill | regret |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['default_status']} | {r['default']:.2f} s | {r['fetch']:.2f} s | "
              f"{r['prefill']:.2f} s | {r['regret']:.2f}x |")
    print(f"worst endpoint regret {max(r['regret'] for r in rows):.2f}x (goal ≤ 1.25x)")
    for mode, p in result["predictions"].items():
        paths = ", ".join(f"{k} {v['decisions']:.0f} ({100 * v['within_2x']:.0f}%)"
                          for k, v in sorted(p.get("by_path", {}).items()))
        print(f"host {mode}: {p['decisions']:.0f} decisions checked, {100 * p['within_2x']:.0f}% predicted "
              f"their own cost within 2x (goal ≥ 95%); by path: {paths or 'none'}")
    for mode, d in result.get("distribution", {}).items():
        print_distribution(f"host {mode}", d)
