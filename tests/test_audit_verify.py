"""The offline verifier: every kind of tampering is found, with its first bad seq."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.__main__ import main
from audit.checkpoint import Checkpoint, Signer
from audit.record import canonical, record_hash
from audit.stores.file import checkpoints_path
from audit.verify import verify_file
from tests.audit_support import (
    entry,
    open_log,
    public_key_file,
    read_lines,
    trusted_keys,
    write_lines,
)

RECORDS = 50
EVERY = 10

Lines = list[bytes]


@pytest.fixture
async def log_dir(tmp_path: Path) -> Path:
    """A closed log of 50 records with checkpoints at 10, 20, 30, 40, 50."""
    log = await open_log(tmp_path, checkpoint_every=EVERY)
    for n in range(RECORDS):
        await log.append(entry(n, tenant=f"tenant-{n % 3}"))
    await log.close()
    return tmp_path


def _doc(line: bytes) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(line)
    return document


def _line(document: dict[str, Any]) -> bytes:
    return canonical(document)


def _at(lines: Lines, seq: int) -> int:
    return next(i for i, line in enumerate(lines) if _doc(line)["seq"] == seq)


# -- record tampering: (lines) -> lines ------------------------------------------


def modify_field(lines: Lines) -> Lines:
    i = _at(lines, 20)
    document = _doc(lines[i])
    document["outcome"] = "deny"
    lines[i] = _line(document)
    return lines


def modify_and_rehash(lines: Lines) -> Lines:
    i = _at(lines, 20)
    document = _doc(lines[i])
    document["tenant"] = "someone-else"
    document["hash"] = record_hash(document)
    lines[i] = _line(document)
    return lines


def corrupt_bytes(lines: Lines) -> Lines:
    i = _at(lines, 20)
    lines[i] = lines[i][:40] + b"\xff\xfe" + lines[i][42:]
    return lines


def delete_one(lines: Lines) -> Lines:
    del lines[_at(lines, 20)]
    return lines


def delete_first(lines: Lines) -> Lines:
    del lines[0]
    return lines


def delete_range(lines: Lines) -> Lines:
    del lines[_at(lines, 20) : _at(lines, 25)]
    return lines


def insert_forged_with_valid_hash(lines: Lines) -> Lines:
    i = _at(lines, 20)
    forged = _doc(lines[i])
    forged["tenant"] = "forged"
    forged["request_id"] = "never-happened"
    forged["hash"] = record_hash(forged)
    lines.insert(i, _line(forged))
    return lines


def insert_duplicate(lines: Lines) -> Lines:
    lines.insert(_at(lines, 30) + 1, lines[_at(lines, 5)])
    return lines


def insert_garbage(lines: Lines) -> Lines:
    lines.insert(_at(lines, 30) + 1, b'{"note":"hello"}')
    return lines


def insert_high_seq(lines: Lines) -> Lines:
    forged = _doc(lines[_at(lines, 20)])
    forged["seq"] = 999
    forged["hash"] = record_hash(forged)
    lines.insert(_at(lines, 20), _line(forged))
    return lines


def swap_neighbours(lines: Lines) -> Lines:
    i = _at(lines, 20)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return lines


def move_back(lines: Lines) -> Lines:
    moved = lines.pop(_at(lines, 10))
    lines.insert(_at(lines, 40) + 1, moved)
    return lines


def swap_last_two(lines: Lines) -> Lines:
    lines[-1], lines[-2] = lines[-2], lines[-1]
    return lines


def cut_tail(lines: Lines) -> Lines:
    return lines[:45]


def rewrite_history(lines: Lines) -> Lines:
    """Change record 15 and recompute every later hash and link (a careful forger)."""
    documents = [_doc(line) for line in lines]
    documents[14]["outcome"] = "deny"
    for index in range(14, len(documents)):
        if index > 14:
            documents[index]["prev_hash"] = documents[index - 1]["hash"]
        documents[index]["hash"] = record_hash(documents[index])
    return [_line(d) for d in documents]


RECORD_TAMPERING: list[Any] = [
    pytest.param(modify_field, "modified", 20, id="modified-field"),
    pytest.param(modify_and_rehash, "modified", 20, id="modified-and-rehashed"),
    pytest.param(corrupt_bytes, "modified", 20, id="modified-bytes"),
    pytest.param(delete_one, "deleted", 20, id="deleted-one"),
    pytest.param(delete_first, "deleted", 1, id="deleted-first"),
    pytest.param(delete_range, "deleted", 20, id="deleted-range"),
    pytest.param(insert_forged_with_valid_hash, "inserted", 20, id="inserted-forged"),
    pytest.param(insert_duplicate, "inserted", 31, id="inserted-duplicate"),
    pytest.param(insert_garbage, "inserted", 31, id="inserted-garbage"),
    pytest.param(insert_high_seq, "inserted", 20, id="inserted-high-seq"),
    pytest.param(swap_neighbours, "reordered", 20, id="reordered-swap"),
    pytest.param(move_back, "reordered", 10, id="reordered-moved"),
    pytest.param(swap_last_two, "reordered", 49, id="reordered-last-two"),
    pytest.param(cut_tail, "truncated", 46, id="truncated"),
    pytest.param(rewrite_history, "modified", 11, id="rewritten-and-rechained"),
]


class TestRecordTampering:
    def test_untouched_log_is_intact(self, log_dir: Path) -> None:
        """The reference log verifies: 50 records, 5 checkpoints, no damage."""
        report = verify_file(log_dir / "audit.jsonl", keys=trusted_keys(log_dir))
        assert report.intact, report.damage
        assert (report.records, report.last_seq, report.checkpoints) == (50, 50, 5)

    @pytest.mark.parametrize(("tamper", "kind", "seq"), RECORD_TAMPERING)
    def test_tampering_is_found(
        self, log_dir: Path, tamper: Callable[[Lines], Lines], kind: str, seq: int
    ) -> None:
        """Each tampering is rejected with its kind and the first bad seq."""
        path = log_dir / "audit.jsonl"
        write_lines(path, tamper(read_lines(path)))
        report = verify_file(path, keys=trusted_keys(log_dir))
        assert not report.intact
        first = report.first
        assert first is not None
        assert (first.kind, first.seq) == (kind, seq), first.detail


# -- checkpoint tampering ---------------------------------------------------------


def _checkpoint_lines(log_dir: Path) -> tuple[Path, Lines]:
    path = checkpoints_path(log_dir / "audit.jsonl")
    return path, read_lines(path)


class TestCheckpointTampering:
    def test_changed_head_hash_is_a_forgery(self, log_dir: Path) -> None:
        """A checkpoint edited without its key no longer verifies."""
        path, lines = _checkpoint_lines(log_dir)
        document = _doc(lines[2])
        document["head_hash"] = "f" * 64
        lines[2] = _line(document)
        write_lines(path, lines)
        first = verify_file(log_dir / "audit.jsonl", keys=trusted_keys(log_dir)).first
        assert first is not None
        assert (first.kind, first.seq) == ("forged-checkpoint", 30)

    def test_resigned_with_another_key_is_a_forgery(self, log_dir: Path) -> None:
        """A well-formed checkpoint signed by an untrusted key is rejected."""
        path, lines = _checkpoint_lines(log_dir)
        original = Checkpoint.from_document(_doc(lines[2]))
        forged = Signer(Ed25519PrivateKey.generate()).sign(
            chain_id=original.chain_id,
            seq=original.seq,
            head_hash="f" * 64,
            time=original.time,
            prev_checkpoint_hash=original.prev_checkpoint_hash,
        )
        lines[2] = _line(forged.to_document())
        write_lines(path, lines)
        first = verify_file(log_dir / "audit.jsonl", keys=trusted_keys(log_dir)).first
        assert first is not None
        assert (first.kind, first.seq) == ("forged-checkpoint", 30)
        assert "not a trusted key" in first.detail

    def test_removed_checkpoint_breaks_the_checkpoint_chain(self, log_dir: Path) -> None:
        """Deleting a checkpoint is visible: the next one links to it."""
        path, lines = _checkpoint_lines(log_dir)
        del lines[1]
        write_lines(path, lines)
        first = verify_file(log_dir / "audit.jsonl", keys=trusted_keys(log_dir)).first
        assert first is not None
        assert (first.kind, first.seq) == ("forged-checkpoint", 30)

    def test_cut_log_and_checkpoints_caught_by_the_export(self, log_dir: Path) -> None:
        """Cutting both tails fools the stored checkpoints but not an exported copy."""
        exported = [_doc(line) for line in _checkpoint_lines(log_dir)[1]]
        log = log_dir / "audit.jsonl"
        write_lines(log, read_lines(log)[:40])
        path, lines = _checkpoint_lines(log_dir)
        write_lines(path, lines[:4])
        alone = verify_file(log, keys=trusted_keys(log_dir))
        assert alone.intact  # the limit of what a log can prove about itself
        report = verify_file(log, keys=trusted_keys(log_dir), exported=exported)
        assert report.first is not None
        assert (report.first.kind, report.first.seq) == ("truncated", 41)


class TestCli:
    def test_intact_exits_0(self, log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`audit verify FILE` on an intact log prints INTACT and exits 0."""
        assert main(["verify", str(log_dir / "audit.jsonl")]) == 0
        assert "INTACT" in capsys.readouterr().out

    def test_damage_exits_1_naming_kind_and_seq(
        self, log_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A damaged log exits 1 and names the first bad seq and the kind of damage."""
        path = log_dir / "audit.jsonl"
        write_lines(path, delete_one(read_lines(path)))
        assert main(["verify", str(path), "--public-key", str(public_key_file(log_dir))]) == 1
        assert "DAMAGED      deleted at seq 20" in capsys.readouterr().out

    def test_json_report(self, log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints a machine-readable report."""
        path = log_dir / "audit.jsonl"
        write_lines(path, swap_neighbours(read_lines(path)))
        assert main(["verify", str(path), "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["intact"] is False
        assert report["first"]["kind"] == "reordered"
        assert report["first"]["seq"] == 20

    def test_export_then_verify_against_the_export(
        self, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        """`audit checkpoints` exports JSON that `verify --checkpoints` trusts."""
        export = tmp_path_factory.mktemp("safe") / "checkpoints.json"
        log = log_dir / "audit.jsonl"
        assert main(["checkpoints", str(log), "-o", str(export)]) == 0
        assert len(json.loads(export.read_text())) == 5
        write_lines(log, read_lines(log)[:40])
        path, lines = _checkpoint_lines(log_dir)
        write_lines(path, lines[:4])
        assert main(["verify", str(log)]) == 0
        assert main(["verify", str(log), "--checkpoints", str(export)]) == 1

    @pytest.mark.parametrize(
        "argv",
        [
            pytest.param([], id="no-command"),
            pytest.param(["verify"], id="no-source"),
            pytest.param(["verify", "/nonexistent/audit.jsonl"], id="missing-file"),
            pytest.param(["verify", "--dsn", "postgresql://x@127.0.0.1:1/x"], id="dsn-no-chain"),
            pytest.param(["verify", "--bogus"], id="unknown-option"),
        ],
    )
    def test_usage_errors_exit_2(self, argv: list[str]) -> None:
        """Usage errors exit 2, distinct from damage (1)."""
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        assert code == 2

    def test_checkpoints_without_a_key_exit_2(self, log_dir: Path) -> None:
        """A log with checkpoints but no public key to check them is a usage error."""
        public_key_file(log_dir).unlink()
        assert main(["verify", str(log_dir / "audit.jsonl")]) == 2

    def test_wrong_public_key_is_damage(self, log_dir: Path, tmp_path: Path) -> None:
        """Checkpoints that do not verify under the given key are forged."""
        other = tmp_path / "other.pub.pem"
        other.write_bytes(
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert main(["verify", str(log_dir / "audit.jsonl"), "--public-key", str(other)]) == 1
