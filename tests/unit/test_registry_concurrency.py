"""Concurrent registrations from real processes never corrupt the index or lose a version."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from mlplatform.registry import alias_history, list_aliases, list_versions, verify

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
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [
        ctx.Process(target=_register_several, args=(str(root), str(tmp_path / "scratch"), w, barrier))
        for w in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    index = json.loads((root / "shared" / "index.json").read_text())  # valid JSON
    total = PROCESSES * REGISTRATIONS
    assert [v["version"] for v in index["versions"]] == list(range(1, total + 1))
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
    assert not list((root / "shared").glob("index.json.tmp-*"))
