"""Training data: built-in datasets written to Parquet, Ray Data loading, deterministic sharding.

Built-ins need no download: `digits` is scikit-learn's bundled 8×8 digits; `tiny_corpus`
is the docstrings of a fixed list of Python standard-library modules (English prose
shipped with the interpreter), byte-level tokenized.

Sharding is deterministic so that a restarted run can skip exactly the batches it has
already consumed: `DeterministicSplit` materializes each dataset and splits it by row
order (`Dataset.split(equal=True)`) rather than Ray Train's default streaming split,
whose block-to-worker assignment depends on timing. The price is that each worker's shard
is held in memory; datasets far larger than the workers' memory need a streaming design.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import storage
from mlplatform.errors import PreflightError
from mlplatform.train.spec import Task, TrainSpec

if TYPE_CHECKING:
    import numpy as np
    import ray.data

# Modules whose docstrings make the built-in corpus: stable prose, present in every CPython 3.11.
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools",
    "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)
SAMPLE_ROWS = 256  # rows of training inputs kept in the artifact as the drift reference


@dataclass(frozen=True)
class DataPaths:
    """Where a run's train and validation Parquet data are."""

    train: str
    validation: str | None  # None: hold out `validation_fraction` of train


def resolve_paths(spec: TrainSpec, data_root: str) -> DataPaths:
    """Parquet paths for the spec's dataset, writing a built-in one under data_root first."""
    ds = spec.dataset
    if ds.path.startswith("builtin:"):
        name = ds.path.removeprefix("builtin:")
        folder = Path(data_root) / name
        writer = {"digits": _write_digits, "tiny_corpus": _write_corpus}[name]
        for split in ("train", "validation"):
            target = folder / f"{split}.parquet"
            if not target.exists():
                writer(target, split)
        return DataPaths(str(folder / "train.parquet"), str(folder / "validation.parquet"))
    return DataPaths(ds.path, ds.validation_path)


def fingerprint(paths: DataPaths) -> str:
    """sha256 over the content of every Parquet file the run reads, in a fixed order."""
    import pyarrow.fs as pafs

    digest = hashlib.sha256()
    for field, path in (("dataset.path", paths.train), ("dataset.validation_path", paths.validation)):
        if path is None:
            continue
        fs, root = storage.filesystem(path, field, PreflightError)

        info = fs.get_file_info(root)
        files = (
            [root]
            if info.type == pafs.FileType.File
            else sorted(
                f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                if f.type == pafs.FileType.File and f.path.endswith(".parquet")
            )
        )
        for f in files:
            digest.update(os.path.relpath(f, root).encode() + b"\0")
            with fs.open_input_stream(f) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def load_datasets(spec: TrainSpec, paths: DataPaths, selector: dict[str, str] | None = None) -> dict[str, ray.data.Dataset]:
    """Ray Datasets `train` and `validation`, preprocessed into model inputs.

    Every task and actor Ray Data starts for them (reads, the Parquet metadata fetch, the
    preprocessing) carries `selector`, the workers' label selector under the residency policy,
    so the data is touched only where the workers may run.
    """
    import ray.data

    selector = spec.placement.selector() if selector is None else selector
    remote = {"label_selector": selector} if selector else {}
    with _v1_parquet_reader(), _data_selector(selector), _plain_progress():
        train = ray.data.read_parquet(paths.train, **remote)
        validation = ray.data.read_parquet(paths.validation, **remote) if paths.validation else None
        if validation is None:
            train, validation = train.train_test_split(
                test_size=spec.dataset.validation_fraction, shuffle=True, seed=spec.seed
            )
        prep = _Preprocess(spec)
        # Materialized once here: the worker split and the driver's final evaluation reuse it,
        # and every restart splits the very same blocks.
        return {
            name: ds.map_batches(prep, batch_format="numpy", batch_size=None, **remote).materialize()
            for name, ds in (("train", train), ("validation", validation))
        }


@contextmanager
def _data_selector(selector: dict[str, str]) -> Iterator[None]:
    """Ray Data's Dataset-wide label selector, for the Datasets created in the block.

    Per-read `ray_remote_args` reach only the read tasks; Ray Data's own helpers (the Parquet
    metadata fetch, sampling) take the DataContext's selector, which each Dataset copies when
    it is created.
    """
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.label_selector
    options.label_selector = dict(selector) or None
    try:
        yield
    finally:
        options.label_selector = before


@contextmanager
def _plain_progress() -> Iterator[None]:
    """Ray Data progress as plain log lines, not tqdm bars, unless this process writes to a terminal.

    Datasets copy the DataContext when created, so the Train workers and the split coordinator
    that iterate them inherit this. With `use_ray_tqdm` (Ray's default) those Ray workers send
    their bars to the driver, which draws them with tqdm and cursor moves (ESC[A) even when its
    stdout is a job log file; without it Ray Data logs progress as text in a non-terminal worker.
    """
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_ray_tqdm
    ctx.use_ray_tqdm = before and sys.stdout.isatty()
    if not sys.stdout.isatty():
        # The driver prints its workers' lines with a colour-coded "(pid=...)" prefix unless this is
        # 0 (read per line, so it holds for the rest of the run; a terminal keeps its colours).
        import os

        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        yield
    finally:
        ctx.use_ray_tqdm = before


@contextmanager
def _v1_parquet_reader():
    # Ray Data's V2 Parquet reader (the 2.60 default) reads footers in FooterReader actors
    # spread over every node with no label selector: the files would be opened outside the
    # run's placement (another region), and starting those actors costs tens of seconds on
    # a small cluster. The V1 reader reads in tasks that carry the run's label selector.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def reference_sample(spec: TrainSpec, paths: DataPaths):
    """The first SAMPLE_ROWS training rows as an Arrow table (raw input columns), for drift checks."""
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(paths.train, "dataset.path", PreflightError)
    table = pads.dataset(inner, format="parquet", filesystem=fs).head(SAMPLE_ROWS)
    columns = [spec.dataset.text_column] if spec.task == Task.CAUSAL_LM else feature_columns(spec, table.schema.names)
    return table.select(columns)


