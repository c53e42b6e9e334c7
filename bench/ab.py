"""Benchmark: two or more versions of the sidecar side by side, interleaved, on a noisy machine.

Each version is a source tree (a git worktree, say) whose sidecar runs as ``python -m sidecar
run`` from that tree, against one fast fake upstream (bench/upstream.py). Every round measures
each version in turn, in a fresh sidecar process, the order reversed every other round (A B,
B A, ...), so the machine's drift falls on all of them alike: calls/s of small answers at c=64
(wrk), the sidecar's CPU time per call there, and p50 and p99 latency at c=1 (wrk); the upstream
called directly at c=1 gives the latency the sidecar adds. Prints each round, then the medians
and each version's ratio to the first.

    python -m bench.ab hand=../tree-a structlog=../tree-b [--rounds 7] [--seconds 4]
        [--keep-logs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import cpu_seconds
from bench.overhead import child, free_port, median, wait_port, wrk


def sidecar_env(tmp: Path, name: str, upstream: int) -> dict[str, str]:
    """The environment of one sidecar: limiter off, default (JSON, info) logging."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))}
    base.pop("PYTHONPATH", None)
    return base | {
        "BITRIX_PORTAL": f"http://127.0.0.1:{upstream}", "BITRIX_CLIENT_ID": "local.bench.1",
        "BITRIX_CLIENT_SECRET": "bench-secret", "BITRIX_AUTH_CODE": "any",
        "SIDECAR_DB": str(tmp / f"{name}.db"), "SIDECAR_LISTEN": f"127.0.0.1:{free_port()}",
        "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{free_port()}", "SIDECAR_RATE": "0",
    }


def measure(tree: str, env: dict[str, str], seconds: float,
            log: Path) -> tuple[float, float, float, float]:
    """Start a sidecar from ``tree``, warm it up, measure it, stop it.

    Returns calls/s at c=64, its CPU ms per call there, and p50 and p99 ms at c=1. A fresh
    process each time: one process can run persistently faster or slower than another of the
    same code (where the scheduler puts it, its hash seed), which interleaving alone does not
    even out.
    """
    port = int(env["SIDECAR_LISTEN"].rsplit(":", 1)[1])
    url = f"http://127.0.0.1:{port}/rest/bench.small"
    # -m puts the working directory, the tree, first on sys.path.
    with child([sys.executable, "-m", "sidecar", "run"], env=env, log=log,
               cwd=Path(tree)) as proc:
        wait_port(port)
        wrk(url, 64, 1)  # the first calls of a fresh process are slower
        before = cpu_seconds(proc.pid)
        rate, _, _, count = wrk(url, 64, seconds)
        cpu = (cpu_seconds(proc.pid) - before) * 1000 / count
        _, p50, p99, _ = wrk(url, 1, seconds, threads=1)
    return rate, cpu, p50, p99


def main() -> None:
    """Run the rounds and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", metavar="NAME=TREE",
                        help="a name and the source tree whose sidecar/ package to run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the sidecars' logs (some 20 MB a measurement)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    trees = dict(version.split("=", 1) for version in args.versions)
    for name, tree in trees.items():
        if not (Path(tree) / "sidecar" / "__init__.py").is_file():
            sys.exit(f"{name}: {tree} has no sidecar package")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    upstream = free_port()
    rows: dict[tuple[str, str], list[float]] = {}
    names = list(trees)
    with child([sys.executable, "-m", "bench.upstream", "--port", str(upstream)]):
        wait_port(upstream)
        direct = f"http://127.0.0.1:{upstream}/rest/bench.small?auth=x"
        print(f"{args.rounds} rounds of {args.seconds:g} s per measurement, a fresh sidecar "
              "process for each; the order reversed every other round\n")
        print("| round | version | calls/s c=64 | CPU ms/call | p50 ms c=1 | p99 ms c=1 |")
        print("|---|---|---|---|---|---|")
        for number in range(args.rounds):
            order = names if number % 2 == 0 else names[::-1]
            _, p50, _, _ = wrk(direct, 1, args.seconds, threads=1)
            rows.setdefault(("direct p50 ms c=1", "direct"), []).append(p50)
            for name in order:
                rate, cpu, p50, p99 = measure(trees[name], sidecar_env(tmp, name, upstream),
                                              args.seconds, tmp / f"{name}-{number + 1}.log")
                for key, value in (("calls/s c=64", rate), ("CPU ms/call", cpu),
                                   ("p50 ms c=1", p50), ("p99 ms c=1", p99)):
                    rows.setdefault((key, name), []).append(value)
                print(f"| {number + 1} | {name} | {rate:.0f} | {cpu:.3f} | {p50:.3f} | "
                      f"{p99:.3f} |", flush=True)
    direct_p50 = median(rows[("direct p50 ms c=1", "direct")])
    print(f"\nmedians (direct p50 at c=1: {direct_p50:.3f} ms)\n")
    first = names[0]
    head = "| measurement | " + " | ".join(names) + " | " + " | ".join(
        f"{name} / {first}" for name in names[1:]) + " |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    kinds = ["calls/s c=64", "CPU ms/call", "p50 ms c=1", "p99 ms c=1"]
    for kind in [*kinds, "added p50 ms c=1"]:
        if kind == "added p50 ms c=1":
            values = {n: median(rows[("p50 ms c=1", n)]) - direct_p50 for n in names}
        else:
            values = {n: median(rows[(kind, n)]) for n in names}
        cells = " | ".join(f"{values[n]:.3f}" for n in names)
        ratios = " | ".join(f"{values[n] / values[first]:.3f}" for n in names[1:])
        print(f"| {kind} | {cells} | {ratios} |")
    print()
    for name in names[1:]:
        faster = sum(b > a for a, b in zip(rows[("calls/s c=64", first)],
                                          rows[("calls/s c=64", name)], strict=True))
        print(f"{name} served more calls/s than {first} in {faster} of {args.rounds} rounds")
    if args.keep_logs:
        print(f"\nlogs in {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
