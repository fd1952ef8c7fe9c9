"""The chain on the real file system: appends, group commit, recovery, checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from pathlib import Path

import orjson
import pytest

from audit import AppendFailed, Entry, Summarizer
from audit.checkpoint import DEFAULT_KEY_NAME
from audit.record import genesis_hash, record_hash
from audit.setup import CHAIN_ID_FILE, open_audit_log
from audit.stores import StoreError
from audit.stores.file import checkpoints_path
from audit.verify import verify_file
from tests.audit_support import (
    append_behind_a_held_write,
    entry,
    open_log,
    public_key_file,
    read_lines,
    read_records,
    settings,
    trusted_keys,
    write_lines,
)


class TestAppend:
    async def test_records_link_into_a_chain_that_verifies(self, tmp_path: Path) -> None:
        """Each record names its predecessor's hash; the verifier finds the chain intact."""
        log = await open_log(tmp_path)
        records = [await log.append(entry(n)) for n in range(5)]
        await log.close()
        assert [r.seq for r in records] == [1, 2, 3, 4, 5]
        assert records[0].prev_hash == genesis_hash("test-chain")
        for prev, record in itertools.pairwise(records):
            assert record.prev_hash == prev.hash
        stored = read_records(tmp_path / "audit.jsonl")
        assert [d["hash"] for d in stored] == [r.hash for r in records]
        assert all(record_hash(d) == d["hash"] for d in stored)
        report = verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path))
        assert report.intact, report.damage
        assert (report.records, report.last_seq) == (5, 5)

    async def test_append_returns_only_once_durable(self, tmp_path: Path) -> None:
        """When append returns, the record is already in the file (fsync'd before release)."""
        log = await open_log(tmp_path)
        record = await log.append(entry())
        assert read_records(tmp_path / "audit.jsonl")[-1]["hash"] == record.hash
        await log.close()

    async def test_reopening_continues_the_chain(self, tmp_path: Path) -> None:
        """A second run continues from the last record, with the same chain id."""
        first = await open_log(tmp_path, chain_id="")
        await first.append(entry(1))
        await first.close()
        second = await open_log(tmp_path, chain_id="")
        record = await second.append(entry(2))
        await second.close()
        assert record.seq == 2
        assert record.chain_id == (tmp_path / CHAIN_ID_FILE).read_text().strip()
        assert verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path)).intact

    async def test_records_hold_no_secret_material(self, tmp_path: Path) -> None:
        """A record has exactly the documented fields: no headers, tokens or signatures."""
        log = await open_log(tmp_path)
        await log.append(entry())
        await log.close()
        (document,) = read_records(tmp_path / "audit.jsonl")
        assert set(document) == {
            "seq",
            "chain_id",
            "ts",
            "request_id",
            "decision_id",
            "tenant",
            "subject",
            "stage",
            "outcome",
            "status",
            "code",
            "reasons",
            "policy_revision",
            "input_digest",
            "prev_hash",
            "hash",
        }

    async def test_closed_log_refuses_appends(self, tmp_path: Path) -> None:
        """After close, append raises AppendFailed instead of hanging."""
        log = await open_log(tmp_path)
        await log.close()
        with pytest.raises(AppendFailed):
            await log.append(entry())


class TestGroupCommit:
    async def test_concurrent_appends_share_fsyncs(self, tmp_path: Path) -> None:
        """1000 concurrent appends: all durable, in far fewer fsyncs than records."""
        log = await open_log(tmp_path, checkpoint_every=10_000)
        records = await asyncio.gather(*(log.append(entry(n)) for n in range(1000)))
        syncs = log.store.syncs
        batches = log.stats.batches
        await log.close()
        assert sorted(r.seq for r in records) == list(range(1, 1001))
        assert syncs == batches
        assert syncs <= 10, f"{syncs} fsyncs for 1000 records"
        assert verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path)).intact

    async def test_appends_during_a_commit_join_the_next_single_commit(
        self, tmp_path: Path
    ) -> None:
        """Records arriving while a write is in flight all go in ONE next write.

        A hook on the store's ``write`` holds the first batch in flight (as a
        slow fsync would) and counts the records of every durable write.
        """
        log = await open_log(tmp_path, checkpoint_every=10_000)
        held = await append_behind_a_held_write(log, 200)
        syncs = log.store.syncs
        await log.close()
        assert held.writes_while_held == [1]
        assert held.writes == [1, 200]
        assert syncs == 2
        assert [r.seq for r in held.records] == list(range(1, 202))
        assert verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path)).intact

    async def test_batches_never_exceed_batch_max(self, tmp_path: Path) -> None:
        """batch_max caps a group commit: 1000 appends at batch_max 100 take >= 10 writes."""
        log = await open_log(tmp_path, batch_max=100)
        await asyncio.gather(*(log.append(entry(n)) for n in range(1000)))
        syncs = log.store.syncs
        await log.close()
        assert 10 <= syncs <= 20

    async def test_sequential_appends_each_get_a_write(self, tmp_path: Path) -> None:
        """Without concurrency nothing waits for company: one write per append."""
        log = await open_log(tmp_path)
        for n in range(5):
            await log.append(entry(n))
        assert log.store.syncs == 5
        await log.close()


