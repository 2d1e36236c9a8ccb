"""The `mlplatform` command: one dispatch table from verbs to library functions.

Handlers import what they need when they run, so `--help` at every level and spec
validation answer without importing Ray or torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Command:
    """One verb: its handler, help line and arguments (argparse flags → kwargs)."""

    handler: Callable[[argparse.Namespace], int | None]
    help: str
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = field(default_factory=tuple)


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, kwargs


_NAME = arg("--name", help="Cluster name (default: the only running local cluster).")
_ROOT = arg("--root", default=None, help="Registry root: path or URI (default $MLPLATFORM_REGISTRY_ROOT).")
_REF = arg("ref", help="name, name@VERSION or name@ALIAS.")
_REASON = arg("--reason", default=None, help="Why: recorded in the alias history.")
_TRAIN_CONFIG = arg("--config", required=True, metavar="PATH", help="TrainSpec YAML, e.g. jobs/configs/digits.yaml.")
_SERVE_FILE = arg("path", metavar="PATH", help="Serve config YAML, e.g. serve_apps/digits-cpu.yaml.")
_APP = arg("app", help="Serve application name.")
_KEYS_DIR = arg("--keys-dir", default=None, help="Key store directory (default $MLPLATFORM_HOME/serve/keys).")
_CONFIG = arg("--config", required=True, metavar="PATH", help="Cluster spec YAML, e.g. cluster_configs/local/dev.yaml.")
_USER = arg("user", help="User name, e.g. alice.")
_ROLE = arg("--role", required=True, choices=["viewer", "developer", "deployer", "admin"],
            help="viewer (read), developer (register, export), deployer (aliases, deploy, rollback), admin (policy, keys, users).")
_ON = arg("--on", default="*", metavar="RESOURCE",
          help="Where the role applies: `*` (everywhere, default), registry:<model> or serve:<app>.")


# --- handlers: thin adapters from flags to library calls -------------------------------


def _cluster_up(a: argparse.Namespace) -> None:
    from mlplatform import cluster, config

    spec = config.load(a.config, cluster.ClusterSpec)
    if spec.autoscaled():
        from mlplatform.cluster.autoscaler import bounds

        groups = ", ".join(f"{g.name} {'{}-{}'.format(*bounds(g))}" for g in spec.worker_groups)
        print(f"Starting '{spec.name}': head, and Ray's autoscaler for the worker groups ({groups} nodes)...", flush=True)
    else:
        print(f"Starting '{spec.name}': head + {sum(g.count for g in spec.worker_groups)} worker node(s)...", flush=True)
    running = cluster.up(spec, a.config, timeout_s=a.timeout)
    print_nodes(cluster.inventory(spec.name))
    print(f"\nDashboard: {running.dashboard_url}  (log in with `mlplatform cluster token`)")
    print(f"Address:   {running.gcs_address}  (token auth on, TLS {'on' if running.tls_dir else 'OFF'})")
    print('Point `ray` / `ray job submit` at it:  eval "$(mlplatform cluster env)"')


def _cluster_down(a: argparse.Namespace) -> None:
    from mlplatform import cluster

    stopped = cluster.down(a.name)
    launched = " (and every node its autoscaler launched)" if stopped.autoscaled else ""
    print(f"Stopped '{stopped.name}': {len(stopped.nodes)} node(s){launched}.")


def _cluster_scale(a: argparse.Namespace) -> None:
    from mlplatform.cluster import local

    low, high = local.set_bounds(a.name, a.group, min_workers=a.min_workers, max_workers=a.max_workers)
    print(f"Group '{a.group}' now scales between {low} and {high} node(s); the autoscaler acts within seconds.")


def _cluster_status(a: argparse.Namespace) -> None:
    from mlplatform import cluster

    running = cluster.find(a.name)
    print(f"Cluster '{running.name}'  address {running.gcs_address}  dashboard {running.dashboard_url}")
    print_nodes(cluster.inventory(running.name))


def _cluster_env(a: argparse.Namespace) -> None:
    from mlplatform import cluster

    for key, value in cluster.cluster_env(a.name).items():
        print(f"export {key}={value}")


def _cluster_certs_renew(a: argparse.Namespace) -> None:
    from mlplatform.cluster import local

    renewed, running = local.renew_certs(a.name)
    for path in renewed:
        print(f"renewed {path}")
    if running:
        print(f"Cluster '{a.name}' is running: clients use the new client certificate at once; its nodes keep the "
              f"ones they loaded until restarted (`mlplatform cluster down --name {a.name}`, then `up`).")


def _cluster_token(a: argparse.Namespace) -> None:
    from mlplatform import cluster

    print(cluster.find(a.name).token())


def _cluster_render(a: argparse.Namespace) -> None:
    from mlplatform.cluster.render import RenderOptions, render

    options = RenderOptions(
        image=a.image, token_secret=a.token_secret, entrypoint=a.entrypoint, classification=a.classification,
        serve_config=a.serve_config, image_id=a.image_id, token_file=a.token_file,
    )
    print(render(a.target, a.config, options), end="")


def _export(a: argparse.Namespace) -> int:
    from mlplatform.export import export_model, format_report, make_spec

    spec = make_spec(a.config, quantize=a.quantize, threads=a.threads, classification=a.classification,
                     students=a.student)
    report = export_model(a.model, spec, root=a.root)
    print(format_report(report))
    return 0 if report.passed else 1  # a failed student is reported, not fatal


def _compress(a: argparse.Namespace) -> int:
    from mlplatform import config
    from mlplatform.compress import CompressSpec, compress_model, format_report

    spec = config.load(a.config, CompressSpec) if a.config else CompressSpec()
    report = compress_model(a.model, spec, root=a.root)
    print(format_report(report))
    return 0 if report.ok else 1


def _train_plan(a: argparse.Namespace) -> None:
    from mlplatform import config
    from mlplatform.train import TrainSpec, format_plan, plan

    print(format_plan(plan(config.load(a.config, TrainSpec))))


def _tune_plan(a: argparse.Namespace) -> None:
    from mlplatform import config
    from mlplatform.cluster import connect
    from mlplatform.tune import TuneSpec, load_train_spec, plan

    spec = config.load(a.config, TuneSpec)
    base = load_train_spec(spec, a.config)
    connect(a.name)
    the_plan = plan(spec, base)
    print(json.dumps(the_plan.to_json(), indent=2, default=str) if a.json else the_plan.describe())


def _serve_check(a: argparse.Namespace) -> None:
    from mlplatform import serve

    spec = serve.check_config(a.path)
    print(f"ok  {a.path}: {len(spec.applications)} application(s)")


def _serve_deploy(a: argparse.Namespace) -> None:
    from mlplatform import serve

    apps = serve.deploy(a.path, cluster=a.name, working_dir=a.working_dir)
    shipped = f" with {a.working_dir} as their working_dir" if a.working_dir else ""
    print(f"Submitted {', '.join(apps)}{shipped}; follow with `mlplatform serve status`.")


def _serve_status(a: argparse.Namespace) -> None:
    import json

    from mlplatform import serve

    print(json.dumps(serve.status(cluster=a.name), indent=2, default=str))


def _serve_delete(a: argparse.Namespace) -> None:
    from mlplatform import serve

    serve.delete(a.app, cluster=a.name)
    print(f"Deleted application '{a.app}'.")


def _serve_key_create(a: argparse.Namespace) -> None:
    from mlplatform import serve

    quota = serve.Quota.of(a.rate, a.burst) if a.rate is not None else None
    if quota is None and a.burst is not None:
        from mlplatform.errors import ApiKeyError

        raise ApiKeyError("Got `--burst` without `--rate`; a quota needs a rate (requests/s), e.g. --rate 10 --burst 20.")
    created = serve.create_key(a.app, label=a.label, scopes=a.scope or ("predict",), expires=a.expires_in,
                               quota=quota, keys_dir=a.keys_dir)
    print(f"key id {created.record.key_id} for '{a.app}' (shown once; store it now):")
    print(created.key)


def _serve_key_rotate(a: argparse.Namespace) -> None:
    from mlplatform import serve

    created = serve.rotate_key(a.app, a.key_id, grace=a.grace, keys_dir=a.keys_dir)
    old = next(k for k in serve.list_keys(a.app, keys_dir=a.keys_dir) if k.key_id == a.key_id)
    print(f"key id {created.record.key_id} replaces {a.key_id} of '{a.app}' (shown once; store it now); "
          f"{a.key_id} stops working at {old.expires_at}:")
    print(created.key)


def _serve_key_list(a: argparse.Namespace) -> None:
    from mlplatform import serve

    print(table(["KEY ID", "LABEL", "SCOPES", "STATE", "CREATED", "EXPIRES", "QUOTA", "REVOKED"], [
        [k.key_id, k.label, ",".join(k.scopes), k.state, k.created_at, k.expires_at or "never",
         k.quota.describe() if k.quota else "none", k.revoked_at or "-"]
        for k in serve.list_keys(a.app, keys_dir=a.keys_dir)
    ]))


def _serve_key_revoke(a: argparse.Namespace) -> None:
    from mlplatform import serve

    record = serve.revoke_key(a.app, a.key_id, keys_dir=a.keys_dir)
    print(f"Revoked key {record.key_id} of '{a.app}' at {record.revoked_at}.")


def _users_add(a: argparse.Namespace) -> None:
    from mlplatform import access

    user, token = access.add_user(a.user, a.role, a.on)
    print(f"user {user.name!r}: {_grants(user)}. Their token (shown once; hand it over privately, "
          f"use it as {access.TOKEN_ENV} or in a 0600 file named by {access.TOKEN_FILE_ENV}):")
    print(token)


def _users_grant(a: argparse.Namespace) -> None:
    from mlplatform import access

    user = access.grant(a.user, a.role, a.on)
    print(f"user {user.name!r}: {_grants(user)}")


def _users_remove(a: argparse.Namespace) -> None:
    from mlplatform import access

    access.remove_user(a.user)
    print(f"Removed user {a.user!r} and every token they held.")


def _users_list(a: argparse.Namespace) -> None:
    from mlplatform import access

    print(table(["USER", "ROLES", "TOKENS", "CREATED", "BY"], [
        [u.name, _grants(u), u.tokens, u.created_at, u.created_by] for u in access.list_users()
    ]))


def _users_whoami(a: argparse.Namespace) -> None:
    from mlplatform import access

    caller = access.whoami()
    print(f"{caller.user.name}: {_grants(caller.user)} (identified by {caller.via})")


def _users_audit(a: argparse.Namespace) -> int:
    from mlplatform import access

    path = access.local_trail()
    if not path.exists():
        print(f"no decisions recorded on this machine yet ({path})")
        return 0
    return _print_trail(path, a.verify, "access")


def _grants(user: Any) -> str:
    return ", ".join(f"{role.value} on {res}" for res, role in user.grants.items()) or "no roles"


def _validate(a: argparse.Namespace) -> int:
    from mlplatform import config, spec_kinds
    from mlplatform.errors import PlatformError, SpecError

    if a.kind is not None and a.kind not in spec_kinds.KINDS:
        raise SpecError(f"Got {a.kind!r} for `--kind`; must be one of {', '.join(spec_kinds.KINDS)}.")
    failed = 0
    for path in a.paths:
        try:
            # The flag, else where the file sits (the shipped folders), else its top-level keys.
            kind, how = a.kind or spec_kinds.kind_of(path), ""
            if kind is None:
                kind, how = spec_kinds.kind_from_content(path), ", inferred from its keys"
            loaded = config.load(path, spec_kinds.model_for(kind))
            print(f"ok  {path} ({kind}{how})")
            if getattr(loaded, "tls", True) is False:  # a cluster spec that turns TLS off
                from mlplatform.cluster.local import tls_off_warning

                print(f"warning: {tls_off_warning(loaded.name, str(path))}", file=sys.stderr)
        except PlatformError as e:
            failed += 1
            checked = f"\n  (checked as a {kind} spec{how}; pass --kind to check it as another)" if how else ""
            print(f"error: {e}{checked}", file=sys.stderr)
    return 1 if failed else 0


def _registry_list(a: argparse.Namespace) -> None:
    from mlplatform import registry

    if a.name is None:
        print(table(["MODEL", "VERSIONS", "ALIASES"], [
            [m, len(registry.list_versions(m, root=a.root)), _aliases(registry.list_aliases(m, root=a.root))]
            for m in registry.list_models(root=a.root)
        ]))
        return
    aliases = registry.list_aliases(a.name, root=a.root)
    rows = []
    for v in registry.list_versions(a.name, root=a.root):
        here = ",".join(sorted(k for k, n in aliases.items() if n == v.version))
        rows.append([v.version, v.registered_at, v.registered_by, "yes" if v.encrypted else "no", here, _metrics(v.lineage.metrics)])
    print(table(["VERSION", "REGISTERED", "BY", "ENCRYPTED", "ALIASES", "METRICS"], rows))


def _registry_show(a: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from mlplatform import registry

    version = registry.show(a.ref, root=a.root)
    data = asdict(version)
    data["files"] = [f"{f['path']}  {f['size']} B  sha256 {f['sha256'][:16]}" for f in data["files"]]
    print(json.dumps(data, indent=2, default=str))


def _registry_diff(a: argparse.Namespace) -> None:
    from mlplatform import registry

    d = registry.diff(a.name, a.a, a.b, root=a.root)
    rows = [[f"{section}.{key}", str(old), str(new)] for section in ("metrics", "spec", "lineage") for key, (old, new) in getattr(d, section).items()]
    rows += [[f"file {p}", "-", "added"] for p in d.files_added]
    rows += [[f"file {p}", "present", "removed"] for p in d.files_removed]
    rows += [[f"file {p}", "", "changed"] for p in d.files_changed]
    print(f"{d.name}: version {d.a} -> {d.b}")
    print(table(["WHAT", f"v{d.a}", f"v{d.b}"], rows) if rows else "no differences")


def _registry_alias(a: argparse.Namespace) -> None:
    from mlplatform import registry

    _print_move(registry.set_alias(a.name, a.alias, a.version, root=a.root, reason=a.reason))


def _registry_promote(a: argparse.Namespace) -> None:
    from mlplatform import registry

    _print_move(registry.promote(a.name, a.source, a.target, root=a.root, reason=a.reason))


def _registry_rollback(a: argparse.Namespace) -> None:
    from mlplatform import registry

    _print_move(registry.rollback(a.name, a.alias, root=a.root, reason=a.reason))


def _registry_history(a: argparse.Namespace) -> None:
    from mlplatform import registry

    moves = registry.alias_history(a.name, a.alias, root=a.root)
    print(table(["WHEN", "ALIAS", "ACTION", "FROM", "TO", "BY", "REASON"], [
        [m.at, m.alias, m.action, m.from_version if m.from_version is not None else "-", m.to_version, m.actor, m.reason or ""]
        for m in moves
    ]))


def _registry_migrate(a: argparse.Namespace) -> None:
    from mlplatform import registry

    done = registry.migrate(root=a.root)
    if not done:
        print("nothing to migrate: no model under the root has a file-based index.json")
        return
    print(table(["MODEL", "VERSIONS", "ALIAS MOVES", "STATUS"], [
        [m.name, m.versions, m.alias_moves, "already in the metadata store" if m.already else "imported"] for m in done
    ]))


def _residency_policy(name: str | None):
    """The policy the running cluster holds (its GCS), not the file it was started from."""
    from mlplatform import residency
    from mlplatform.cluster import connect
    from mlplatform.errors import ResidencyError

    connect(name)
    policy = residency.current()
    if policy is None:
        raise ResidencyError("This cluster runs without a residency policy; name one in its spec (`residency_policy:`) "
                             "and start it again with `mlplatform cluster up`.")
    return policy


def _residency_show(a: argparse.Namespace) -> None:
    policy = _residency_policy(a.name)
    print(f"Residency policy {policy.name!r} (default classification: {policy.default_classification})")
    print(table(["CLASSIFICATION", "REGIONS", "ZONES", "STORAGE PREFIXES"], [
        [name, ", ".join(rule.regions), ", ".join(rule.zones) or "-", ", ".join(rule.storage_prefixes) or "anywhere"]
        for name, rule in policy.classifications.items()
    ]))


def _residency_check(a: argparse.Namespace) -> None:
    import time

    from mlplatform import config
    from mlplatform.train import TrainSpec
    from mlplatform.train.preflight import preflight

    started = time.perf_counter()
    spec = config.load(a.config, TrainSpec)
    policy = _residency_policy(a.name)
    selector = preflight(spec, policy=policy)
    name = policy.resolve(spec.classification)
    print(f"ok  {a.config}: {name!r} work may run in {policy.where(name)}; workers get {selector}; "
          f"nodes there can hold all {spec.num_workers} ({time.perf_counter() - started:.1f} s)")


def _flushed_trail(name: str | None) -> Path:
    """The running cluster's audit trail, with the records workers left for its writer moved in."""
    from mlplatform.cluster import connect, local
    from mlplatform.residency import audit, writer

    cluster = local.find(name)
    connect(cluster.name)
    writer.flush(cluster.name)
    return audit.default_path(cluster.name)


