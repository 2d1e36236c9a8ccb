"""Checkpoints on storage: a manifest written last, and the newest complete checkpoint.

Ray Train registers a reported checkpoint only when its controller next polls the workers
(every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a worker killed in between restarts from the
checkpoint before, losing up to two intervals, and a checkpoint some rank never finished
uploading can look like any other (ray-project/ray#41700). So once every rank has uploaded
(a barrier), rank 0 writes a manifest of the directory's files and sizes, last; on restart
the loop takes the newest checkpoint whose manifest verifies, registered by Ray or not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MANIFEST = "mlplatform_complete.json"
_DIR = re.compile(r"^checkpoint_step(\d{8})$")


@dataclass(frozen=True)
class Complete:
    """A checkpoint directory whose manifest verified."""

    step: int
    path: str  # on the storage filesystem


def dir_name(step: int) -> str:
    """The directory name a checkpoint of `step` is reported under (sorts by step)."""
    return f"checkpoint_step{step:08d}"


def mark_complete(fs, directory: str, step: int, world_size: int) -> None:
    """Write `directory`'s manifest: call once every rank's upload has finished."""
    from pyarrow import fs as pafs

    files = {
        info.path[len(directory) + 1 :]: info.size
        for info in fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        if info.type == pafs.FileType.File and not info.base_name.startswith(MANIFEST)
    }
    manifest = json.dumps({"step": step, "world_size": world_size, "files": files}, sort_keys=True).encode()
    # Written beside, then renamed: a reader sees the whole manifest or none.
    tmp = f"{directory}/{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(manifest)
    fs.move(tmp, f"{directory}/{MANIFEST}")


def newest_complete(fs, run_dir: str) -> Complete | None:
    """The newest checkpoint under `run_dir` whose manifest lists files that are all there, at their sizes."""
    from pyarrow import fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    steps = sorted(
        ((int(m.group(1)), e.path) for e in entries if e.type == pafs.FileType.Directory and (m := _DIR.match(e.base_name))),
        reverse=True,
    )
    for step, path in steps:
        if _verified(fs, path, step):
            return Complete(step, path)
    return None


def _verified(fs, directory: str, step: int) -> bool:
    from pyarrow import fs as pafs

    try:
        with fs.open_input_stream(f"{directory}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
        listed = manifest["files"]
        found = {
            info.path[len(directory) + 1 :]: info.size
            for info in fs.get_file_info(pafs.FileSelector(directory, recursive=True))
            if info.type == pafs.FileType.File
        }
    except (OSError, ValueError, KeyError, TypeError):
        return False
    ranks = [f"rng_rank{r}.pt" for r in range(int(manifest.get("world_size", 0)))]
    return (
        manifest.get("step") == step
        and all(found.get(name) == size for name, size in listed.items())
        and all(name in listed for name in ranks)
    )
