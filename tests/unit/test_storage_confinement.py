"""Storage confinement: inside storage.confine(prefixes, reason) every writer of the shared storage
layer refuses a location outside the prefixes before writing a byte (residency, issue 12 item 6)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from mlplatform._internal import storage
from mlplatform.errors import ResidencyError

REASON = "'uae-restricted' data under residency policy 'uae'"


@pytest.fixture
def places(tmp_path):
    """(allowed prefix, a sibling whose name merely starts like it)."""
    return tmp_path / "uae", tmp_path / "uae-public"


def test_prefixes_match_whole_normalised_path_components(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uae = [str(tmp_path / "uae")]
    assert storage.within(tmp_path / "uae" / "runs" / "x", uae)
    assert storage.within(tmp_path / "uae", uae)
    assert not storage.within(tmp_path / "uae-public" / "x", uae)
    assert not storage.within(tmp_path / "uae" / ".." / "elsewhere", uae)  # '..' cannot climb out
    assert storage.within("uae/relative", uae)  # relative to the working directory
    assert storage.within(f"file://{tmp_path}/uae/x", uae)  # a file:// URI is the local path
    assert storage.within("s3://bucket-uae/runs/x", ["s3://bucket-uae"])
    assert not storage.within("s3://bucket-uae-eu/x", ["s3://bucket-uae/"])
    assert not storage.within("gs://bucket-uae/x", ["s3://bucket-uae/"])
    assert storage.within("/anywhere/at/all", [])
    assert storage.normal_prefix("/data/uae") == storage.normal_prefix("/data/uae/") == "/data/uae/"


def _writers(target):
    """Every writer of the storage layer, each writing at `target`."""

    def atomic_path():
        with storage.atomic_path(target) as tmp:
            tmp.write_bytes(b"x")

    def staged():
        staging = storage.staging_dir(target)
        (staging / "f").write_bytes(b"x")
        storage.replace_dir(staging, target)

    def open_output():
        with storage.open_output(target) as f:
            f.write(b"x")

    def copy():
        src = target.parents[2] / "source.bin"
        src.write_bytes(b"x")
        storage.copy_file(src, target)

    def tempfile_dir():
        with storage.tempfile_dir(target):
            pass

    return {
        "atomic_write": lambda: storage.atomic_write(target, "x"),
        "write_private": lambda: storage.write_private(target, "x"),
        "atomic_path": atomic_path,
        "staging_dir/replace_dir": staged,
        "replace_dir": lambda: storage.replace_dir(target.parent / "ready", target),
        "open_output": open_output,
        "copy_file": copy,
        "tempfile_dir": tempfile_dir,
    }


@pytest.mark.parametrize("writer", sorted(_writers(None)))
def test_every_writer_refuses_outside_the_prefixes_before_writing_a_byte(places, writer):
    allowed, outside = places
    target = outside / "sub" / "file"
    with storage.confine([str(allowed)], REASON), pytest.raises(ResidencyError) as e:
        _writers(target)[writer]()
    text = str(e.value)
    assert f"Refusing to write '{target}'" in text  # the location
    assert f"{REASON} may only be stored under {allowed}/" in text  # why, and the allowed prefixes
    assert "Use a location under one of those prefixes" in text  # how to fix
    assert not outside.exists()  # not even a parent directory


@pytest.mark.parametrize("writer", sorted(set(_writers(None)) - {"replace_dir", "tempfile_dir"}))
def test_every_writer_writes_inside_the_prefixes(places, writer):
    allowed, _ = places
    target = allowed / "sub" / "file"
    with storage.confine([str(allowed)], REASON):
        _writers(target)[writer]()
    assert target.exists()


def test_field_is_named_when_given(places):
    allowed, outside = places
    with storage.confine([str(allowed)], REASON), pytest.raises(ResidencyError, match=r"Got '.*uae-public' for `root`"):
        storage.check_write(outside, "root")


def test_confinement_ends_with_its_block_and_nests_by_narrowing(places, tmp_path):
    allowed, outside = places
    with storage.confine([str(tmp_path)], "outer"):
        with storage.confine([str(allowed)], "inner"):
            with pytest.raises(ResidencyError, match="inner may only"):
                storage.check_write(outside / "x")
            with storage.confine([], "'public' data"):  # anywhere, but the outer ones still hold
                with pytest.raises(ResidencyError, match="inner may only"):
                    storage.check_write(outside / "x")
        storage.check_write(outside / "x")  # the inner one ended
        with pytest.raises(ResidencyError, match="outer may only"):
            storage.check_write("/elsewhere/x")
    storage.check_write("/elsewhere/x")  # unconfined: anywhere
    storage.atomic_write(outside / "x", "ok")


def test_confinement_is_per_thread_of_work(places):
    # A ContextVar: another thread (another job's work in the same process) is not confined by this one.
    allowed, outside = places
    seen = []
    with storage.confine([str(allowed)], REASON):
        t = threading.Thread(target=lambda: seen.append(storage.confinements()))
        t.start()
        t.join()
        assert len(storage.confinements()) == 1
    assert seen == [()]


def test_scratch_directories_stay_inside_the_prefixes(places):
    allowed, _ = places
    plain = storage.temp_dir("t-")
    assert plain.parent == Path(tempfile.gettempdir())
    plain.rmdir()
    with storage.confine(["s3://bucket-uae/", str(allowed)], REASON):
        scratch = storage.temp_dir("t-")
        assert scratch.parent == allowed and scratch.is_dir()
        with storage.tempfile_dir(scratch):  # what libraries write through `tempfile` goes there too
            assert tempfile.mkdtemp().startswith(str(scratch))
        assert not tempfile.gettempdir().startswith(str(scratch))
    with storage.confine(["s3://bucket-uae/"], REASON), pytest.raises(ResidencyError, match="No local directory"):
        storage.temp_dir("t-")