def _residency_audit(a: argparse.Namespace) -> int:
    from mlplatform.cluster import local
    from mlplatform.residency import audit

    if a.path:
        print(audit.default_path(local.find(a.name).name))
        return 0
    return _print_trail(_flushed_trail(a.name), a.verify)


def _print_trail(path, verify: bool, kind: str | None = None) -> int:
    """An audit trail's records as JSON lines, or with `verify` its hash-chain check (exit 1 if broken)."""
    from mlplatform.residency import audit

    if verify:
        report = audit.verify(path)
        if report.ok:
            print(f"ok  {path}: {report.records} record(s), hash chain intact")
            return 0
        print(f"BROKEN  {path}: {report.reason}", file=sys.stderr)
        return 1
    for record in audit.read(path, kind):
        print(json.dumps(record, sort_keys=True))
    return 0


def _residency_apply(a: argparse.Namespace) -> None:
    from mlplatform import residency

    _residency_policy(a.name)  # connected, and the cluster runs under a policy
    new = residency.load(a.policy)
    old = residency.apply(new)
    print(f"ok  policy {new.name!r} in force (was {old.name!r}); new workers and jobs follow it")


def _residency_sweep(a: argparse.Namespace) -> int:
    from mlplatform.residency import audit, record
    from mlplatform.residency.sweep import sweep

    policy = _residency_policy(a.name)
    _flushed_trail(a.name)  # the guard's own records first, then the sweep's
    checked, findings = sweep(policy, a.job)
    record("sweep", job_id=a.job, placements=len(checked), outside=len(findings),
           findings=[f.to_json() for f in findings[:100]])
    if a.json:
        print(json.dumps({"policy": policy.name, "placements": len(checked), "outside": [f.to_json() for f in findings]},
                         indent=2))
        return 1 if findings else 0
    if findings:
        print(table(["JOB", "KIND", "NAME", "STATE", "NODE", "REGION", "CLASSIFICATION"], [
            [f.placement.job_id, f.placement.kind, f.placement.name, f.placement.state, f.placement.node_id[:12],
             f.placement.region or "-", f.classification] for f in findings
        ]), file=sys.stderr)
        print(f"OUTSIDE  {len(findings)} of {len(checked)} actor(s)/task(s) ran outside the regions their job's "
              f"classification allows (policy {policy.name!r}); recorded in {audit.AUDIT_FILE}", file=sys.stderr)
        return 1
    jobs = len({p.job_id for p in checked})
    print(f"ok  {len(checked)} actor(s)/task(s) of {jobs} job(s) ran inside their classification's regions "
          f"(policy {policy.name!r}, from Ray's state API)")
    return 0


