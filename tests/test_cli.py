"""The kvagent command line, run as a real subprocess on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import long_text

pytestmark = pytest.mark.slow


def run(cache: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kvagent.cli", "--cache-dir", str(cache), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kvagent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory, embedded) -> Path:
    path = tmp_path_factory.mktemp("docs") / "handbook.txt"
    path.write_text(long_text(3900, embedded.tokenizer), encoding="utf-8")
    return path


def test_ask_a_4000_token_document_then_answer_again_from_the_cache(tmp_path, long_doc):
    first = [json.loads(line) for line in run(tmp_path, "ask", str(long_doc), "How much is a return fare?",
                                             "Who is the passenger services manager?", "--json",
                                             "--max-new-tokens", "16").stdout.splitlines()]
    assert len(first) == 2
    assert first[0]["read"]["status"] == "prefill" and first[0]["read"]["prefilled_tokens"] > 3900
    assert all(r["answer"] for r in first)
    # A new process: the KV comes from the local store, the document is not prefilled again.
    second = json.loads(run(tmp_path, "ask", str(long_doc), "How much is a return fare?", "--json",
                            "--max-new-tokens", "16").stdout)
    assert second["read"]["status"] == "local" and second["read"]["prefilled_tokens"] == 0
    assert second["answer"] == first[0]["answer"]
    assert second["key"] == first[0]["key"]


def test_verify_reports_token_exact(tmp_path, embedded):
    # 1,200 tokens: the same check as on 4,000 (two prefills, 32 greedy tokens compared) at a third of the
    # time
    doc = tmp_path / "note.txt"
    doc.write_text(long_text(1200, embedded.tokenizer), encoding="utf-8")
    rep = json.loads(run(tmp_path, "verify", str(doc), "--json").stdout)
    assert rep["exact"] is True and rep["compared_tokens"] == 32 and rep["document_tokens"] > 1100


def test_read_and_cache_management(tmp_path):
    doc = tmp_path / "note.txt"
    doc.write_text("The library opens at nine and closes at five on weekdays.", encoding="utf-8")
    rec = json.loads(run(tmp_path, "read", str(doc), "--json").stdout)
    assert rec["cache"]["status"] == "prefill"
    assert json.loads(run(tmp_path, "read", str(doc), "--json").stdout)["cache"]["status"] == "local"
    listed = [json.loads(line) for line in run(tmp_path, "cache", "ls", "--json").stdout.splitlines()]
    assert [e["key"] for e in listed] == [rec["key"]] and listed[0]["token_count"] > 10
    assert rec["key"][:20] in run(tmp_path, "cache", "ls").stdout
    stats = json.loads(run(tmp_path, "cache", "stats").stdout)
    assert stats["artifacts"] == 1 and stats["artifact_bytes"] > 0
    bad = run(tmp_path, "cache", "rm", "zz", check=False)
    assert bad.returncode == 2 and "matches 0 cached keys" in bad.stderr
    assert "removed" in run(tmp_path, "cache", "rm", rec["key"][:12]).stdout
    assert json.loads(run(tmp_path, "cache", "stats").stdout)["artifacts"] == 0
    run(tmp_path, "read", str(doc))
    assert "removed" in run(tmp_path, "cache", "clear").stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    proc = run(tmp_path, "read", str(tmp_path / "nope.txt"), check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tmp_path, "--model", str(tmp_path / "no-such-model"), "read", "x", check=False)
    assert proc.returncode == 2 and "cannot load model" in proc.stderr


def test_demo_runs_offline(tmp_path):
    proc = run(tmp_path, "demo", "--max-new-tokens", "12")
    assert "token-exact" in proc.stdout and "hit (local store)" in proc.stdout
