"""Model registry: immutable versions with lineage, aliases, integrity checks, encryption at rest.

    from mlplatform.registry import register, set_alias, fetch
    v = register("runs/digits/artifact", "digits-mlp", root="/data/registry")
    set_alias("digits-mlp", "canary", v.version, root="/data/registry")
    fetch("digits-mlp@canary", "/tmp/model", root="/data/registry")

`root` is a local path or a pyarrow URI (file://, s3://, gs://); when omitted it is
read from MLPLATFORM_REGISTRY_ROOT. The index (versions, aliases, alias history) lives in the
metadata store: SQLite at <root>/registry.db, or the PostgreSQL database that
MLPLATFORM_METADATA_URL names (required for object-store roots). A registry from before the
metadata store is imported once with migrate(root) (`mlplatform registry migrate`). References name a version as 'name' (latest),
'name@3', 'name@latest' or 'name@alias'.
"""

from mlplatform.registry._aliases import alias_history, list_aliases, promote, rollback, set_alias
from mlplatform.registry._integrity import fetch, read_verified, verify
from mlplatform.registry._migrate import Migrated, migrate
from mlplatform.registry._keys import (
    KeyProvider,
    LocalKey,
    default_key,
    generate_key,
    key_from_env,
    key_from_file,
)
from mlplatform.registry._query import diff, list_models, list_versions, resolve, show
from mlplatform.registry._records import (
    AliasMove,
    FileEntry,
    FileProblem,
    Lineage,
    VerifyReport,
    Version,
    VersionDiff,
)
from mlplatform.registry._register import check_writable, register
from mlplatform.registry._rewrap import rewrap
from mlplatform.registry._store import ROOT_ENV

__all__ = [
    "ROOT_ENV",
    "AliasMove",
    "FileEntry",
    "FileProblem",
    "KeyProvider",
    "Lineage",
    "LocalKey",
    "Migrated",
    "VerifyReport",
    "Version",
    "VersionDiff",
    "alias_history",
    "check_writable",
    "diff",
    "fetch",
    "default_key",
    "generate_key",
    "key_from_env",
    "key_from_file",
    "list_aliases",
    "list_models",
    "list_versions",
    "migrate",
    "promote",
    "read_verified",
    "register",
    "resolve",
    "rewrap",
    "rollback",
    "set_alias",
    "show",
    "verify",
]