def _residency_report(a: argparse.Namespace) -> None:
    import os

    from mlplatform.errors import SpecError
    from mlplatform.registry import ROOT_ENV
    from mlplatform.residency import CLUSTER_ENV, audit, report

    if a.job and a.model:
        raise SpecError("Got both --job and --model; pass one of them, or neither to report every job and version.")
    out: dict[str, Any] = {}
    if not a.model:
        from mlplatform.cluster import local

        # An auditor may ask after the cluster is gone: a named cluster's trail needs no running cluster.
        name = a.name or os.environ.get(CLUSTER_ENV) or local.find().name
        running = name in {c.name for c in local.running()}
        out["audit_trail"] = str(_flushed_trail(name) if running else audit.default_path(name))
        out["jobs"] = report.jobs(out["audit_trail"], a.job)
    if not a.job:
        if a.model or a.root or os.environ.get(ROOT_ENV):
            out["registry"] = a.root or os.environ.get(ROOT_ENV)
            out["versions"] = report.versions(a.root, a.model)
        else:  # nothing to read; say so rather than fail the jobs half of the report
            out["registry"], out["versions"] = None, []
    if a.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    if "jobs" in out:
        print(f"Jobs (audit trail {out['audit_trail']}):")
        print(table(["JOB", "WHAT", "CLASSIFICATION", "RAN IN REGIONS", "ON NODES", "DENIED", "STOPPED OUTSIDE"], [
            [j["job_id"], ",".join(sorted({f"{p['what']} {p['name']}" for p in j["placements"] or j["denials"]})) or "-",
             j["classification"] or "-", ",".join(j["regions"]) or "not recorded", _short_ids(j["node_ids"]),
             len(j["denials"]) or "-", len(j["violations"]) or "-"]
            for j in out["jobs"]
        ]) if out["jobs"] else "  none recorded")
    if "versions" in out:
        if "jobs" in out:
            print()
        if out["registry"] is None:
            print(f"Model versions: no registry (pass --root or set {ROOT_ENV}).")
            return
        print(f"Model versions (registry {out['registry']}):")
        print(table(["VERSION", "ALIASES", "CLASSIFICATION", "TRAINED IN", "ON NODES", "STORED AT", "STORAGE REGION"], [
            [v["ref"], ",".join(v["aliases"]) or "-", v["classification"] or "-",
             ",".join(v["training_regions"]) or "not recorded", _short_ids(v["training_node_ids"]), v["stored_at"],
             v["storage_region"] or "-"]
            for v in out["versions"]
        ]) if out["versions"] else "  none registered")