def feature_columns(spec: TrainSpec, names: list[str]) -> list[str]:
    return layout.feature_columns(spec.dataset.feature_columns, names, spec.dataset.label_column)


def to_arrays(spec: TrainSpec, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Raw columns (as read from Parquet) → the (x, y) arrays a worker trains on."""
    out = _Preprocess(spec)(columns)
    return out["x"], out["y"]


class _Preprocess:
    """Raw Parquet columns → model inputs: `x` (float32 features or int64 tokens) and `y`."""

    def __init__(self, spec: TrainSpec):
        self.task = spec.task
        self.ds = spec.dataset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        if self.task == Task.CAUSAL_LM:
            # Blocks of seq_len + 1 tokens: inputs and the targets shifted by one.
            tokens = layout.token_blocks(batch[self.ds.text_column], self.ds.seq_len + 1)
            return {"x": tokens[:, :-1], "y": tokens[:, 1:]}
        cols = layout.feature_columns(self.ds.feature_columns, batch, self.ds.label_column)
        x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in cols], axis=1)
        y = np.asarray(batch[self.ds.label_column])
        y = y.astype(np.int64) if self.task == Task.CLASSIFICATION else y.astype(np.float32)
        return {"x": x, "y": y}


def _data_config_class():
    from ray.train import DataConfig

    class DeterministicSplit(DataConfig):
        """Split every dataset by row order, the same way on every (re)start, where the workers may run."""

        def __init__(self, selector: dict[str, str] | None = None) -> None:
            super().__init__()
            self._selector = dict(selector or {}) or None

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.preserve_order = True
                ds.context.execution_options.label_selector = self._selector
                # Validation need not be equal (metrics are summed over workers); an unequal split
                # only regroups whole blocks and starts no task.
                parts = _split_equal(ds, world_size, self._selector) if name == "train" else ds.split(world_size)
                for i, part in enumerate(parts):
                    output[i][name] = part.iterator()
            return output

    return DeterministicSplit


def _split_equal(ds: ray.data.Dataset, n: int, selector: dict[str, str] | None) -> list[ray.data.Dataset]:
    """`ds.split(n, equal=True)`, with the tasks that cut blocks placed under `selector`.

    Ray 2.60's `Dataset.split_at_indices` calls its internal `_split_at_indices` without the
    Dataset's label selector, so those tasks (SPREAD) land on any node, outside the residency
    policy's regions too. This is the same code passing the selector (the internal function
    takes one); the residency integration test reads every task's node from Ray's state API.
    """
    from ray.data._internal.execution.interfaces import RefBundle
    from ray.data._internal.execution.interfaces.ref_bundle import BlockEntry
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import InputData
    from ray.data._internal.split import _split_at_indices
    from ray.data._internal.stats import DatasetStats
    from ray.data.dataset import MaterializedDataset

    rows = ds.count() // n  # as Dataset.split(equal=True): the last (n-1 at most) rows are dropped
    bundle = ds._execute()
    blocks, metadata = _split_at_indices([(e.ref, e.metadata) for e in bundle.blocks],
                                         [rows * i for i in range(1, n + 1)], label_selector=selector)
    parts = []
    for refs, metas in list(zip(blocks, metadata))[:n]:
        bundles = [RefBundle([BlockEntry(b, m)], owns_blocks=False, schema=bundle.schema) for b, m in zip(refs, metas)]
        stats = DatasetStats(metadata={"Split": metas}, parent=ds._raw_stats())
        parts.append(MaterializedDataset(LogicalPlan(InputData(input_data=bundles), ds.context), ds.context.copy(), stats))
    return parts


def data_config(selector: dict[str, str] | None = None):
    """The DataConfig that shards deterministically (see module docstring), its tasks under `selector`."""
    return _data_config_class()(selector)


def shard_to_arrays(iterator) -> tuple[np.ndarray, np.ndarray]:
    """A worker's whole shard as (x, y) numpy arrays, in the shard's row order."""
    import numpy as np

    xs, ys = [], []
    for batch in iterator.iter_batches(batch_size=None, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
    if not xs:
        return np.zeros((0,)), np.zeros((0,))
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------- built-in writers


def _write_atomic(table, target: Path) -> None:
    import pyarrow.parquet as pq

    # Concurrent writers produce identical files; the last rename wins.
    with storage.atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def _write_digits(target: Path, split: str) -> None:
    import numpy as np
    import pyarrow as pa
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels 0..16 → 0..1
    x_tr, x_va, y_tr, y_va = train_test_split(x, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    x, y = (x_tr, y_tr) if split == "train" else (x_va, y_va)
    columns: dict[str, Any] = {f"pixel_{i}": x[:, i] for i in range(x.shape[1])}
    columns["label"] = y.astype(np.int64)
    _write_atomic(pa.table(columns), target)


def corpus_documents() -> list[str]:
    """The built-in corpus: docstrings of _CORPUS_MODULES and their public members."""
    import importlib
    import inspect

    docs = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200 and doc not in docs:
                docs.append(doc)
    return docs


def _write_corpus(target: Path, split: str) -> None:
    import pyarrow as pa

    docs = corpus_documents()
    cut = int(len(docs) * 0.9)
    part = docs[:cut] if split == "train" else docs[cut:]
    _write_atomic(pa.table({"text": part}), target)