class TestRecovery:
    async def test_torn_last_line_is_cut_and_the_chain_continues(self, tmp_path: Path) -> None:
        """A crash mid-write leaves an unterminated line: it is dropped on open."""
        log = await open_log(tmp_path)
        for n in range(3):
            await log.append(entry(n))
        await log.close()
        path = tmp_path / "audit.jsonl"
        with path.open("ab") as handle:
            handle.write(b'{"seq":4,"chain_id":"test-ch')
        log = await open_log(tmp_path)
        record = await log.append(entry(4))
        await log.close()
        assert record.seq == 4
        assert verify_file(path, keys=trusted_keys(tmp_path)).intact

    async def test_damaged_complete_last_line_refuses_to_open(self, tmp_path: Path) -> None:
        """A complete but altered last record is tampering, not a crash: refuse to start."""
        log = await open_log(tmp_path)
        await log.append(entry(1))
        await log.close()
        path = tmp_path / "audit.jsonl"
        path.write_bytes(path.read_bytes().replace(b'"acme"', b'"evil"'))
        with pytest.raises(StoreError, match="fails its hash check"):
            await open_log(tmp_path)

    async def test_a_second_writer_is_refused(self, tmp_path: Path) -> None:
        """One writer per file: a second log on the same path fails to open."""
        log = await open_log(tmp_path)
        with pytest.raises(StoreError, match="locked by another writer"):
            await open_log(tmp_path)
        await log.close()

    async def test_log_shorter_than_its_checkpoint_refuses_to_open(self, tmp_path: Path) -> None:
        """A cut tail behind a signed checkpoint is detected at start-up."""
        log = await open_log(tmp_path, checkpoint_every=5)
        for n in range(10):
            await log.append(entry(n))
        await log.close()
        path = tmp_path / "audit.jsonl"
        write_lines(path, read_lines(path)[:7])
        with pytest.raises(StoreError, match="truncated"):
            await open_log(tmp_path)
        with pytest.raises(StoreError, match="truncated"):  # and the file lock was released
            await open_log(tmp_path)

    async def test_another_chains_file_refuses_to_open(self, tmp_path: Path) -> None:
        """A file holds one chain: opening it under another chain id fails."""
        log = await open_log(tmp_path)
        await log.append(entry())
        await log.close()
        with pytest.raises(StoreError, match="one file holds one chain"):
            await open_log(tmp_path, chain_id="other-chain")


class TestCheckpoints:
    async def test_every_n_records_and_at_close(self, tmp_path: Path) -> None:
        """checkpoint_every=10: one after each 10 records (per batch) and a final one."""
        log = await open_log(tmp_path, checkpoint_every=10)
        for n in range(25):
            await log.append(entry(n))
        await log.close()
        documents = [
            orjson.loads(x) for x in read_lines(checkpoints_path(tmp_path / "audit.jsonl"))
        ]
        assert [d["seq"] for d in documents] == [10, 20, 25]
        assert documents[0]["prev_checkpoint_hash"] == "0" * 64
        assert documents[1]["prev_checkpoint_hash"] == documents[0]["hash"]
        assert verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path)).checkpoints == 3

    async def test_every_t_seconds(self, tmp_path: Path) -> None:
        """checkpoint_interval_s: a quiet log still gets its head signed."""
        log = await open_log(tmp_path, checkpoint_every=1000, checkpoint_interval_s=0.2)
        await log.append(entry())
        for _ in range(100):
            if log.stats.checkpoints:
                break
            await asyncio.sleep(0.02)
        assert log.stats.checkpoints == 1
        await log.close()

    async def test_checkpoints_resume_their_chain_after_restart(self, tmp_path: Path) -> None:
        """A restarted log links its next checkpoint to the last stored one."""
        for run in range(2):
            log = await open_log(tmp_path, checkpoint_every=3)
            for n in range(3):
                await log.append(entry(run * 3 + n))
            await log.close()
        report = verify_file(tmp_path / "audit.jsonl", keys=trusted_keys(tmp_path))
        assert report.intact, report.damage
        assert (report.checkpoints, report.last_checkpoint_seq) == (2, 6)

    async def test_generated_key_is_private_and_its_public_half_is_beside_it(
        self, tmp_path: Path
    ) -> None:
        """First start creates the signing key with mode 0600 and writes the public key."""
        log = await open_log(tmp_path)
        await log.close()
        private = tmp_path / DEFAULT_KEY_NAME
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert public_key_file(tmp_path).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    async def test_a_key_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """Like ssh: a signing key with group or other access is not used."""
        log = await open_log(tmp_path)
        await log.close()
        os.chmod(tmp_path / DEFAULT_KEY_NAME, 0o644)
        with pytest.raises(Exception, match="chmod 600"):
            await open_log(tmp_path)

    async def test_configured_key_file_is_used(self, tmp_path: Path) -> None:
        """signing_key_file names the key; its public half goes to the data directory."""
        first = await open_log(tmp_path / "a")
        await first.close()
        key = tmp_path / "a" / DEFAULT_KEY_NAME
        log = await open_audit_log(settings(tmp_path / "b", signing_key_file=str(key)))
        await log.append(entry())
        await log.close()
        assert (
            public_key_file(tmp_path / "b").read_bytes()
            == public_key_file(tmp_path / "a").read_bytes()
        )
        assert not (tmp_path / "b" / DEFAULT_KEY_NAME).exists()