def _cost_report(a: argparse.Namespace) -> None:
    from mlplatform.cost import open_ledger
    from mlplatform.cost.report import format_table, report

    ledger = open_ledger()
    if a.refresh:
        from mlplatform.cluster import connect
        from mlplatform.cost import meter

        connect(a.cluster)
        meter.refresh(ledger)
    out = report(ledger, cluster=a.cluster, job=a.job, by=a.by)
    print(json.dumps(out, indent=2, sort_keys=True) if a.json else format_table(out))


def _cost_catalog(a: argparse.Namespace) -> None:
    import os

    from mlplatform.cost import catalog
    from mlplatform.errors import CostError

    path = a.config or os.environ.get(catalog.CATALOG_ENV)
    if not path:
        raise CostError(f"No price catalog given; pass --config FILE (e.g. cluster_configs/prices/example.yaml) "
                        f"or set {catalog.CATALOG_ENV}.")
    cat = catalog.load(path)
    note = "  EXAMPLE figures, not a quote" if cat.example else ""
    print(f"Price catalog {cat.name!r} ({cat.currency} per node-hour, as of {cat.as_of}){note}")
    print(f"Source: {cat.source}")
    print(table(["REGION", "NODE GROUP", "MARKET", "PER HOUR", "PREEMPTIONS/H", "INSTANCE"], [
        [p.region, p.node_group, p.market, f"{p.per_hour:.4f}",
         f"{p.preemption_rate_per_hour:.2f}" if p.market == "spot" else "-", p.instance_type or "-"]
        for p in sorted(cat.prices, key=lambda p: (p.region, p.node_group, p.market))
    ]))
    if cat.off_peak:
        o = cat.off_peak
        print(f"Off-peak: {o.start}-{o.end} {o.timezone}, prices x{o.price_factor:g} "
              f"(saves {cat.off_peak_saving():.0%})")


