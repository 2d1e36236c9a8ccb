"""`mlplatform cluster render`: one cluster spec, every production target.

A target is a KubeRay kind (raycluster, rayjob, rayservice) or the Ray VM launcher. The
rendered file starts with the exact command that re-renders it, so a shipped render
that drifts from its spec is one command away from fixed (a test checks they agree).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlplatform.errors import SpecError

TARGETS = ("raycluster", "rayjob", "rayservice", "launcher")


@dataclass(frozen=True)
class RenderOptions:
    """The flags of `cluster render`; None means the target's default."""

    image: str | None = None
    token_secret: str | None = None
    entrypoint: str | None = None
    classification: str | None = None
    serve_config: str | None = None
    image_id: str | None = None
    token_file: str | None = None

    def argv(self) -> list[str]:
        """The flags as given, in a fixed order (for the file's header)."""
        out: list[str] = []
        for name, value in self.__dict__.items():
            if value is not None:
                out += [f"--{name.replace('_', '-')}", value]
        return out


def render(target: str, config: str, options: RenderOptions = RenderOptions()) -> str:
    """The file text: a header naming the command, then the YAML of `target` rendered from spec `config`.

    Raises:
        SpecError: unknown target, a flag the target needs is missing, or the spec cannot be
            expressed on the target (e.g. a launcher group without `instance_type`).
    """
    manifest = _render(target, config, options)
    command = shlex.join(["mlplatform", "cluster", "render", "--target", target, "--config", config, *options.argv()])
    header = f"{_HEADER[0]}{command}{_HEADER[1]}\n"
    return header + yaml.dump(manifest, Dumper=_NoAliases, sort_keys=False, width=120)


_HEADER = ("# Rendered by `", "`; edit the spec, not this file.")


def rendered_by(path: str | Path) -> list[str]:
    """The `mlplatform` arguments that rendered a shipped file, read from its first line.

    Raises:
        SpecError: the file does not start with the header `render` writes.
    """
    first = Path(path).read_text().split("\n", 1)[0]
    if not (first.startswith(_HEADER[0] + "mlplatform ") and first.endswith(_HEADER[1])):
        raise SpecError(f"{path} does not start with the header `mlplatform cluster render` writes; render it again.")
    return shlex.split(first[len(_HEADER[0]):-len(_HEADER[1])])[1:]


class _NoAliases(yaml.SafeDumper):
    """Every pod's env written out in full: `&id001` anchors would make a manifest hard to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Multi-line strings (a RayService's serveConfigV2) as readable `|` blocks.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_NoAliases.add_representer(str, _text)


def _render(target: str, config: str, o: RenderOptions) -> dict[str, Any]:
    from mlplatform import config as config_mod
    from mlplatform import residency
    from mlplatform.cluster import kuberay, launcher
    from mlplatform.cluster.spec import ClusterSpec

    if target not in TARGETS:
        raise SpecError(f"Got {target!r} for `--target`; must be one of {', '.join(TARGETS)}.")
    _require(target, o)
    spec = config_mod.load(config, ClusterSpec)
    policy = residency.for_cluster_spec(spec, config)
    image = o.image or kuberay.DEFAULT_IMAGE
    if target == "raycluster":
        return kuberay.render_raycluster(spec, image, policy, o.token_secret)
    if target == "rayjob":
        assert o.entrypoint is not None
        classification = o.classification or _declared_classification(o.entrypoint)
        return kuberay.render_rayjob(spec, o.entrypoint, image, policy, classification, o.token_secret)
    if target == "rayservice":
        assert o.serve_config is not None
        serve_config = _serve_config(o.serve_config)
        name = f"{spec.name}-{Path(o.serve_config).stem}"
        return kuberay.render_rayservice(spec, serve_config, name, image, policy, o.token_secret)
    return launcher.render_launcher(spec, policy, o.image_id or launcher.DEFAULT_IMAGE_ID, o.token_file)


# Flags each target needs, and those it would silently ignore.
_NEEDS = {"rayjob": ("entrypoint",), "rayservice": ("serve_config",)}
_ONLY = {
    "entrypoint": ("rayjob",), "classification": ("rayjob",), "serve_config": ("rayservice",),
    "image": ("raycluster", "rayjob", "rayservice"), "token_secret": ("raycluster", "rayjob", "rayservice"),
    "image_id": ("launcher",), "token_file": ("launcher",),
}
_EXAMPLES = {
    "entrypoint": '--entrypoint "python jobs/train.py --config jobs/configs/digits.yaml"',
    "serve_config": "--serve-config serve_apps/digits-cpu.yaml",
}


def _require(target: str, o: RenderOptions) -> None:
    for name in _NEEDS.get(target, ()):
        if getattr(o, name) is None:
            raise SpecError(f"Got no `--{name.replace('_', '-')}`; --target {target} needs it, e.g. {_EXAMPLES[name]}.")
    for name, targets in _ONLY.items():
        if getattr(o, name) is not None and target not in targets:
            raise SpecError(
                f"Got `--{name.replace('_', '-')}` with --target {target}, which does not use it (only "
                f"{', '.join(targets)} do). Drop the flag."
            )


def _declared_classification(entrypoint: str) -> str | None:
    """The classification the entrypoint's `--config` spec declares, if it is a spec that has one."""
    from mlplatform import config, spec_kinds

    words = shlex.split(entrypoint)
    paths = [b for a, b in zip(words, words[1:]) if a == "--config"]
    paths += [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
    kind = spec_kinds.kind_of(paths[0]) if paths else None
    if kind is None or not Path(paths[0]).exists():
        return None
    return getattr(config.load(paths[0], spec_kinds.model_for(kind)), "classification", None)


def _serve_config(path: str) -> dict[str, Any]:
    """The Serve config file's content, after validating every application's args."""
    from mlplatform import config, spec_kinds

    config.load(path, spec_kinds.model_for("serve"))
    return yaml.safe_load(Path(path).read_text())
