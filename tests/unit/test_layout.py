"""The package layout the product card fixes, and the stdlib module it must not shadow."""

import subprocess
import sys

from conftest import REPO


def test_platform_dir_is_not_a_package():
    # A package importable as `platform` would shadow the stdlib module Ray, torch and pytest use.
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_is_the_real_one_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, mlplatform; print(platform.python_version(), mlplatform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert out.startswith(sys.version.split()[0])
    assert "platform/mlplatform/__init__.py" in out


def test_top_level_layout():
    for name in ["pyproject.toml", "platform", "jobs", "serve_apps", "cluster_configs", "tests", "notebooks", "README.md", "Makefile", ".ci/run", "BENCHMARKS.md"]:
        assert (REPO / name).exists(), name


# ---- one shared layer: capabilities meet only through public packages and mlplatform._internal

PACKAGE = REPO / "platform" / "mlplatform"
CAPABILITIES = {"cluster", "train", "export", "registry", "serve", "residency"}
# What lives in mlplatform._internal only: storage plumbing, label matching, artifact file names.
PLUMBING = {
    "FileSystem.from_uri": "storage.filesystem()",
    "os.replace": "storage.atomic_write() / atomic_path() / replace_dir()",
    "fcntl": "storage.file_lock()",
    '"://" in': "storage.is_uri()",
    '"in("': "placement (label selector parsing and matching)",
    **{f'"{name}"': "artifact_layout (artifact file names)" for name in (
        "model.safetensors", "metadata.json", "reference_sample.parquet", "model.onnx", "model.int8.onnx",
        "export_report.json",
    )},
}


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, path.read_text()


def _imported_modules(source: str):
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_capability_imports_another_capabilitys_private_module():
    offending = []
    for rel, source in _sources():
        own = rel.parts[0] if len(rel.parts) > 1 else None
        for module in _imported_modules(source):
            parts = module.split(".")
            if (len(parts) >= 3 and parts[0] == "mlplatform" and parts[1] in CAPABILITIES
                    and parts[1] != own and parts[2].startswith("_")):
                offending.append(f"{rel} imports {module}")
    assert not offending, "use the capability's public __init__ instead:\n" + "\n".join(offending)


def test_shared_plumbing_lives_only_in_the_internal_package():
    offending = []
    for rel, source in _sources():
        if rel.parts[0] == "_internal":
            continue
        for needle, instead in PLUMBING.items():
            if needle in source:
                offending.append(f"{rel}: {needle} (use mlplatform._internal.{instead})")
    assert not offending, "\n".join(offending)


def test_internal_package_imports_no_capability():
    for rel, source in _sources():
        if rel.parts[0] == "_internal":
            bad = [m for m in _imported_modules(source) if m.split(".")[:2][-1] in CAPABILITIES]
            assert not bad, f"{rel} imports {bad}: _internal must stay below every capability"
