"""Plumbing shared by every capability: storage, placement, artifact layout, the metadata store.

Capabilities (cluster, train, export, registry, serve) import these modules directly; nothing
here imports a capability, so the dependency only ever points one way.
"""
