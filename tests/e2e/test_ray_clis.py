"""Ray's own CLIs exactly as README.md writes them, in a shell after `eval "$(mlplatform cluster env)"`.

Nothing but that line points them at the cluster: the shell starts with no RAY_* variable.
They run in a directory laid out like the repository with the two files they use:
jobs/hello.py, and serve_apps/digits-cpu.yaml as shipped except for its registry (this test's,
holding a registered digits@production) and its HTTP port (a free one), because the shipped
/tmp/mlplatform/registry and port 8000 are the user's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO, free_port
from serve_models import https_options, register_digits

pytestmark = pytest.mark.timeout(600)

ENV = 'eval "$(mlplatform cluster env)"'
RAY_STATUS = "ray status"
JOB_SUBMIT = "ray job submit --working-dir . -- python jobs/hello.py"
SERVE_DEPLOY = "serve deploy serve_apps/digits-cpu.yaml"
SERVE_STATUS = "serve status"
SERVE_SHUTDOWN = "serve shutdown -y"


@pytest.fixture
def checkout(tmp_path, three_region_cluster):
    """A directory shaped like the repository for the README's commands, and the served port."""
    register_digits(tmp_path / "registry", tmp_path / "artifacts")
    root = tmp_path / "checkout"
    (root / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs/hello.py", root / "jobs/hello.py")
    served = yaml.safe_load((REPO / "serve_apps/digits-cpu.yaml").read_text())
    port = free_port()
    served["http_options"]["port"] = port
    # Ray's own `serve deploy` takes http_options from the file alone: HTTPS needs the cluster's
    # certificate named there (`mlplatform serve deploy` fills it in by itself).
    served["http_options"].update(https_options(three_region_cluster))
    served["applications"][0]["args"]["registry_root"] = str(tmp_path / "registry")
    (root / "serve_apps").mkdir()
    (root / "serve_apps/digits-cpu.yaml").write_text(yaml.safe_dump(served))
    return root, port


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in a fresh bash after the README's `eval` line, as a user with the venv activated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    result = subprocess.run(["bash", "-c", f"set -e; {ENV}; {command}"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`{command}` failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return result


def _applications(cwd: Path) -> dict:
    return yaml.safe_load(_shell(SERVE_STATUS, cwd).stdout).get("applications") or {}


def test_ray_clis_as_the_readme_writes_them(three_region_cluster, checkout):
    readme_lines = {line.split(" #")[0].strip() for line in (REPO / "README.md").read_text().splitlines()}
    for command in (ENV, RAY_STATUS, JOB_SUBMIT, SERVE_DEPLOY, SERVE_STATUS, SERVE_SHUTDOWN):
        assert command in readme_lines, f"README.md no longer shows `{command}`: keep this test in step with it"
    cwd, port = checkout

    assert "Active:" in _shell(RAY_STATUS, cwd).stdout

    out = _shell(JOB_SUBMIT, cwd).stdout
    assert "succeeded" in out, out[-4000:]
    hello = json.loads(next(line for line in out.splitlines() if line.startswith("HELLO_RESULT ")).split(" ", 1)[1])
    assert {r["asked_for_group"] for r in hello} == {"head", "cpu", "gpu", "eu"}

    _shell(SERVE_SHUTDOWN, cwd)  # a Serve an earlier module left keeps its own HTTP port
    _shell(SERVE_DEPLOY, cwd)
    deadline, apps = time.time() + 240, {}
    while time.time() < deadline:
        apps = _applications(cwd)
        if apps.get("digits-cpu", {}).get("status") in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(2)
    assert apps.get("digits-cpu", {}).get("status") == "RUNNING", apps
    with pytest.raises(requests.ConnectionError):  # plain HTTP does not reach the model
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    health = requests.get(f"https://127.0.0.1:{port}/healthz", timeout=10).json()
    assert health["app"] == "digits-cpu" and health["model"] == "digits@1"

    shutdown = _shell(SERVE_SHUTDOWN, cwd)
    assert "Sent shutdown request" in shutdown.stdout + shutdown.stderr, shutdown.stdout + shutdown.stderr
    assert "digits-cpu" not in _applications(cwd)
