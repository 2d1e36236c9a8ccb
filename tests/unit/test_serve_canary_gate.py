"""The canary gate's verdict from a window of outcomes, and the alias move it makes (no Ray)."""

from __future__ import annotations

import asyncio
import time

from mlplatform import registry
from mlplatform.serve import CanaryGateSpec
from mlplatform.serve._canary import PROMOTED, ROLLED_BACK, WATCHING, CanaryGate, Sample, evaluate

GATE = CanaryGateSpec(window_s=10, min_requests=20, max_error_rate=0.05, max_p99_ms=100).model_dump()


def _samples(n: int, errors: int = 0, ms: float = 10.0, t0: float = 0.0) -> list[Sample]:
    return [Sample(t0 + i * 0.1, i >= errors, ms) for i in range(n)]


def test_waits_for_the_window_and_the_minimum_requests():
    assert evaluate(_samples(50), started=0, now=5, gate=GATE).state == WATCHING  # window not yet run
    assert evaluate(_samples(10, t0=5), started=0, now=11, gate=GATE).state == WATCHING  # too few requests


def test_error_rate_or_p99_over_the_limit_rolls_back_with_the_figures():
    v = evaluate(_samples(40, errors=4), started=0, now=10, gate=GATE)
    assert v.state == ROLLED_BACK and "error rate 10.0% (4/40)" in v.reason and "max_error_rate" in v.reason
    v = evaluate(_samples(40, ms=250), started=0, now=10, gate=GATE)
    assert v.state == ROLLED_BACK and "p99 250 ms" in v.reason and "max_p99_ms 100" in v.reason


def test_only_the_last_window_counts_and_a_pass_promotes():
    old_failures = [Sample(0.0, False, 10.0)] * 30
    v = evaluate(old_failures + _samples(30, t0=20), started=0, now=25, gate=GATE)
    assert v.state == PROMOTED and v.stats["requests"] == 30 and v.stats["errors"] == 0
    assert evaluate(_samples(40), started=0, now=10, gate={**GATE, "promote": False}).state == WATCHING


def test_concurrent_reports_that_each_fail_the_canary_roll_back_exactly_once(tmp_path):
    # The gate replica serves several ingress reports at once; each of these crosses the
    # threshold on its own, and only the first may move the alias.
    root = tmp_path / "registry"
    for i in (1, 2, 3):
        artifact = tmp_path / f"a{i}"
        artifact.mkdir()
        (artifact / "model.safetensors").write_bytes(b"w" * i)
        registry.register(artifact, "m", root=root)
    registry.set_alias("m", "production", 1, root=root)
    for version in (1, 2, 3):
        registry.set_alias("m", "canary", version, root=root)
    gate = CanaryGate({"app": "a", "root": str(root), "gate": GATE, "canary_ref": "m@3", "canary_alias": "canary",
                       "primary_alias": "production", "primary_ref": "m@1"})
    now = time.time()
    failing = [(now - GATE["window_s"] + 0.2 * i, False, 10.0) for i in range(40)]

    async def reports():
        return await asyncio.gather(*(gate.record(failing) for _ in range(5)))

    statuses = asyncio.run(reports())

    rollback = {"alias": "canary", "action": "rollback", "from": 3, "to": 2}
    assert [(s["state"], s["alias_move"]) for s in statuses] == [(ROLLED_BACK, rollback)] * 5
    moves = [m for m in registry.alias_history("m", "canary", root=root) if m.actor == "canary-gate"]
    assert [(m.action, m.from_version, m.to_version) for m in moves] == [("rollback", 3, 2)]
    assert registry.list_aliases("m", root=root) == {"production": 1, "canary": 2}