def _short_ids(ids: Sequence[str]) -> str:
    # Ray node ids are 56 hex digits; 12 tell the nodes of one cluster apart (as `residency sweep` prints them).
    return ",".join(i[:12] for i in ids) or "-"


def _registry_verify(a: argparse.Namespace) -> int:
    from mlplatform import registry

    report = registry.verify(a.ref, root=a.root)
    if report.ok:
        scope = "plaintext and stored bytes" if report.plaintext_checked else "stored bytes (no key given)"
        print(f"ok  {report.ref}: {report.files_checked} file(s) match their manifest ({scope})")
        return 0
    for p in report.problems:
        print(f"TAMPERED  {report.ref}  {p.path}: {p.kind}: {p.detail}", file=sys.stderr)
    return 1


def _keys_rotate(a: argparse.Namespace) -> int:
    import os

    from mlplatform._internal import keyring
    from mlplatform.residency.names import CLUSTER_ENV

    from mlplatform import access, registry

    if a.name:
        os.environ[CLUSTER_ENV] = a.name  # the key beside that cluster's auth token
    access.require("keys.rotate")
    old, new, count = keyring.rotate_and_rewrap(a.paths)
    versions = sum(registry.rewrap(root, keyring.cluster_keyring(create=False)) for root in a.registry_root)
    print(f"rotated the cluster key {old} -> {new}; re-wrapped {count} encrypted file(s) and {versions} registry "
          f"version(s) (data not re-encrypted); the old key stays in {keyring.key_dir() / keyring.RETIRED} for "
          f"anything not under the paths given")
    return 0


def _aliases(aliases: dict[str, int]) -> str:
    return ", ".join(f"{k}->{v}" for k, v in sorted(aliases.items())) or "-"


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())[:4])


def _print_move(move: Any) -> None:
    was = f"version {move.from_version}" if move.from_version is not None else "nothing"
    print(f"{move.alias}: {was} -> version {move.to_version} ({move.action} by {move.actor})")


def print_nodes(nodes: Sequence[Any]) -> None:
    """The node inventory as a table (cluster up/status and the demo)."""
    rows = [
        [
            n.name + (" (head)" if n.is_head else ""),
            n.group,
            n.region,
            n.zone,
            n.market,
            _resources(n.resources),
            "yes" if n.alive else "NO",
        ]
        for n in nodes
    ]
    print(table(["NODE", "GROUP", "REGION", "ZONE", "MARKET", "RESOURCES", "ALIVE"], rows))


def _resources(resources: Any) -> str:
    gib = 2**30
    parts = [f"CPU={resources.get('CPU', 0):g}"]
    if resources.get("GPU"):
        parts.append(f"GPU={resources['GPU']:g}")
    parts.append(f"mem={resources.get('memory', 0) / gib:.1f}G")
    parts += [f"{k}={v:g}" for k, v in sorted(resources.items()) if k not in {"CPU", "GPU", "memory", "object_store_memory"}]
    return " ".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# --- the dispatch table ------------------------------------------------------------

