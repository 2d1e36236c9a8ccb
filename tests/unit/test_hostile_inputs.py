"""Hostile inputs on the artifact side: registry names, links out of an artifact directory, ONNX
external data that escapes its folder, YAML alias bombs. Each gets one clear error, fast."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from mlplatform import config, registry
from mlplatform._internal import metadata
from mlplatform.errors import ArtifactError, InvalidName, OnnxModelError, SpecError
from mlplatform.registry._names import check_name, parse_ref
from mlplatform.train import TrainSpec


@pytest.fixture(autouse=True)
def embedded_store(monkeypatch):
    monkeypatch.delenv(metadata.URL_ENV, raising=False)


# ---- registry names: traversal, absolute, NUL, newline, unicode look-alikes


@pytest.mark.parametrize("name", [
    "../x", "x/../../y", "/etc/passwd", "a\x00b", "x\n", "model\r", "ｍodel",  # fullwidth m
    "digіts",  # Cyrillic і
    "a\u202eb",  # right-to-left override
    "ﬁle",  # ligature that NFKC folds to "file"
    "a\u200bb",  # zero-width space
])
def test_hostile_names_are_refused_with_the_rule(name):
    with pytest.raises(InvalidName, match=r"for `name`; must be 1-64 characters of lowercase letters"):
        check_name(name)


@pytest.mark.parametrize("ref", ["m@²", "m@٣", "m@3\n", "m@prod\x00", "m\n@1"])
def test_hostile_references_are_refused_not_misread(ref):
    with pytest.raises(InvalidName, match="`ref`"):
        parse_ref(ref)


# ---- a symlink in an artifact directory that leads outside it


def test_artifact_link_leading_outside_is_refused_and_nothing_is_written(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"w" * 10)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (art / "notes.txt").symlink_to(secret)
    root = tmp_path / "registry"
    with pytest.raises(ArtifactError, match=r"'notes.txt' in `artifact_dir` .* symbolic link to .*secret.txt, "
                       r"outside the artifact.*cp -L"):
        registry.register(art, "m", root=root)
    assert not (root / "m" / "versions").exists()
    # A linked directory leading out is refused too; a link that stays inside is fine.
    (art / "notes.txt").unlink()
    (art / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ArtifactError, match="'sub'"):
        registry.register(art, "m", root=root)
    (art / "sub").unlink()
    (art / "weights-link").symlink_to(art / "model.safetensors")
    assert registry.register(art, "m", root=root).version == 1


# ---- ONNX external data whose location escapes the model's folder


def onnx_with_external(folder: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "64"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin", "link.bin"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, location):
    from mlplatform.export._onnx import session

    path = onnx_with_external(tmp_path / "model", location)
    (tmp_path / "model" / "link.bin").symlink_to("/etc/passwd")
    with pytest.raises(OnnxModelError, match=r"tensor 'W' keeps its data in external file .* not a file inside "
                       r"the model's folder"):
        session(path, threads=1)


def test_onnx_external_data_is_refused_when_served_from_memory(tmp_path):
    from mlplatform.errors import ServeError
    from mlplatform.serve._models import _refuse_external_data

    path = onnx_with_external(tmp_path / "model", "weights.bin")
    with pytest.raises(ServeError, match="self-contained"):
        _refuse_external_data(path.read_bytes(), "m@1", "model.onnx")


# ---- YAML alias bombs, recursion and size in specs


def laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_without_eating_memory(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(laughs(10))  # 9**10 ≈ 3.5 billion strings if expanded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(SpecError, match=r"bomb.yaml: line \d+: YAML anchors and aliases .* expand to more than "
                       r"100,000 values"):
        config.load(spec, TrainSpec)
    assert time.perf_counter() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: under 50 MB more


def test_small_aliases_still_work():
    text = "defaults: &d {lr: 0.1}\nother: *d\n"
    with pytest.raises(SpecError) as info:  # a TrainSpec needs more; what matters is no alias error
        config.parse(text, TrainSpec, "ok.yaml")
    assert "alias" not in str(info.value)


@pytest.mark.parametrize("text, match", [
    ("a: &x [*x]\n", "recursive anchor"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ("name: " + "x" * 1_100_000 + "\n", "at most 1,000,000"),
])
def test_recursive_deep_or_huge_specs_are_refused(text, match):
    with pytest.raises(SpecError, match=match):
        config.parse(text, TrainSpec, "hostile.yaml")


def test_errors_are_one_line_of_json_safe_text():
    # The spec error is what a user sees: it must not dump the expanded structure.
    with pytest.raises(SpecError) as info:
        config.parse(laughs(7), TrainSpec, "bomb.yaml")
    assert len(str(info.value)) < 400
    json.dumps(str(info.value))


# ---- checkpoint files that would run code when unpickled


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/mlplatform-pwned-marker"),))


def test_a_checkpoint_file_that_runs_code_is_refused_not_executed(tmp_path):
    import torch

    from mlplatform.errors import TrainingFailed
    from mlplatform.train import engine

    marker = Path("/tmp/mlplatform-pwned-marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1)}, "x": _RunsCode()}, path)

    class Engine:  # the one attribute DeepSpeed's load_checkpoint reads files through
        checkpoint_engine = type("TorchCheckpointEngine", (), {})()

    with engine._weights_only(Engine):
        with pytest.raises(TrainingFailed, match=r"mp_rank_00_model_states.pt: refusing to load .*weights_only=True"):
            Engine.checkpoint_engine.load(str(path))
    assert not marker.exists()
    # The RNG files the platform writes itself load with weights_only=True.
    torch.save(engine._get_rng(), tmp_path / "rng_rank0.pt")
    engine._set_rng(torch.load(tmp_path / "rng_rank0.pt", weights_only=True))
