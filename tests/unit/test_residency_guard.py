"""The runtime guard's decision and wiring, and a walk over every Ray entry point the platform
calls: none may schedule work without a label selector (the residency policy rides on it)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO
from mlplatform import config
from mlplatform.cluster import ClusterSpec
from mlplatform.errors import ResidencyError
from mlplatform.residency import for_cluster_spec, guard

UAE = {"ray.io/availability-region": "me-central-1", "ray.io/availability-zone": "me-central-1a"}
EU = {"ray.io/availability-region": "eu-central-1"}


@pytest.fixture(scope="module")
def policy() -> dict:
    path = REPO / "cluster_configs/local/three-region.yaml"
    return for_cluster_spec(config.load(path, ClusterSpec), path).to_json()


def test_restricted_work_may_run_only_in_the_uae(policy):
    assert guard.violation(policy, "uae-restricted", UAE) is None
    why = guard.violation(policy, "uae-restricted", EU)
    assert why == ("'uae-restricted' work may only run in regions me-central-1 (residency policy 'uae'); "
                   "this node is in region eu-central-1")
    assert "region (none)" in guard.violation(policy, "uae-restricted", {})  # an unlabelled node is outside too


def test_the_default_classification_applies_and_public_goes_anywhere(policy):
    assert guard.violation(policy, None, EU) is None  # default: internal, UAE and EU
    assert guard.violation(policy, "public", {}) is None


def test_zones_narrow_regions_and_unknown_classifications_are_violations(policy):
    policy = {**policy, "classifications": {**policy["classifications"]}}
    policy["classifications"]["uae-restricted"] = {**policy["classifications"]["uae-restricted"], "zones": ["me-central-1b"]}
    assert "zones me-central-1b" in guard.violation(policy, "uae-restricted", UAE)
    assert "'secret' is not in residency policy 'uae'" in guard.violation(policy, "secret", UAE)


def test_a_job_cannot_swap_the_guard_out():
    assert guard.runtime_env_hook({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}  # unchanged
    assert guard.runtime_env_hook({}) == {}
    with pytest.raises(ResidencyError, match="that hook is the residency guard"):
        guard.runtime_env_hook({"worker_process_setup_hook": "mine.setup"})


def test_the_guard_imports_no_policy_model():
    """Every Ray worker process imports the guard: it must stay standard-library only."""
    code = "import sys, mlplatform.residency.guard; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'ray', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- every Ray entry point carries a selector ---

SOURCES = [p for d in ("platform/mlplatform", "jobs", "serve_apps") for p in (REPO / d).rglob("*.py")]
# Calls into work already placed: Serve deployment handles route to replicas their deployment
# placed; the audit writer is an actor placed (on the head node) where it is created.
HANDLE_CALLS = {"handle.remote", "self.handles['fallback'].remote", "self.gate.record.remote",
                "_writer(cluster).append.remote", "_writer(cluster).flush.remote"}


def _calls() -> list[tuple[str, int, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found.append((str(path.relative_to(REPO)), node.lineno, node))
    return found


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func).replace('"', "'")


def test_every_ray_placement_the_platform_makes_carries_a_label_selector():
    keywords = lambda call: {k.arg for k in call.keywords}  # noqa: E731
    missing = []
    for where, line, call in _calls():
        name = _name(call)
        last = name.rsplit(".", 1)[-1]
        if last == "ScalingConfig" and "label_selector" not in keywords(call):
            missing.append((where, line, name))
        elif last == "placement_group" and "bundle_label_selector" not in keywords(call):
            missing.append((where, line, name))
        elif last == "options" and not keywords(call) & {"label_selector", "ray_actor_options"} and not (
                where == "platform/mlplatform/serve/_app.py" and None in keywords(call)):
            # Serve's model and ingress deployments take `**options` from _replica_options (tested below).
            missing.append((where, line, name))
        elif last == "remote" and name not in HANDLE_CALLS:
            # `.remote()` must follow `.options(label_selector=...)`; a bare ray.remote(...) only defines.
            target = call.func.value if isinstance(call.func, ast.Attribute) else None
            placed = isinstance(target, ast.Call) and _name(target).endswith(".options")
            if not placed and name != "ray.remote":
                missing.append((where, line, name))
    assert missing == [], "Ray calls that place work without a label selector: " + repr(missing)


def test_the_walk_sees_the_entry_points_it_guards():
    names = {_name(call).rsplit(".", 1)[-1] for _, _, call in _calls()}
    assert {"ScalingConfig", "options", "remote"} <= names


def test_serve_replicas_get_the_selector_from_replica_options():
    from mlplatform.serve._app import _replica_options

    selector = {"ray.io/availability-region": "me-central-1"}
    guarded = {"env_vars": {guard.CLASSIFICATION_ENV: "uae-restricted"}}
    options = _replica_options(selector, 1, 0, 2, None, guarded)
    assert options["ray_actor_options"]["label_selector"] == selector
    assert options["ray_actor_options"]["runtime_env"] == guarded  # each replica's worker runs the guard


def test_outside_names_each_node_where_the_work_may_not_be(policy):
    nodes = {"uae": UAE, "eu": EU, "bare": {}}
    assert set(guard.outside(policy, "uae-restricted", nodes)) == {"eu", "bare"}
    assert guard.outside(policy, "public", nodes) == {}


def test_every_node_starts_its_workers_with_the_guard():
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    assert guard.node_env() == {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: guard.SETUP_HOOK,
                                "RAY_RUNTIME_ENV_HOOK": guard.RUNTIME_ENV_HOOK}
