"""SDK warm vs raw reuse, old code beside new, in one run: where a warm read's time goes, stage by stage.

One child process per source tree (``--tree NAME=PATH``, repeatable; default: this checkout alone, as ``new``;
add e.g. ``--tree old=<a git worktree of e1c43f2>``), each with its own ``PYTHONPATH``, loads the embedded
model and reads the same documents (512 / 2048 / 4096 tokens) once. Each child first makes ``--steady-reads``
warm reads (what a long-running process leaves in its calibration file: the newest 512 outcomes); then the
parent alternates them, repeat by repeat (which tree goes first rotates), and each child times, per length,
one back-to-back pair (which path goes first alternates):

* raw — ``engine.generate(kv, question, 1 token)`` on the document's KV held in memory;
* SDK warm — the memory tier emptied outside the clock, then ``read_ids`` (key, tier lookups, store
  read + integrity check + decode, accounting), ``kv_of`` (a memory hit) and ``engine.generate`` of the
  first token on the KV the store gave (checked equal to the first token of a full prefill);

and one SDK warm read with every stage timed apart (key, memory lookup, store lookup / read / parse /
integrity / decode / touch, whatever else the resolver does, ``kv_of``, and the first token). Then each
child profiles ``--profile-reads`` warm reads with cProfile: call counts do not depend on the machine's load,
so they name the calls one tree makes and the other does not. Medians; SDK ÷ raw per length, old and new
side by side. JSON in ``benchmarks/results/warm_vs_raw.json``.

    git worktree add ../kvagent-e1c43f2 e1c43f2
    python -m benchmarks.warm_vs_raw --tree old=../kvagent-e1c43f2 --tree new=. [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Which vessel is the largest, and how many cars can it carry?"
#: Stages of one warm SDK read, in order (``store.*`` are ``KVStore.get``'s own timings).
STAGES = ("key", "store.lookup", "store.read", "store.parse", "store.integrity", "store.decode",
          "store.touch", "resolver.other", "kv_of", "generate")


# -- the child: one tree's kvagent, driven over stdin/stdout ------------------------------------------------
class _Child:
    """One tree's agent with its documents read, answering the parent's commands (one JSON line each)."""

    def __init__(self, lengths: list[int], threads: int) -> None:
        import hashlib
        import tempfile

        import torch

        from kvagent import KVAgent

        try:
            from kvagent.engines.params import GenerationParams
        except ImportError:  # the tree of e1c43f2
            from kvagent.engine import GenerationParams  # type: ignore[no-redef]
        from tests.conftest import long_text

        torch.manual_seed(0)
        if threads:
            torch.set_num_threads(threads)
        self.agent = KVAgent(None, cache_dir=tempfile.mkdtemp(prefix="kvagent-warm-"))
        self.one = GenerationParams(max_new_tokens=1, stop_token_ids=())
        self.engine = self.agent.engine
        assert self.agent.template is not None
        self.suffix = self.agent.template.question_ids(self.agent.tokenizer, QUESTION)
        self.docs: dict[int, tuple[list[int], Any, list[int]]] = {}
        digest = hashlib.sha256()
        for n in lengths:
            ids = self.agent.document_ids(long_text(n + 64, self.agent.tokenizer))[:n]
            digest.update(repr(ids).encode())
            self.agent.read_ids(ids)  # prefill + store once
            kv = self.engine.prefill(ids)
            want = self.engine.generate(None, ids + self.suffix, self.one).token_ids
            self.docs[n] = (ids, kv, want)
        self.ids_sha = digest.hexdigest()
        self.resolver_module = sys.modules[type(self.agent.resolver).__module__]

    def sdk(self, n: int) -> None:
        ids, _, want = self.docs[n]
        handle = self.agent.read_ids(ids)
        assert handle.cache.status == "local", handle.cache.reason
        kv = self.agent.kv_of(handle)
        assert self.engine.generate(kv, self.suffix, self.one).token_ids == want, "reuse != full prefill"

    def raw(self, n: int) -> None:
        _, kv, _ = self.docs[n]
        self.engine.generate(kv, self.suffix, self.one)

    def steady(self, reads: int) -> dict[str, Any]:
        """``reads`` warm reads of the shortest document (no generation), as a process that has answered
        that many leaves its calibration file (a tree that records outcomes keeps the newest 512), then
        its outcomes written."""
        ids = self.docs[min(self.docs)][0]
        for _ in range(reads):
            self.agent.forget_memory()
            self.agent.read_ids(ids)
        cost = getattr(self.agent.resolver, "cost", None)
        if cost is not None and hasattr(cost, "flush_outcomes"):
            cost.flush_outcomes()
        path = getattr(getattr(cost, "calibration", None), "path", None)
        outcomes = len(json.loads(path.read_text()).get("outcomes", [])) if path and path.exists() else 0
        return {"reads": reads, "outcomes_in_file": outcomes}

    def pair(self, n: int, sdk_first: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        for path in ("sdk", "raw") if sdk_first else ("raw", "sdk"):
            if path == "sdk":
                self.agent.forget_memory()
            t0 = time.perf_counter()
            self.sdk(n) if path == "sdk" else self.raw(n)
            out[path] = time.perf_counter() - t0
        return out

    def stages(self, n: int) -> dict[str, float]:
        """One warm SDK read with its stages timed apart (wrappers on this agent's own objects only)."""
        ids, _, want = self.docs[n]
        agent, store, mod = self.agent, self.agent.store, cast(Any, self.resolver_module)
        t: dict[str, float] = {"key": 0.0}
        get, key_fn = store.get, mod.document_key

        def timed_get(key: str, expect: Any = None, timings: dict[str, float] | None = None) -> Any:
            inner: dict[str, float] = {}
            t0 = time.perf_counter()
            found = get(key, expect=expect, timings=inner)
            t["store"] = t.get("store", 0.0) + time.perf_counter() - t0
            for k, v in inner.items():
                t[f"store.{k}"] = t.get(f"store.{k}", 0.0) + v
            return found

        def timed_key(*a: Any, **kw: Any) -> str:
            t0 = time.perf_counter()
            key: str = key_fn(*a, **kw)
            t["key"] += time.perf_counter() - t0
            return key

        agent.forget_memory()
        store.get, mod.document_key = timed_get, timed_key  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            handle = agent.read_ids(ids)
            t1 = time.perf_counter()
            kv = agent.kv_of(handle)
            t2 = time.perf_counter()
            got = self.engine.generate(kv, self.suffix, self.one).token_ids
            t3 = time.perf_counter()
        finally:
            del store.get
            mod.document_key = key_fn
        assert handle.cache.status == "local" and got == want
        t.update(kv_of=t2 - t1, generate=t3 - t2)
        t["resolver.other"] = (t1 - t0) - t["key"] - t.pop("store")
        return {k: t.get(k, 0.0) for k in STAGES}

    def profile(self, n: int, reads: int) -> dict[str, Any]:
        """cProfile over ``reads`` warm SDK reads: calls per function (by file name and function)."""
        import cProfile
        import pstats

        prof = cProfile.Profile()
        for _ in range(reads):
            self.agent.forget_memory()
            prof.enable()
            self.sdk(n)
            prof.disable()
        stats = pstats.Stats(prof)
        calls: dict[str, int] = {}
        cum: dict[str, float] = {}
        for (path, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            where = path if path.startswith("<") or path == "~" else "/".join(Path(path).parts[-2:])
            label = f"{where}:{name}"
            calls[label] = calls.get(label, 0) + nc
            cum[label] = max(cum.get(label, 0.0), ct)
        return {"reads": reads, "total_calls": sum(calls.values()), "calls": calls,
                "cumulative_s": dict(sorted(cum.items(), key=lambda kv: -kv[1])[:60])}


def child_main(lengths: list[int], threads: int) -> int:
    child = _Child(lengths, threads)
    print(json.dumps({"ready": True, "ids_sha256": child.ids_sha}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "pair":
            out: Any = child.pair(cmd["n"], cmd["sdk_first"])
        elif cmd["op"] == "steady":
            out = child.steady(cmd["reads"])
        elif cmd["op"] == "stages":
            out = child.stages(cmd["n"])
        elif cmd["op"] == "profile":
            out = child.profile(cmd["n"], cmd["reads"])
        else:
            break
        print(json.dumps(out), flush=True)
    child.agent.close()
    return 0


# -- the parent --------------------------------------------------------------------------------------------
class _Tree:
    def __init__(self, name: str, root: Path, lengths: list[int], threads: int) -> None:
        self.name, self.root = name, root
        paths = [root, root / "integrations" / "langchain", root / "integrations" / "vllm"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(threads), *map(str, lengths)]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True, check=False).stdout.strip() or root.name
        self.dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "kvagent"],
                                         capture_output=True, text=True, check=False).stdout.strip())

    def ask(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the {self.name} child ({self.root}) exited with {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    trees = [_Tree(name, path.resolve(), args.lengths, args.threads) for name, path in args.trees]
    names = [t.name for t in trees]
    load = [os.getloadavg()[0]]
    try:
        ready = [t.read() for t in trees]
        if len({r["ids_sha256"] for r in ready}) != 1:
            raise SystemExit("the trees read different token ids; nothing to compare")
        Timings = dict[str, dict[int, list[dict[str, float]]]]
        pairs: Timings = {t: {n: [] for n in args.lengths} for t in names}
        stages: Timings = {t: {n: [] for n in args.lengths} for t in names}
        steady = {t.name: t.ask(op="steady", reads=args.steady_reads) for t in trees}
        for _ in range(args.warm_up):  # first reads fault in code and pages
            for t in trees:
                for n in args.lengths:
                    t.ask(op="pair", n=n, sdk_first=True)
        for i in range(args.repeats):
            order = trees[i % len(trees):] + trees[: i % len(trees)]  # which tree goes first rotates
            for n in args.lengths:
                for t in order:
                    pairs[t.name][n].append(t.ask(op="pair", n=n, sdk_first=bool(i % 2)))
                    stages[t.name][n].append(t.ask(op="stages", n=n))
            print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        profiles = {t.name: {n: t.ask(op="profile", n=n, reads=args.profile_reads) for n in args.lengths}
                    for t in trees}
        load.append(os.getloadavg()[0])
    finally:
        for t in trees:
            t.close()
    rows = []
    for n in args.lengths:
        row: dict[str, Any] = {"tokens": n}
        for name in names:
            ps = pairs[name][n]
            raw, sdk = _median([p["raw"] for p in ps]), _median([p["sdk"] for p in ps])
            row[name] = {
                "raw_s": raw, "sdk_s": sdk, "sdk_keeps": raw / sdk,
                "sdk_keeps_paired": _median([p["raw"] / p["sdk"] for p in ps]),
                "stages_ms": {k: _median([s[k] for s in stages[name][n]]) * 1000 for k in STAGES},
                "calls_per_read": profiles[name][n]["total_calls"] / args.profile_reads,
                "pairs": ps,
            }
        rows.append(row)
    calls = [profiles[name][args.lengths[-1]]["calls"] for name in names]
    every = sorted(set().union(*calls))
    changed = [f for f in every if len({c.get(f, 0) for c in calls}) > 1]
    changed.sort(key=lambda f: -(max(c.get(f, 0) for c in calls) - min(c.get(f, 0) for c in calls)))
    return {
        "benchmark": "warm_vs_raw",
        "trees": {
            t.name: {"root": str(t.root), "commit": t.commit, "uncommitted_changes": t.dirty} for t in trees
        },
        "repeats": args.repeats,
        "torch_threads": args.threads or "default",
        "steady": steady,
        "profile_reads": args.profile_reads,
        "load_avg_1min": load,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "calls_changed_at_longest": [
            {"function": f,
             "per_read": {n: c.get(f, 0) / args.profile_reads for n, c in zip(names, calls, strict=True)}}
            for f in changed[: args.show_calls]
        ],
        "profiles": profiles,
    }


def print_result(result: dict[str, Any]) -> None:
    names = list(result["trees"])
    print(f"SDK warm ÷ raw, medians of {result['repeats']} rotating pairs, after "
          f"{result['steady'][names[0]]['reads']} warm reads per process; trees: "
          + ", ".join(f"{n} {t['commit']}{' + changes' if t['uncommitted_changes'] else ''} "
                      f"({result['steady'][n]['outcomes_in_file']} outcomes in its calibration file)"
                      for n, t in result["trees"].items()))
    print(f"{'tokens':>6} | " + " | ".join(f"{n + ' raw':>10} {n + ' SDK':>10} {'keeps':>6} {'paired':>6}"
                                            for n in names) + " | calls/read")
    for r in result["rows"]:
        cells = [f"{r[n]['raw_s'] * 1e3:8.1f}ms {r[n]['sdk_s'] * 1e3:8.1f}ms {r[n]['sdk_keeps']:6.1%} "
                 f"{r[n]['sdk_keeps_paired']:6.1%}" for n in names]
        calls = " ".join(f"{r[n]['calls_per_read']:.0f}" for n in names)
        print(f"{r['tokens']:>6} | " + " | ".join(cells) + f" | {calls}")
    print(f"\nwarm read stages (ms, median): {' / '.join(names)}")
    print(f"{'tokens':>6} " + " ".join(f"{s:>22}" for s in STAGES))
    for r in result["rows"]:
        cells = ["/".join(f"{r[n]['stages_ms'][s]:.2f}" for n in names) for s in STAGES]
        print(f"{r['tokens']:>6} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\ncalls per read that differ (longest document): {' / '.join(names)}")
    for c in result["calls_changed_at_longest"]:
        print("  " + " ".join(f"{c['per_read'][n]:8.1f}" for n in names) + f"  {c['function']}")


def _tree(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--tree takes NAME=PATH, not {spec!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        sys.path.insert(0, os.getcwd())  # the tree's own tests.conftest
        return child_main([int(a) for a in argv[2:]], int(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", dest="trees", type=_tree, action="append", metavar="NAME=PATH",
                   help="a source tree to time (repeatable; default: this checkout alone, as new)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warm-up", type=int, default=2)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per child (0: torch's default; 1 keeps a shared machine's other work "
                        "from stalling every parallel region)")
    p.add_argument("--steady-reads", type=int, default=512,
                   help="warm reads before timing, as a long-running process has done (0: a fresh process)")
    p.add_argument("--profile-reads", type=int, default=10)
    p.add_argument("--show-calls", type=int, default=40)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "warm_vs_raw.json")
    args = p.parse_args(argv)
    args.trees = args.trees or [("new", REPO)]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_result(result)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
