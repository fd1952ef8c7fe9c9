"""A writer process for the crash test (``python -m tests.audit_writer DIR``).

Appends from 64 concurrent tasks forever and prints the seq of every record
the log acknowledged (one per line, flushed), so the test knows exactly what
was promised before it kills this process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from audit import Entry
from audit.setup import AuditSettings, open_audit_log

WORKERS = 256


async def main(directory: Path) -> None:
    log = await open_audit_log(
        AuditSettings(
            path=directory / "audit.jsonl",
            spool_path=directory / "spool.jsonl",
            chain_id="crash-test",
            checkpoint_every=500,
        )
    )
    out = sys.stdout

    async def worker(number: int) -> None:
        n = 0
        while True:
            record = await log.append(
                Entry(
                    outcome="allow",
                    stage="audit",
                    request_id=f"{number}-{n}",
                    reasons=("padding-" + "x" * 300,),
                )
            )
            out.write(f"{record.seq}\n")
            out.flush()
            n += 1

    print("ready", flush=True)
    await asyncio.gather(*(worker(i) for i in range(WORKERS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