COMMANDS: dict[tuple[str, ...], Command] = {
    ("cluster", "up"): Command(
        _cluster_up,
        "Start a local multi-node Ray cluster from a spec (token auth on).",
        (_CONFIG, arg("--timeout", type=float, default=120.0, help="Seconds to wait for each node (default 120).")),
    ),
    ("cluster", "down"): Command(_cluster_down, "Stop exactly the nodes `up` started.", (_NAME,)),
    ("cluster", "status"): Command(_cluster_status, "Table of the cluster's nodes: group, region, market, resources.", (_NAME,)),
    ("cluster", "env"): Command(
        _cluster_env, 'Shell exports for `ray`, `ray job submit` and ray.init(): eval "$(mlplatform cluster env)".', (_NAME,)
    ),
    ("cluster", "certs", "renew"): Command(
        _cluster_certs_renew,
        "New node and client TLS certificates from the cluster's CA (restart a running cluster to load them).",
        (arg("--name", required=True, help="Cluster name."),),
    ),
    ("cluster", "render"): Command(
        _cluster_render,
        "Print the spec for production: a KubeRay RayCluster, RayJob or RayService, or a Ray VM launcher config.",
        (
            _CONFIG,
            arg("--target", required=True,
                help="What to render: raycluster, rayjob (needs --entrypoint), rayservice (needs --serve-config), "
                "launcher (AWS `ray up` config; every group needs instance_type)."),
            arg("--entrypoint", help='rayjob: what `ray job submit` runs after `--`, e.g. '
                '"python jobs/train.py --config jobs/configs/digits.yaml".'),
            arg("--classification", help="rayjob: the job's data classification, which pins its driver (default: the "
                "one its --config spec declares, else the residency policy's default)."),
            arg("--serve-config", metavar="PATH", help="rayservice: Serve config YAML, e.g. serve_apps/digits-cpu.yaml."),
            arg("--image", help="KubeRay targets: container image with mlplatform and this repository "
                "(default rayproject/ray:2.60.0-py311)."),
            arg("--token-secret", help="KubeRay targets: Secret with the auth token under key auth_token "
                "(default <cluster>-ray-token)."),
            arg("--image-id", help="launcher: AMI id (default: AWS's Deep Learning AMI, resolved from SSM)."),
            arg("--token-file", help="launcher: local file holding the auth token (default ~/.mlplatform/tokens/<cluster>)."),
        ),
    ),
    ("cluster", "token"): Command(_cluster_token, "Print the cluster's auth token (the dashboard asks for it).", (_NAME,)),
    ("cluster", "scale"): Command(
        _cluster_scale,
        "Change an autoscaled group's node bounds on a running local cluster (max 0 withdraws its capacity).",
        (
            _NAME,
            arg("--group", required=True, help="Worker group, e.g. gpu."),
            arg("--min-workers", type=int, help="Nodes the group never shrinks below."),
            arg("--max-workers", type=int, help="Nodes the group never grows above (0: none may run)."),
        ),
    ),
    ("registry", "list"): Command(
        _registry_list, "Models, or the versions of one model with aliases and metrics.",
        (_ROOT, arg("name", nargs="?", help="Model name (omit to list models).")),
    ),
    ("registry", "show"): Command(_registry_show, "Everything recorded for a version: files, hashes, lineage.", (_ROOT, _REF)),
    ("registry", "diff"): Command(
        _registry_diff, "Differences between two versions: metrics, spec, lineage, files.",
        (_ROOT, arg("name", help="Model name."), arg("a", help="Version, alias or `latest`."), arg("b", help="Version, alias or `latest`.")),
    ),
    ("registry", "alias"): Command(
        _registry_alias, "Point an alias at a version.",
        (_ROOT, arg("name", help="Model name."), arg("alias", help="Alias, e.g. canary."), arg("version", type=int, help="Version number."), _REASON),
    ),
    ("registry", "promote"): Command(
        _registry_promote, "Move the target alias to the source alias's version (canary -> production).",
        (_ROOT, arg("name", help="Model name."), arg("--from", dest="source", default="canary", help="Source alias (default canary)."),
         arg("--to", dest="target", default="production", help="Target alias (default production)."), _REASON),
    ),
    ("registry", "rollback"): Command(
        _registry_rollback, "Move an alias back to its previous target.",
        (_ROOT, arg("name", help="Model name."), arg("alias", help="Alias to roll back."), _REASON),
    ),
    ("registry", "history"): Command(
        _registry_history, "Every alias move: when, who, from, to, why.",
        (_ROOT, arg("name", help="Model name."), arg("alias", nargs="?", help="Only this alias.")),
    ),
    ("registry", "migrate"): Command(
        _registry_migrate,
        "Import a registry from before the metadata store (each model's index.json) into it; run once.",
        (_ROOT,),
    ),
    ("residency", "show"): Command(_residency_show, "The residency policy the running cluster enforces.", (_NAME,)),
    ("residency", "check"): Command(
        _residency_check,
        "Preflight a TrainSpec under the cluster's residency policy: classification, placement, capacity, storage.",
        (_TRAIN_CONFIG, _NAME),
    ),
    ("residency", "audit"): Command(
        _residency_audit, "The cluster's residency audit trail: print it, --verify its hash chain, or --path.",
        (_NAME, arg("--verify", action="store_true", help="Check the hash chain; exit 1 naming the first bad record."),
         arg("--path", action="store_true", help="Print the audit file's path.")),
    ),
    ("residency", "apply"): Command(
        _residency_apply,
        "Change the running cluster's policy; refused while running jobs work under a rule it changes.",
        (_NAME, arg("--policy", required=True, help="Policy YAML, e.g. cluster_configs/residency/uae.yaml.")),
    ),
    ("residency", "sweep"): Command(
        _residency_sweep,
        "Every actor and task (Ray's own included) checked, from Ray's state API, against its job's classification.",
        (_NAME, arg("--job", help="Only this job id (hex, as `ray list jobs` shows)."),
         arg("--json", action="store_true", help="Machine-readable output.")),
    ),
    ("residency", "report"): Command(
        _residency_report,
        "Where each job ran (audit trail) and each model version was trained and is stored (registry).",
        (_NAME, _ROOT, arg("--job", help="Only this job id."),
         arg("--model", metavar="REF", help="Only this version: NAME, NAME@VERSION or NAME@ALIAS."),
         arg("--json", action="store_true", help="Machine-readable output.")),
    ),
    ("cost", "report"): Command(
        _cost_report,
        "What jobs cost, from the cost ledger: by job, trial, deployment, region or market, with work lost to preemption.",
        (arg("--cluster", default=None, help="Only this cluster's costs (default: every cluster in the ledger)."),
         arg("--job", help="Only this job id."),
         arg("--by", choices=["job", "trial", "deployment", "region", "market"], default="job",
             help="Group rows by this (default job)."),
         arg("--refresh", action="store_true", help="First meter the running cluster's jobs again from Ray's records "
             "(jobs whose driver stopped before its last metering pass, Serve deployments)."),
         arg("--json", action="store_true", help="Machine-readable output.")),
    ),
    ("cost", "catalog"): Command(
        _cost_catalog, "Print a price catalog: node-hour prices per region, node group and market; off-peak window.",
        (arg("--config", metavar="FILE", help="Price catalog YAML (default $MLPLATFORM_PRICE_CATALOG), e.g. "
             "cluster_configs/prices/example.yaml."),),
    ),
    ("keys", "rotate"): Command(
        _keys_rotate,
        "Rotate the cluster's artifact key and re-wrap the data keys of encrypted checkpoints/artifacts under PATHS.",
        (_NAME, arg("paths", nargs="*", metavar="PATH", help="Directories of encrypted files to re-wrap, e.g. "
                    "a run's storage_path; files elsewhere keep opening through the retired key."),
         arg("--registry-root", action="append", default=[], metavar="ROOT",
             help="A registry whose encrypted versions to re-wrap too (repeatable).")),
    ),
    ("registry", "verify"): Command(
        _registry_verify, "Check a version's files against its manifest hashes; exit 1 if any differ.", (_ROOT, _REF)
    ),
    ("export",): Command(
        _export,
        "Export a registered model to ONNX FP32 + INT8, gate and benchmark it, register the result (exit 1 if a gate fails).",
        (
            arg("--model", required=True, metavar="REF", help="Registry ref: NAME, NAME@VERSION or NAME@ALIAS."),
            arg("--quantize", choices=["int8", "none"], help="Override the spec's `quantize`."),
            arg("--config", metavar="PATH", help="ExportSpec YAML, e.g. jobs/configs/export-digits.yaml."),
            arg("--threads", type=int, help="Threads for the CPU benchmark (torch and ORT alike)."),
            arg("--classification", help="Keep or raise the source version's classification (never lower it)."),
            arg("--student", action="append", default=[], metavar="REF",
                help="A compressed student of --model (registered by jobs/compress.py) to export too; repeatable."),
            _ROOT,
        ),
    ),
    ("compress",): Command(
        _compress,
        "Prune and distill a registered classifier in a Ray task inside its regions, gate each result against it and "
        "register those that pass as <model>-pruned / <model>-distilled (exit 1 if a gate fails). Needs a running "
        "cluster: eval \"$(mlplatform cluster env)\" first.",
        (
            arg("--model", required=True, metavar="REF", help="Teacher registry ref: NAME, NAME@VERSION or NAME@ALIAS."),
            arg("--config", metavar="PATH", help="CompressSpec YAML, e.g. jobs/configs/compress-digits.yaml."),
            _ROOT,
        ),
    ),
    ("train", "plan"): Command(
        _train_plan, "Print the DeepSpeed plan and per-worker memory for every ZeRO stage; starts nothing.", (_TRAIN_CONFIG,)
    ),
    ("tune", "plan"): Command(
        _tune_plan, "Check a TuneSpec against the running cluster and print trials, placement and a cost forecast; "
        "starts nothing.",
        (arg("--config", required=True, metavar="PATH", help="TuneSpec YAML, e.g. jobs/configs/tune-digits.yaml."),
         _NAME, arg("--json", action="store_true", help="Machine-readable output.")),
    ),
    ("serve", "check"): Command(_serve_check, "Validate a Serve config file's application args.", (_SERVE_FILE,)),
    ("serve", "deploy"): Command(
        _serve_deploy, "Deploy a Serve config file (what `serve deploy` does, with auth).",
        (_SERVE_FILE, _NAME,
         arg("--working-dir", metavar="DIR", help="Upload DIR (e.g. `.`, holding your model module) as every "
             "application's runtime_env working_dir, as `ray job submit --working-dir` does, so replicas import "
             "`mymod:make_model` from it; applications that set their own working_dir keep it.")),
    ),
    ("serve", "status"): Command(_serve_status, "Applications, deployments and replicas with their states.", (_NAME,)),
    ("serve", "delete"): Command(_serve_delete, "Delete one Serve application.", (_APP, _NAME)),
    ("serve", "keys", "create"): Command(
        _serve_key_create, "Create an API key for an application; the key is printed once.",
        (_APP, arg("--label", default="", help="What the key is for."),
         arg("--scope", action="append", choices=["predict", "metrics", "admin"],
             help="What the key may call; repeat for several (default predict)."),
         arg("--expires-in", default=None, metavar="WHEN",
             help="Expiry: a duration (90m, 12h, 30d, 2w) or an ISO 8601 time (default: never)."),
         arg("--rate", type=float, default=None, help="Quota: requests per second (default: no quota)."),
         arg("--burst", type=int, default=None, help="Quota: burst size in requests (default: one second's worth)."),
         _KEYS_DIR),
    ),
    ("serve", "keys", "rotate"): Command(
        _serve_key_rotate, "Replace a key by a new one (same scopes and quota); the old one works until the grace ends.",
        (_APP, arg("key_id", help="Key id from `serve keys list`."),
         arg("--grace", default="1h", help="How long the old key keeps working: 0, 90s, 15m, 1h, 1d (default 1h)."),
         _KEYS_DIR),
    ),
    ("serve", "keys", "list"): Command(_serve_key_list, "An application's keys (ids and labels, never secrets).", (_APP, _KEYS_DIR)),
    ("serve", "keys", "revoke"): Command(
        _serve_key_revoke, "Revoke a key; requests with it get 401 from then on.",
        (_APP, arg("key_id", help="Key id from `serve keys list`."), _KEYS_DIR),
    ),
    ("users", "add"): Command(
        _users_add, "Create a user with a role and print their token once (admin).",
        (_USER, _ROLE, _ON),
    ),
    ("users", "grant"): Command(_users_grant, "Set a user's role on a resource, replacing the one held there (admin).",
                                (_USER, _ROLE, _ON)),
    ("users", "remove"): Command(_users_remove, "Delete a user and every token they hold (admin).", (_USER,)),
    ("users", "list"): Command(_users_list, "Users, their roles and how many tokens each holds (never the tokens)."),
    ("users", "audit"): Command(
        _users_audit, "Access decisions made off any cluster on this machine (on a cluster: `residency audit`).",
        (arg("--verify", action="store_true", help="Check the hash chain; exit 1 naming the first bad record."),),
    ),
    ("users", "whoami"): Command(_users_whoami, "The user this shell acts as, with its roles and where its token came from."),
    ("validate",): Command(
        _validate,
        "Validate spec YAML files against their models; every problem is listed.",
        (
            arg("paths", nargs="+", metavar="PATH", help="Spec files."),
            arg("--kind", help="Spec kind when it cannot be told from the path."),
        ),
    ),
}