class TestKeyRotation:
    async def test_rotated_key_verifies_with_both_public_keys(self, tmp_path: Path) -> None:
        """After a key change the checkpoint chain goes on; verifying needs both keys."""
        log = await open_log(tmp_path, checkpoint_every=2)
        for n in range(2):
            await log.append(entry(n))
        await log.close()
        old_keys = trusted_keys(tmp_path)
        other = tmp_path / "other"
        await (await open_log(other)).close()  # creates the key in other/
        new_key = other / DEFAULT_KEY_NAME
        log = await open_audit_log(
            settings(tmp_path, checkpoint_every=2, signing_key_file=str(new_key))
        )
        for n in range(2, 4):
            await log.append(entry(n))
        await log.close()
        both = {**old_keys, **trusted_keys(other)}
        report = verify_file(tmp_path / "audit.jsonl", keys=both)
        assert report.intact, report.damage
        assert report.checkpoints == 2
        first = verify_file(tmp_path / "audit.jsonl", keys=old_keys).first
        assert first is not None
        assert (first.kind, first.seq) == ("forged-checkpoint", 4)


class TestSummaries:
    async def test_one_record_per_window_with_exact_counts(self, tmp_path: Path) -> None:
        """Counts per source and code become one summary record when the window closes."""
        log = await open_log(tmp_path)
        summarizer = Summarizer(log.append, window_s=3600)
        for _ in range(500):
            summarizer.count("ip:203.0.113.7", "bad-signature")
        for _ in range(3):
            summarizer.count("tenant:acme", "rate-limited")
        await summarizer.close()
        await log.close()
        (document,) = read_records(tmp_path / "audit.jsonl")
        assert document["outcome"] == "summary"
        assert document["counts"] == {
            "ip:203.0.113.7|bad-signature": 500,
            "tenant:acme|rate-limited": 3,
        }
        assert document["window_start"] <= document["window_end"]

    async def test_windows_are_flushed_on_a_timer(self, tmp_path: Path) -> None:
        """summary_window_s: counts are written without waiting for shutdown."""
        log = await open_log(tmp_path)
        summarizer = Summarizer(log.append, window_s=0.1)
        await summarizer.start()
        summarizer.count("ip:1", "no-route")
        for _ in range(100):
            if log.stats.records:
                break
            await asyncio.sleep(0.02)
        assert log.stats.records == 1
        await summarizer.close()
        await log.close()

    async def test_counts_survive_a_failed_write(self) -> None:
        """A window that cannot be written is merged into the next: counts stay exact."""
        written: list[Entry] = []
        fail = [True]

        async def append(item: Entry) -> object:
            if fail.pop(0) if fail else False:
                raise AppendFailed("store and spool down")
            written.append(item)
            return None

        summarizer = Summarizer(append, window_s=3600)  # type: ignore[arg-type]
        summarizer.count("ip:1", "no-route")
        await summarizer.flush()
        summarizer.count("ip:1", "no-route")
        summarizer.count("ip:2", "no-route")
        await summarizer.flush()
        assert [dict(e.counts) for e in written] == [{"ip:1|no-route": 2, "ip:2|no-route": 1}]

    async def test_distinct_sources_are_capped(self) -> None:
        """Past max_keys sources, counts go to '*|code': totals exact, memory bounded."""
        written: list[Entry] = []

        async def append(item: Entry) -> object:
            written.append(item)
            return None

        summarizer = Summarizer(append, window_s=3600, max_keys=3)  # type: ignore[arg-type]
        for n in range(10):
            summarizer.count(f"ip:{n}", "bad-signature")
        await summarizer.flush()
        (counts,) = [dict(e.counts) for e in written]
        assert len(counts) == 4
        assert counts["*|bad-signature"] == 7
        assert sum(counts.values()) == 10
