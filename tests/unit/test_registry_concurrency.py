"""Concurrent registrations from real processes never corrupt the index or lose a version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_together

from mlplatform.registry import alias_history, list_aliases, list_versions, verify
from mlplatform.registry._index import read_index
from mlplatform.registry._store import Store

# Every test runs on the embedded SQLite store and on a live PostgreSQL server.
pytestmark = pytest.mark.usefixtures("metadata_backend")

PROCESSES = 6
REGISTRATIONS = 3


def _register_several(root: str, scratch: str, worker: int, barrier) -> None:
    """Child process: register REGISTRATIONS distinct artifacts, moving an alias after each."""
    from mlplatform.registry import register, set_alias

    barrier.wait()  # start together so registrations really overlap
    for i in range(REGISTRATIONS):
        artifact = Path(scratch) / f"w{worker}-{i}"
        artifact.mkdir(parents=True)
        (artifact / "model.safetensors").write_bytes(f"weights of {worker}/{i}".encode() * 1000)
        (artifact / "metadata.json").write_text(json.dumps({"metrics": {"worker": worker, "i": i}}))
        version = register(artifact, "shared", root=root)
        set_alias("shared", f"w{worker}", version.version, root=root)


def test_parallel_registrations_from_processes(tmp_path):
    root = tmp_path / "registry"
    run_together(_register_several, [(str(root), str(tmp_path / "scratch"), w) for w in range(PROCESSES)])

    total = PROCESSES * REGISTRATIONS
    assert [v["version"] for v in read_index(Store(root), "shared")["versions"]] == list(range(1, total + 1))
    versions = list_versions("shared", root=root)
    origins = sorted((v.lineage.metrics["worker"], v.lineage.metrics["i"]) for v in versions)
    assert origins == [(w, i) for w in range(PROCESSES) for i in range(REGISTRATIONS)]
    assert all(verify(v.ref, root=root).ok for v in versions)

    # Every alias move was kept, and each worker's alias ends on its own last version.
    assert len(alias_history("shared", root=root)) == total
    by_number = {v.version: v.lineage.metrics for v in versions}
    for alias, number in list_aliases("shared", root=root).items():
        assert by_number[number] == {"worker": int(alias[1:]), "i": REGISTRATIONS - 1}
    assert sorted(p.name for p in (root / "shared" / "versions").iterdir()) == sorted(str(n) for n in range(1, total + 1))
    assert list((root / "shared" / ".staging").iterdir()) == []


MOVERS = 5
MOVES = 8


def _move_aliases(root: str, worker: int, barrier) -> None:
    """Child process: MOVES alias moves on the shared model, its own alias and the shared one."""
    from mlplatform.registry import promote, rollback, set_alias

    barrier.wait()
    for i in range(MOVES):
        if i % 4 == 3:
            rollback("m", f"p{worker}", root=root, reason=f"{worker}/{i}")
        elif i % 4 == 2:
            promote("m", f"p{worker}", "everyone", root=root, reason=f"{worker}/{i}")
        else:
            set_alias("m", f"p{worker}", 1 + (worker + i) % 3, root=root, reason=f"{worker}/{i}")


def test_concurrent_alias_moves_from_processes_lose_none(tmp_path):
    root = tmp_path / "registry"
    from mlplatform.registry import register

    for n in range(3):
        artifact = tmp_path / f"a{n}"
        artifact.mkdir()
        (artifact / "model.safetensors").write_bytes(bytes([n]) * 100)
        register(artifact, "m", root=root)
    run_together(_move_aliases, [(str(root), w) for w in range(MOVERS)])

    history = alias_history("m", root=root)
    assert len(history) == MOVERS * MOVES  # not one move lost
    for w in range(MOVERS):
        # Each process's moves are recorded in the order it made them, and replaying them gives
        # where its alias ends: no move was applied to a stale view of the alias.
        mine = [m for m in history if m.reason.startswith(f"{w}/")]
        assert [m.reason for m in mine] == [f"{w}/{i}" for i in range(MOVES)]
        own = [m for m in mine if m.alias == f"p{w}"]
        assert all(b.from_version == a.to_version for a, b in zip(own, own[1:]))
        assert list_aliases("m", root=root)[f"p{w}"] == own[-1].to_version
    # The shared alias's chain of moves is unbroken too: each starts where the previous one ended.
    shared = [m for m in history if m.alias == "everyone"]
    assert len(shared) == MOVERS * (MOVES // 4)
    assert all(b.from_version == a.to_version for a, b in zip(shared, shared[1:]))
    assert list_aliases("m", root=root)["everyone"] == shared[-1].to_version
