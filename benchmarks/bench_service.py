"""Latency and throughput of the BentoML service on loopback, and the server's memory.

Starts `bentoml serve cotgen.serve.service:Cotgen` on a free 127.0.0.1 port against the
promoted model (``cotgen-verified:latest`` of the BentoML store: ``$BENTOML_HOME``, default
``~/bentoml``; ``--home`` names another; ``--tiny`` first trains the tiny pipeline in a
temporary folder and promotes it into a temporary store), then, for each strategy and
concurrency, sends ``--requests`` `/generate` requests (different seeds) from that many
client threads, each cell bounded by ``--max-seconds``. Prints p50/p95 latency and
throughput per cell and the server's resident memory (main process + workers) before the
first and after the last request.

Usage: python benchmarks/bench_service.py [--tiny | --home DIR] [--n 8] [--requests 16]
       [--concurrency 1,4,16] [--strategies sample,parm] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a star and a heart",
           "a photo of a green triangle and a yellow cross"]  # GenEval templates (parm_pp parses them)


def tiny_model(home: Path) -> str:
    """Train the tiny pipeline in a temporary root; save and promote it into ``home``."""
    os.environ["BENTOML_HOME"] = str(home)
    from cotgen.pipeline.params import load_params
    from cotgen.pipeline.stages import PATHS, run_stage, sampling_config
    from cotgen.registry import promote, save_candidate
    from cotgen.search import SearchConfig

    root = Path(tempfile.mkdtemp(prefix="cotgen-bench-root-"))
    params = load_params(REPO / "params.yaml", "tiny")
    for stage in ["prompts", "detector", "render_ground_truth", "score_ground_truth", "tokenizer", "generator",
                  "trajectories", "judge"]:
        run_stage(stage, params, root)
    scores = {"overall": 0.0, "tags": {}}  # not evaluated: only the speed is measured
    tag = save_candidate(root / PATHS["generator"], root / PATHS["judge"], sampling_config(params, 8),
                         SearchConfig("parm"), scores, root=root)
    return str(promote(tag))


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MiB (psutil, else /proc)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20
    except ImportError:
        pids, total = [pid], 0
        while pids:
            p = pids.pop()
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
                pids += [int(c) for c in children]
            except OSError:
                pass
        return total / 2**20


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_cell(url: str, strategy: str, n: int, concurrency: int, requests: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors = [], 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal errors
        with httpx.Client(timeout=300) as client:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "strategy": strategy, "n": n, "seed": 1000 + i}
                t = time.perf_counter()
                r = client.post(f"{url}/generate", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    return {"strategy": strategy, "n": n, "concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "throughput_rps": len(latencies) / wall, "wall_s": wall}


def measure(server, args) -> tuple[dict, list[dict], float, float]:
    """Every (strategy, concurrency) cell against a running server; returns /info, the rows and
    the server's RSS (MiB) before and after."""
    import httpx

    url, proc = server.url, server.proc
    info = httpx.post(f"{url}/info", json={}, timeout=30).json()
    rss_before = rss_mb(proc.pid)
    print(f"model {info['tag']} (promoted strategy {info['strategy']}), ready in {server.ready_seconds:.1f} s, "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    for strategy in args.strategies.split(","):
        httpx.post(f"{url}/generate", json={"prompt": PROMPTS[0], "strategy": strategy, "n": args.n},
                   timeout=300).raise_for_status()  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            row = run_cell(url, strategy, args.n, c, args.requests, args.max_seconds)
            rows.append(row)
            print(f"  {strategy:>9} c={c:<3} {row['requests']} ok, {row['errors']} errors, "
                  f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, {row['throughput_rps']:.2f} req/s",
                  flush=True)
    return info, rows, rss_before, rss_mb(proc.pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="train and promote the tiny pipeline into a temporary store")
    ap.add_argument("--home", type=Path, help="BentoML store to serve from (default: $BENTOML_HOME or ~/bentoml)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="requests per cell")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--strategies", default="sample,parm")
    ap.add_argument("--max-seconds", type=float, default=60, help="time bound per cell")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    if args.tiny:
        home = Path(tempfile.mkdtemp(prefix="cotgen-bench-bentoml-"))
        print(f"training the tiny pipeline; promoted {tiny_model(home)} into {home}", flush=True)
        env["BENTOML_HOME"] = str(home)
    elif args.home:
        env["BENTOML_HOME"] = str(args.home)
    from cotgen.serve.launch import serving

    log = Path(tempfile.mkstemp(prefix="cotgen-bench-serve-", suffix=".log")[1])
    try:
        with serving(env, log, timeout=300) as server:
            info, rows, rss_before, rss_after = measure(server, args)
    except RuntimeError as e:  # the server did not come up (the message ends with its log)
        sys.exit(str(e))

    print()
    print(f"| strategy | n | concurrency | requests | errors | p50 (s) | p95 (s) | throughput (req/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['n']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['throughput_rps']:.2f} |")
    print(f"\nserver RSS (main process + workers): {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    if args.json:
        args.json.write_text(json.dumps({"model": info["tag"], "rows": rows, "rss_mb_before": rss_before,
                                         "rss_mb_after": rss_after}, indent=2) + "\n")


if __name__ == "__main__":
    main()
