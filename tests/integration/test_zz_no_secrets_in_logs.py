"""No API key, cluster token or private key in any log this test session produced.

Named `zz` so it runs after every other integration test (pytest takes tests/e2e, then
tests/integration, then tests/unit, each alphabetically): by then the serve tests have
created, rotated, revoked and sent keys (in headers and in refused query strings) and the
session cluster, still running, holds every Ray log of the session. Run alone, it scans
whatever the session's MLPLATFORM_HOME holds (tests/unit/test_secret_scan.py shows it fails).
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import PYTEST_LOG
from secret_scan import scan, session_logs


def test_no_key_or_token_material_in_any_log():
    from mlplatform import cluster

    files, tokens = session_logs(Path(os.environ["MLPLATFORM_HOME"]), extra=[PYTEST_LOG])
    for running in cluster.running():  # a scan that found no Ray log would pass for the wrong reason
        has_logs = any(Path(running.temp_dir) in p.parents for p in files)
        has_token = running.token() in tokens  # a bool: an assert on the token would print it
        assert has_logs and has_token, f"cluster {running.name}: Ray logs found {has_logs}, token found {has_token}"
    findings = scan(files, tokens)
    assert not findings, (f"{len(findings)} secret(s) found in the logs of this session (file:line: what); "
                          "find the code that logged them:\n" + "\n".join(map(str, findings[:50])))
