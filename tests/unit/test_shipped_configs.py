"""Every shipped YAML loads against its model (LitGPT's config-hub test): configs never rot."""

import pytest
from pydantic import BaseModel

from conftest import REPO
from mlplatform import config, spec_kinds

SHIPPED = sorted(
    {str(path.relative_to(REPO)) for pattern in spec_kinds.SHIPPED for path in REPO.glob(pattern)}
)
SHIPPED = [(path, spec_kinds.kind_of(path)) for path in SHIPPED]


@pytest.mark.parametrize("path,kind", SHIPPED, ids=[p for p, _ in SHIPPED])
def test_shipped_yaml_validates(path, kind):
    model = spec_kinds.model_for(kind)
    assert isinstance(config.load(REPO / path, model), model)


def test_every_shipped_spec_yaml_has_a_kind():
    # A YAML dropped into a spec folder without a model would never be checked.
    for folder in ["cluster_configs/local", "jobs/configs", "serve_apps"]:
        for path in (REPO / folder).glob("*.yaml"):
            assert spec_kinds.kind_of(str(path.relative_to(REPO))), f"{path}: add its kind to spec_kinds.SHIPPED"


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    if model in seen:
        return []
    seen.add(model)
    found = [model]
    for field in model.model_fields.values():
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            for inner in [arg, *getattr(arg, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found += _models(inner, seen)
    return found


@pytest.mark.parametrize("kind", sorted(spec_kinds.KINDS))
def test_every_field_is_described_and_extra_keys_forbidden(kind):
    for model in _models(spec_kinds.model_for(kind), set()):
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