GROUP_HELP = {
    "cluster": "Ray clusters: up, down, status, env, token, certs, render.",
    "cluster certs": "The cluster's TLS certificates: renew.",
    "registry": "Model registry: list, show, diff, alias, promote, rollback, history, migrate, verify.",
    "residency": "Data residency: show the cluster's policy, check a spec against it, sweep where work ran, audit trail, report.",
    "cost": "Cost: report what jobs cost from the ledger, show a price catalog.",
    "keys": "The cluster's artifact encryption key: rotate (re-wraps data keys, never re-encrypts data).",
    "users": "Users and roles: add, grant, remove, list, whoami (tokens from MLPLATFORM_TOKEN or MLPLATFORM_TOKEN_FILE).",
    "train": "Training: plan (what would run, memory per ZeRO stage).",
    "tune": "Hyperparameter search: plan (trials, placement, cost forecast) before `jobs/tune.py` runs it.",
    "serve": "Serving on Ray Serve: check, deploy, status, delete, keys.",
    "serve keys": "API keys of a Serve application: create, list, rotate, revoke.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlplatform", description="Ray-based ML platform: train, tune, serve, within residency rules.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    # One subparsers object per command-path prefix: () is the top level, ("serve",) the
    # verbs under `serve`, ("serve", "keys") those under `serve keys`.
    levels: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    for path, command in COMMANDS.items():
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in levels:
                text = GROUP_HELP[" ".join(prefix)]
                group = levels[prefix[:-1]].add_parser(prefix[-1], help=text, description=text)
                levels[prefix] = group.add_subparsers(dest=f"verb{depth}", metavar="VERB", required=True)
        sub = levels[path[:-1]].add_parser(path[-1], help=command.help, description=command.help)
        for flags, kwargs in command.args:
            sub.add_argument(*flags, **kwargs)
        sub.set_defaults(handler=command.handler)
    return parser


def _cwd_importable() -> None:
    """Put the current directory first on sys.path, as `python -m` and `ray job submit --working-dir .`
    do, so a spec's `model: {ref: mymod:make_model}` finds ./mymod.py (the console script alone would
    put only its own bin/ directory there)."""
    import os

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mlplatform` console script."""
    args = build_parser().parse_args(argv)
    from mlplatform.errors import PlatformError

    _cwd_importable()

    try:
        return args.handler(args) or 0
    except PlatformError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence for a CLI
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
