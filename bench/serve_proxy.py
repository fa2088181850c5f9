"""Ray Serve's proxy vs the plain server: time to first audio and memory per replica.

    uv run --extra voice --extra cluster python bench/serve_proxy.py [--replicas 2]
        [--concurrency 1 8] [--seconds 8] [--rounds 3]

Starts the plain server and `rtserver serve --replicas N` (a local Ray cluster; each replica
reserves one CPU, or what --replica-cpus says) side by side and loads them in turns, the same
load on each, so that what else runs on the machine weighs on both alike. Both have the
benchmark limits of bench/http_load.py, whose load generator this reuses: N clients send
one-sentence `/tts/pcm` requests back to back.
Memory: the resident set of each replica process and of the plain server once the load is
done, and what the Ray cluster itself (GCS, raylet, Serve's controller and proxy, ...) adds.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx
from http_load import level
from report import git_rev, machine, pct, write_section
from serverproc import ServerProcess, alive, descendants, rss_mb

LIMITS = ["--max-streams", "64", "--max-client-streams", "0", "--max-client-sockets", "0"]
REPLICA_TITLE = "ray::ServeReplica:"  # the process title Ray gives a Serve replica


def ttfas(srv: ServerProcess, n: int, seconds: float) -> list[float]:
    spk = httpx.get(f"{srv.base_url}/speakers").json()[0]
    res = asyncio.run(level(srv.base_url, "/tts/pcm", spk["id"], spk["sample_rate"], n, seconds))
    return [r["ttfa"] * 1000 for r in res]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", default="1")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=8.0, help="per level and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--section", default="serve_proxy")
    args = ap.parse_args()
    started = machine()

    # Both run at once, and the levels alternate between them: the load other programs put
    # on the machine then weighs on both alike. Whichever waits costs little.
    direct = ServerProcess(*LIMITS)
    cluster = ServerProcess(*LIMITS, "--replicas", str(args.replicas),
                            "--replica-cpus", args.replica_cpus)  # fmt: skip
    try:
        direct.wait_ready(timeout=300)
        cluster.wait_log(rf"ready: {args.replicas} replicas on ", timeout=600)
        for srv in (direct, cluster):
            ttfas(srv, 1, 3.0)  # warm up: first requests, connections
        got: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for n in args.concurrency:
                for name, srv in (("direct", direct), ("proxy", cluster)):
                    got.setdefault((name, n), []).extend(ttfas(srv, n, args.seconds))
                    print(f"round {r} {name} N={n}: p50 {pct(got[name, n], 50):.0f} ms", flush=True)
        plain = {n: pct(got["direct", n], 50) for n in args.concurrency}
        proxied = {n: pct(got["proxy", n], 50) for n in args.concurrency}
        counts = {n: (len(got["direct", n]), len(got["proxy", n])) for n in args.concurrency}
        plain_rss = rss_mb(direct.proc.pid)
        ray = alive(descendants(cluster.proc.pid))
        replicas = sorted(rss_mb(p) for p in ray if cmdline(p).startswith(REPLICA_TITLE))
        overhead = sum(rss_mb(p) for p in ray) - sum(replicas) + rss_mb(cluster.proc.pid)
    finally:
        direct.stop()
        cluster.stop()

    rows = [
        f"| {n} | {counts[n][0]} / {counts[n][1]} | {plain[n]:.0f} | {proxied[n]:.0f} | "
        f"{proxied[n] - plain[n]:+.0f} |"
        for n in args.concurrency
    ]
    body = f"""## Ray Serve proxy vs direct (piper, `/tts/pcm`)

Command: `uv run --extra voice --extra cluster python bench/serve_proxy.py` (commit
{git_rev()}). Machine: {started}.
Direct: one `rtserver serve`. Through the proxy: `rtserver serve --replicas {args.replicas}
--replica-cpus {args.replica_cpus}` on a local Ray cluster. Same limits and load as the HTTP
load benchmark: N clients, one-sentence requests back to back. Both run at once and take
turns, {args.rounds} rounds of {args.seconds:.0f} s per level each, so that other load on the
machine weighs on both alike. TTFA: request sent -> first audio byte.

| N | requests direct / proxy | TTFA p50 direct ms | TTFA p50 through the proxy ms | difference ms |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Memory (resident, after the load): the plain server {plain_rss:.0f} MB; each replica
{", ".join(f"{r:.0f}" for r in replicas)} MB; the Ray cluster around them (the command, GCS,
raylet, Serve's controller and proxy, Ray's agents) {overhead:.0f} MB in all.

At concurrency 1 the difference is what the proxy hop costs (the request and every audio
chunk pass through one more process, the proxy). At 8 the replicas also share the
same two cores, two engines instead of one; the comparison is one machine either way.
"""
    write_section(args.section, body)


if __name__ == "__main__":
    main()
