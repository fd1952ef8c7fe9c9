"""Decision cost: the embedded engine (in-process wasm) vs OPA over loopback.

    python -m bench.policy_engine [--decisions 2000] [--runs 5] [--concurrency 1,16]

Both engines as the gateway builds them, with no decision cache in front:

- ``opa``: :class:`~gateway.policy.opa.OpaEngine` against the supervised
  local OPA (:class:`~gateway.policy.supervisor.LocalOpa`: ``opa run
  --server`` on 127.0.0.1, polling the bundle built from policies/rego), one
  pooled keep-alive session, as ``[policy] engine = "opa"`` runs;
- ``embedded``: :class:`~gateway.policy.embedded.EmbeddedEngine` on the same
  directory, as ``[policy] engine = "embedded"`` runs.

Each run sends ``--decisions`` decisions to one engine (the 37 conformance
vectors' inputs in turn, authz and egress through ``nops/authz/decision``),
``--concurrency`` of them in flight, on uvloop, then to the other; engines
alternate within a run so the machine's drift hits both. Measured per
decision: the CPU of this process plus OPA's (user + system, /proc; OPA's is
0 for the embedded engine) and, at concurrency 1, the latency (p50, p99) of
``decide``. Figures are medians over ``--runs``; the ratios OPA/embedded are
printed last. No figure is asserted anywhere: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench.harness import OPA, ROOT, cpu_seconds, median
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engine import PolicyEngine
from gateway.policy.opa import OpaEngine
from gateway.policy.supervisor import LocalOpa

POLICY_DIR = ROOT / "policies" / "rego"
DECISION_PATH = "nops/authz/decision"


def inputs() -> list[dict[str, Any]]:
    """The conformance vectors' inputs whose decision path is the gateway's."""
    documents = []
    for path in sorted((ROOT / "conformance" / "vectors").glob("*.json")):
        vector = json.loads(path.read_text())
        documents.append(vector["input"])
    return documents


async def one_run(
    engine: PolicyEngine, documents: Sequence[dict[str, Any]], count: int, concurrency: int,
    opa_pid: int | None,
) -> dict[str, float]:  # fmt: skip
    """CPU µs per decision (this process + OPA) and, one at a time, latency percentiles."""
    latencies: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            await engine.decide(documents[i % len(documents)], "bench")
            latencies.append(time.perf_counter() - started)

    opa_before = cpu_seconds(opa_pid) if opa_pid else 0.0
    own_before = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    own = time.process_time() - own_before
    opa = (cpu_seconds(opa_pid) - opa_before) if opa_pid else 0.0
    latencies.sort()
    return {
        "cpu_us": (own + opa) / count * 1e6,
        "gateway_cpu_us": own / count * 1e6,
        "opa_cpu_us": opa / count * 1e6,
        "decisions_per_s": count / wall,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


async def measure(decisions: int, runs: int, concurrencies: Sequence[int]) -> dict[str, Any]:
    documents = inputs()
    local = LocalOpa(OPA, POLICY_DIR)
    await local.start()
    opa = OpaEngine(local.url, decision_path=DECISION_PATH, timeout_s=5)
    await opa.start()
    embedded = EmbeddedEngine(OPA, POLICY_DIR, decision_path=DECISION_PATH)
    await embedded.start()
    engines: dict[str, tuple[PolicyEngine, int | None]] = {
        "opa": (opa, local.pid),
        "embedded": (embedded, None),
    }
    results: dict[str, Any] = {}
    try:
        for name, (engine, _) in engines.items():  # warm-up: connections, JIT-free paths
            await one_run(engine, documents, 300, 1, None)
            # Same answers, or the comparison is meaningless.
            for document in documents:
                assert (await engine.decide(document, "w")).allow == (
                    await embedded.decide(document, "w")
                ).allow, name
        for concurrency in concurrencies:
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
            for run in range(runs):
                order = list(engines) if run % 2 == 0 else list(reversed(engines))
                for name in order:
                    engine, pid = engines[name]
                    samples[name].append(
                        await one_run(engine, documents, decisions, concurrency, pid)
                    )
            results[f"c{concurrency}"] = {
                name: {key: median([s[key] for s in rows]) for key in rows[0]}
                for name, rows in samples.items()
            }
    finally:
        await embedded.close()
        await opa.close()
        await local.stop()
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "concurrency engine     CPU µs/decision (gw + opa)   decisions/s   p50 µs   p99 µs",
    ]
    for regime, engines in results.items():
        for name, m in engines.items():
            lines.append(
                f"{regime[1:]:>11} {name:<10} {m['cpu_us']:8.1f} "
                f"({m['gateway_cpu_us']:6.1f} + {m['opa_cpu_us']:6.1f})"
                f"   {m['decisions_per_s']:11.0f}   {m['p50_us']:6.0f}   {m['p99_us']:6.0f}"
            )
        opa, emb = engines["opa"], engines["embedded"]
        lines.append(
            f"{'':>11} ratio opa/embedded: CPU {opa['cpu_us'] / emb['cpu_us']:.1f}x, "
            f"throughput {emb['decisions_per_s'] / opa['decisions_per_s']:.1f}x, "
            f"p50 {opa['p50_us'] / emb['p50_us']:.1f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_engine", description=__doc__)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated in-flight counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = uvloop.run(measure(args.decisions, args.runs, concurrencies))
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
