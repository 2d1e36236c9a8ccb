"""Key rotation for the registry: re-wrap encrypted versions' data keys under the current key.

Only each manifest's `encryption.wrapped_key`/`key_id` changes: the files (and the lineage sealed
under the data key) are not re-encrypted. Per version, the new manifest is written beside the old
one, its hash recorded in the index (one transaction, under the model's lock), then renamed into
place; a crash in between leaves the index naming the manifest beside, which readers accept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from mlplatform.errors import EncryptionKeyError
from mlplatform.registry._index import REWRAPPED_SUFFIX, Index, model_names, update_index
from mlplatform.registry._keys import KeyProvider
from mlplatform.registry._store import Store


def rewrap(root: str | os.PathLike[str] | None, provider: KeyProvider) -> int:
    """Re-wrap every encrypted version under `root` whose key is not `provider`'s current one; how many.

    `provider` must unwrap the old data keys and wrap the new ones (the cluster keyring after
    `rotate()`, which holds the retired keys).
    """
    store = Store(root)
    count = 0
    for name in model_names(store):
        done: list[tuple[str, str]] = []

        def change(index: Index, name: str = name, done: list = done) -> None:
            for entry in index["versions"]:
                if entry["encrypted"]:
                    pending = _rewrapped(store, name, entry, provider)
                    if pending:
                        entry["manifest_sha256"] = pending[1]
                        done.append((pending[0], pending[0].removesuffix(REWRAPPED_SUFFIX)))

        update_index(store, name, change)
        for pending, final in done:  # after the index names them: the rename is the last step
            store.move(pending, final)
        count += len(done)
    return count


def _rewrapped(store: Store, name: str, entry: dict, provider: KeyProvider) -> tuple[str, str] | None:
    """Write the re-wrapped manifest beside the current one: (its path, its sha256); None if current."""
    number = entry["version"]
    path = store.path(name, "versions", number, "manifest.json")
    data = store.read_bytes(path)
    if data is None or hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]:
        data = store.read_bytes(path + REWRAPPED_SUFFIX)  # an earlier rotation's, interrupted
        if data is None or hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]:
            return None  # tampered or missing: verify() reports it; rotation leaves it as it is
    manifest = json.loads(data)
    encryption = manifest["encryption"]
    if encryption["key_id"] == provider.key_id:
        return None
    try:
        data_key = provider.unwrap(base64.b64decode(encryption["wrapped_key"]), name.encode())
    except Exception:
        raise EncryptionKeyError(
            f"Model {name!r} version {number} is encrypted under key {encryption['key_id']!r}, which the "
            f"keyring cannot unwrap; nothing of it was changed. Restore that key to the keyring's retired keys."
        ) from None
    encryption.update(key_id=provider.key_id,
                      wrapped_key=base64.b64encode(provider.wrap(data_key, name.encode())).decode())
    new = json.dumps(manifest, indent=1).encode()
    with store.open_output(path + REWRAPPED_SUFFIX) as f:
        f.write(new)
    return path + REWRAPPED_SUFFIX, hashlib.sha256(new).hexdigest()
