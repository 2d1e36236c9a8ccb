"""mlplatform._internal.storage: URIs → filesystems, atomic writes, private files, cross-process locks."""

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from mlplatform._internal import storage
from mlplatform.errors import PlatformError, PreflightError


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "h"))
    assert storage.home() == tmp_path / "h"
    monkeypatch.delenv("MLPLATFORM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.home() == tmp_path / ".mlplatform"


def test_local_paths_are_expanded_and_uris_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("~/runs") == str(tmp_path / "runs")
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("/data/x")


def test_filesystem_of_a_local_path_and_a_file_uri(monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.filesystem("~/runs")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "runs")
    fs, path = storage.filesystem(f"file://{tmp_path}/runs/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/runs"


def test_a_uri_pyarrow_cannot_open_names_the_field_value_and_fix():
    with pytest.raises(PreflightError) as e:
        storage.filesystem("nosuchscheme://bucket/x", field="storage_path", error=PreflightError)
    text = str(e.value)
    assert "Got 'nosuchscheme://bucket/x' for `storage_path`" in text
    assert "Use a local path or a supported URI" in text
    with pytest.raises(PlatformError, match="for `path`"):
        storage.filesystem("nosuchscheme://bucket/x")


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "state.json"
    storage.atomic_write(target, "old")
    storage.atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert _entries(target.parent) == ["state.json"]  # no temporary file left behind
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "state.json"
    storage.atomic_write(target, "old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        storage.atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["state.json"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "data.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with storage.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and _entries(tmp_path) == ["data.parquet"]
    with storage.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and _entries(tmp_path) == ["data.parquet"]


def test_private_files_are_0600_in_a_0700_directory(tmp_path):
    secret = tmp_path / "keys" / "token"
    storage.write_private(secret, "s3cr3t")
    assert secret.read_text() == "s3cr3t"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700


def test_replace_dir_swaps_a_whole_tree_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "old.bin").write_text("old")
    staging = storage.staging_dir(target)
    (staging / "new.bin").write_text("new")
    storage.replace_dir(staging, target)
    assert _entries(target) == ["new.bin"]
    assert _entries(tmp_path) == ["artifact"]  # neither the staging nor the old tree is left


def test_replace_dir_that_fails_puts_the_old_tree_back(tmp_path, monkeypatch):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "old.bin").write_text("old")
    staging = storage.staging_dir(target)
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="I/O error"):
        storage.replace_dir(staging, target)
    assert _entries(target) == ["old.bin"]


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {platform!r})
    from mlplatform._internal.storage import file_lock
    with file_lock({lock!r}):
        print("held", flush=True)
        time.sleep(30)
""")


def test_a_lock_held_by_another_process_times_out_naming_its_pid(tmp_path):
    lock = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(platform=str(REPO / "platform"), lock=str(lock))],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(storage.LockBusy, match=rf"is held by pid {holder.pid} on "):
            with storage.file_lock(lock, timeout_s=0.5):
                pass
        assert 0.4 < time.monotonic() - started < 5
        assert storage.lock_holder(lock).startswith(f"pid {holder.pid} ")
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: no stale lock to clean up.
    with storage.file_lock(lock, timeout_s=0):
        assert storage.lock_holder(lock).startswith(f"pid {os.getpid()} ")
