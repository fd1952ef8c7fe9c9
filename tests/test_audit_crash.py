"""Crash safety: a writer process killed with SIGKILL mid-batch loses no acknowledged record."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from audit.verify import verify_file
from tests.audit_support import entry, open_log, read_records, trusted_keys
from tests.conftest import ROOT

#: Seconds the writer runs before each SIGKILL: not aligned with its output, so
#: the kill lands wherever the writer happens to be (mostly inside write+fsync).
KILL_AFTER_S = (0.2, 0.35, 0.5, 0.8, 1.3)


def _run_and_kill(directory: Path, seconds: float) -> set[int]:
    """Start the writer, SIGKILL it after ``seconds``; return every seq it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.audit_writer", str(directory)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    stdout = process.stdout
    acked: set[int] = set()

    def read_acks() -> None:
        for line in stdout:
            if line.endswith(b"\n"):  # a line cut by the kill was never fully printed
                acked.add(int(line))

    try:
        assert stdout.readline() == b"ready\n"
        reader = threading.Thread(target=read_acks)
        reader.start()
        time.sleep(seconds)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
    assert process.returncode == -signal.SIGKILL
    return acked


class TestCrashSafety:
    async def test_sigkill_mid_batch_loses_no_acknowledged_record(self, tmp_path: Path) -> None:
        """Five kills of a busy writer: every acked seq is present and the chain verifies."""
        acked: set[int] = set()
        for seconds in KILL_AFTER_S:
            acked |= await asyncio.to_thread(_run_and_kill, tmp_path, seconds)
        log = await open_log(tmp_path, chain_id="crash-test")
        record = await log.append(entry())
        await log.close()
        stored = [document["seq"] for document in read_records(tmp_path / "audit.jsonl")]
        assert stored == list(range(1, record.seq + 1))
        missing = acked - set(stored)
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
        report = verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path))
        assert report.intact, report.damage
        assert report.checkpoints >= 1
        assert len(acked) >= 1000
