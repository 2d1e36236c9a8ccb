"""The residency audit trail: a hash chain that names the first bad line and survives concurrent writers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conftest import run_together

from mlplatform.residency import audit
from mlplatform.residency.audit import AuditError, append, read, verify

PROCESSES = 8
RECORDS_EACH = 25


def _trail(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "residency" / audit.AUDIT_FILE
    for i in range(n):
        append(path, "placement", job=f"job-{i}", classification="eu-only", node_id=f"n{i}", region="eu-west")
    return path


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_chain_of_records_verifies_and_reads_back(tmp_path):
    path = _trail(tmp_path)
    append(path, "denial", job="job-x", reason="region us-east not allowed")

    report = verify(path)
    assert report == audit.AuditReport(ok=True, records=7)
    records = list(read(path))
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert records[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["sha256"] for a, b in zip(records, records[1:]))
    assert [r["job"] for r in read(path, "denial")] == ["job-x"]
    assert [r["seq"] for r in read(path, "placement", node_id="n3")] == [4]
    # One canonical JSON object per line.
    first = path.read_bytes().splitlines()[0]
    assert first == json.dumps(json.loads(first), sort_keys=True, separators=(",", ":")).encode()


def test_append_returns_the_record_it_wrote(tmp_path):
    path = tmp_path / "a" / "audit.jsonl"
    record = append(path, "alias_move", model="m", alias="prod", to=(3, {"k": 1}))
    assert record == list(read(path))[0]
    assert record["to"] == [3, {"k": 1}]
    assert {"seq", "at", "kind", "host", "pid", "prev", "sha256"} <= record.keys()
    assert record["at"].endswith("+00:00") and "." in record["at"]


@pytest.mark.parametrize("k", [1, 4, 6])
def test_edited_record_is_named(tmp_path, k):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[k - 1])
    record["region"] = "us-east"
    lines[k - 1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    _rewrite(path, lines)

    report = verify(path)
    assert not report.ok and report.first_bad == k and report.records == k - 1
    assert f"line {k} (seq {k})" in report.reason and "sha256 does not match" in report.reason


def test_edited_record_with_recomputed_hash_breaks_the_next_link(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["region"] = "us-east"
    record["sha256"] = audit._digest(record)
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    _rewrite(path, lines)

    report = verify(path)
    assert report.first_bad == 4 and "prev does not match line 3's sha256" in report.reason


def test_deleted_record_names_the_line_after(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[2]  # record 3
    _rewrite(path, lines)

    report = verify(path)
    assert not report.ok and report.first_bad == 3
    assert "removed or reordered" in report.reason


def test_reordered_records_are_named(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3], lines[4] = lines[4], lines[3]
    _rewrite(path, lines)

    report = verify(path)
    assert not report.ok and report.first_bad == 4
    assert "line 4 (seq 5): prev does not match line 3's sha256" in report.reason


def test_truncated_last_line_is_named_and_blocks_appends(tmp_path):
    path = _trail(tmp_path, n=5)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a writer died mid-line
    start = data[:-1].rfind(b"\n") + 1

    report = verify(path)
    assert not report.ok and report.first_bad == 5 and report.records == 4
    assert "incomplete" in report.reason

    with pytest.raises(AuditError) as e:
        append(path, "placement", job="after-crash")
    message = str(e.value)
    assert str(path) in message and f"byte {start}" in message
    assert "mlplatform residency audit --verify" in message
    assert path.read_bytes() == data[:-20]  # nothing repaired, nothing appended


def test_damaged_last_record_blocks_appends(tmp_path):
    path = _trail(tmp_path, n=3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b"eu-west", b"us-east")
    _rewrite(path, lines)
    with pytest.raises(AuditError, match="damaged"):
        append(path, "placement", job="next")


def test_reserved_and_unserialisable_fields_are_rejected(tmp_path):
    path = tmp_path / "audit.jsonl"
    with pytest.raises(ValueError, match=r"\['prev', 'seq'\]"):
        append(path, "placement", seq=9, prev="x")
    with pytest.raises(ValueError, match="sha256"):
        append(path, "placement", sha256="0")
    with pytest.raises(ValueError, match="kind"):
        append(path, "placement", **{"kind": "other"})
    with pytest.raises(AuditError, match="JSON-serialisable"):
        append(path, "placement", node=object())
    assert not path.exists()
    append(path, "artifact_write", path="/models/x", uri="s3://eu/x")  # `path` is an ordinary field
    assert verify(path).ok


def test_missing_trail_is_an_error(tmp_path):
    with pytest.raises(AuditError, match="No audit trail at"):
        verify(tmp_path / "nope.jsonl")
    with pytest.raises(AuditError, match="No audit trail at"):
        read(tmp_path / "nope.jsonl")


def test_file_and_directory_are_private(tmp_path):
    path = tmp_path / "cluster" / "residency" / audit.AUDIT_FILE
    append(path, "policy_change", policy="eu-only")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_default_path_is_under_the_platform_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    assert audit.default_path("demo") == tmp_path / "clusters" / "demo" / "residency" / "audit.jsonl"


def _append_several(path: str, worker: int, barrier) -> None:
    """Child process: RECORDS_EACH appends, started together with the others."""
    barrier.wait()
    for i in range(RECORDS_EACH):
        append(path, "placement", worker=worker, i=i, region="eu-west")


def test_concurrent_writers_keep_the_chain_valid(tmp_path):
    path = tmp_path / "residency" / audit.AUDIT_FILE
    run_together(_append_several, [(str(path), w) for w in range(PROCESSES)])

    total = PROCESSES * RECORDS_EACH
    assert verify(path) == audit.AuditReport(ok=True, records=total)
    records = list(read(path))
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    origins = sorted((r["worker"], r["i"]) for r in records)
    assert origins == [(w, i) for w in range(PROCESSES) for i in range(RECORDS_EACH)]
    assert len({r["pid"] for r in records}) == PROCESSES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
