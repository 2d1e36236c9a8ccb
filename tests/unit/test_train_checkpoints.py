"""The checkpoint manifest: written last, verified on restart, the newest complete one wins."""

from __future__ import annotations

from pyarrow import fs as pafs

from mlplatform.train import checkpoints


def write_checkpoint(run_dir, step: int, ranks: int = 2, complete: bool = True):
    d = run_dir / checkpoints.dir_name(step)
    (d / "ds").mkdir(parents=True)
    for r in range(ranks):
        (d / f"rng_rank{r}.pt").write_bytes(b"rng" * (r + 1))
        (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    if complete:
        checkpoints.mark_complete(pafs.LocalFileSystem(), str(d), step, ranks)
    return d


def test_the_newest_complete_checkpoint_wins_over_newer_partial_ones(tmp_path):
    local = pafs.LocalFileSystem()
    write_checkpoint(tmp_path, 20)
    write_checkpoint(tmp_path, 40)
    write_checkpoint(tmp_path, 60, complete=False)  # killed before the manifest
    truncated = write_checkpoint(tmp_path, 80)
    (truncated / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    missing = write_checkpoint(tmp_path, 100)
    (missing / "rng_rank1.pt").unlink()
    newest = checkpoints.newest_complete(local, str(tmp_path))
    assert newest == checkpoints.Complete(40, str(tmp_path / "checkpoint_step00000040"))


def test_a_manifest_that_lacks_a_rank_is_not_complete(tmp_path):
    # Written as if for one rank while the run had two: rank 1's files are not vouched for.
    d = write_checkpoint(tmp_path, 20, ranks=1, complete=False)
    checkpoints.mark_complete(pafs.LocalFileSystem(), str(d), 20, 2)
    assert checkpoints.newest_complete(pafs.LocalFileSystem(), str(tmp_path)) is None


def test_no_run_directory_means_no_checkpoint(tmp_path):
    assert checkpoints.newest_complete(pafs.LocalFileSystem(), str(tmp_path / "never")) is None
    assert not list(tmp_path.iterdir())


def test_a_build_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    import os
    import time

    from mlplatform.train import engine

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "py311_cpu/deepspeed_shm_comm/lock", tmp_path / "py311_cpu/other_op/lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - engine.STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    assert engine.clear_stale_build_locks() == [str(stale)]
    assert not stale.exists() and live.exists()  # a build in progress keeps its lock
