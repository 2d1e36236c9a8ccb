"""Price catalog: what a node-hour costs per (region, node group, market), and the off-peak window.

The operator writes one catalog per cluster (cluster_configs/prices/*.yaml, named by the cluster
spec's `price_catalog`); `cluster up` checks that it prices every node group and publishes it into
the cluster's GCS key-value store (namespace `mlplatform`, key `price_catalog`), where `current()`
finds it for every job on the cluster.

Who pays for what (the rule the ledger and every report follow):
    An actor or task holding resources on a node pays for the node's share it holds:
        share = max(held CPU / node CPU, held GPU / node GPU)
    (a resource the node lacks, or holds zero of, is ignored; the share is capped at 1.0), so a
    one-GPU task on a 4-GPU, 32-CPU node pays a quarter of it, whatever CPUs it takes. Its cost is
        cost = share × per_hour × seconds / 3600
    at the price of the node's (region, node group, market), times the off-peak `price_factor`
    when the price is asked for at a time inside the off-peak window. Idle capacity is paid by
    nobody: the ledger records what work held, not what the cluster burned.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mlplatform import config
from mlplatform.config import Spec
from mlplatform.errors import CostError, SpecError

CATALOG_ENV = "MLPLATFORM_PRICE_CATALOG"
KV_KEY = "price_catalog"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class Price(Spec):
    """What one node-hour of a node group costs in one region and market."""

    region: str = Field(description="Cloud region, as the cluster spec names it (e.g. me-central-1).")
    node_group: str = Field(description="Node group name, as in the cluster spec (the head group is the head's `name`).")
    market: Literal["spot", "on-demand"] = Field(description="`spot` or `on-demand`, as the node group's `market`.")
    per_hour: float = Field(gt=0, description="Price of one node of this group for one hour, in the catalog's currency.")
    preemption_rate_per_hour: float = Field(
        0.0, ge=0, le=1,
        description="Spot only: the chance a node is preempted within an hour (0..1); 0 for on-demand.",
    )
    instance_type: str | None = Field(
        None, description="Informational: the instance type the price is for (e.g. g5.xlarge)."
    )

    @field_validator("node_group")
    @classmethod
    def _group(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be a node group name: a lowercase letter, then a-z, 0-9 and '-' (max 40)")
        return v

    @model_validator(mode="after")
    def _spot_only(self) -> "Price":
        if self.market == "on-demand" and self.preemption_rate_per_hour:
            raise ValueError(
                f"preemption_rate_per_hour is {self.preemption_rate_per_hour} for on-demand node group "
                f"`{self.node_group}`; on-demand nodes are not preempted: remove it or set market: spot"
            )
        return self


class OffPeak(Spec):
    """A daily window of cheaper hours, in local time; it may wrap midnight (22:00 to 06:00)."""

    timezone: str = Field("Asia/Dubai", description="IANA time zone the window is written in, e.g. Asia/Dubai.")
    start: str = Field(description="Start of the window, HH:MM local time (inclusive).")
    end: str = Field(description="End of the window, HH:MM local time (exclusive); before `start` wraps midnight.")
    price_factor: float = Field(
        gt=0, le=1, description="Multiplier on `per_hour` inside the window (0 < f <= 1), e.g. 0.6."
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not an IANA time zone; use a name such as Asia/Dubai, Europe/Berlin or UTC") from None
        return v

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError("must be a 24-hour local time HH:MM, e.g. 22:00")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> "OffPeak":
        if self.start == self.end:
            raise ValueError(f"start and end are both {self.start}; the window would be empty: make them differ")
        return self

    def zone(self) -> dt.tzinfo:
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.timezone)

    def contains(self, at: dt.datetime) -> bool:
        """Whether `at` (naive: UTC) falls inside the window."""
        now = _clock(_aware(at).astimezone(self.zone()))
        start, end = _parse(self.start), _parse(self.end)
        return start <= now < end if start < end else (now >= start or now < end)


class PriceCatalog(Spec):
    """Node-hour prices per (region, node group, market), and an optional off-peak window."""

    name: str = Field(description="Catalog name; errors and reports name it.")
    currency: str = Field("USD", description="ISO 4217 code every price is in, e.g. USD or AED.")
    source: str = Field(description="Where the prices come from, e.g. a cloud's public price pages or a contract.")
    as_of: dt.date = Field(description="Date the prices were taken, YYYY-MM-DD.")
    example: bool = Field(
        False, description="true: illustrative figures, not a quote; reports say so. Set false for real prices."
    )
    prices: list[Price] = Field(min_length=1, description="One entry per (region, node group, market).")
    off_peak: OffPeak | None = Field(None, description="Daily window of cheaper hours; absent: every hour costs the same.")

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if not _CURRENCY.match(v):
            raise ValueError("must be a three-letter ISO 4217 code in capitals, e.g. USD or AED")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "PriceCatalog":
        seen: set[tuple[str, str, str]] = set()
        for i, p in enumerate(self.prices):
            key = (p.region, p.node_group, p.market)
            if key in seen:
                from pydantic import ValidationError
                from pydantic_core import InitErrorDetails, PydanticCustomError

                msg = (f"repeats node group `{p.node_group}` (market {p.market}, region {p.region}); each "
                       "(region, node_group, market) may be priced once: remove or merge the duplicate")
                # Raised as a ValidationError so the message names prices[i] and its line.
                raise ValidationError.from_exception_data(self.__class__.__name__, [InitErrorDetails(
                    type=PydanticCustomError("value_error", "{msg}", {"msg": msg}), loc=("prices", i),
                    input=dict(zip(("region", "node_group", "market"), key)))])
            seen.add(key)
        return self

    def entry(self, region: str, node_group: str, market: Any) -> Price:
        """The catalog entry for a node; raises CostError naming what is missing."""
        market = getattr(market, "value", market)
        for p in self.prices:
            if (p.region, p.node_group, p.market) == (region, node_group, market):
                return p
        priced = sorted(f"{p.market} in {p.region}" for p in self.prices if p.node_group == node_group)
        known = f" (it is priced for: {', '.join(priced)})" if priced else ""
        raise CostError(
            f"no price for node group `{node_group}` (market {market}, region {region}) in catalog "
            f"{self.name}{known}; add an entry under `prices` with region: {region}, node_group: {node_group}, "
            f"market: {market} and per_hour."
        )

    def price(self, region: str, node_group: str, market: Any, at: dt.datetime | None = None) -> float:
        """Price of one node-hour; with `at` inside the off-peak window, times its `price_factor`."""
        per_hour = self.entry(region, node_group, market).per_hour
        if at is not None and self.in_off_peak(at):
            per_hour *= self.off_peak.price_factor  # type: ignore[union-attr]
        return per_hour

    def in_off_peak(self, at: dt.datetime) -> bool:
        """Whether `at` (naive: UTC) falls in the off-peak window (False when there is none)."""
        return self.off_peak is not None and self.off_peak.contains(at)

    def next_off_peak(self, now: dt.datetime) -> dt.datetime:
        """`now` when inside the off-peak window, else the window's next start (in `now`'s time zone;
        naive `now` is UTC and gets a naive UTC answer)."""
        if self.off_peak is None:
            raise CostError(
                f"catalog {self.name} has no off-peak window, so there is nothing to wait for; add `off_peak:` "
                "(timezone, start, end, price_factor) to it, or start now (`start: now`)."
            )
        if self.off_peak.contains(now):
            return now
        zone = self.off_peak.zone()
        local = _aware(now).astimezone(zone)
        start = _parse(self.off_peak.start)
        day = local.date()
        candidate = dt.datetime.combine(day, start, tzinfo=zone)
        if candidate <= local:
            candidate = dt.datetime.combine(day + dt.timedelta(days=1), start, tzinfo=zone)
        if now.tzinfo is None:
            return candidate.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return candidate.astimezone(now.tzinfo)

    def wait_for_off_peak(self, what: str, *, now: dt.datetime | None = None, sleep=None) -> float:
        """Sleep until the off-peak window opens (`start: off-peak`); the seconds waited.

        The job log says when it starts and what the window saves, so the wait is never silent.
        """
        import time

        now = now or dt.datetime.now(dt.timezone.utc)
        starts = self.next_off_peak(now)
        wait_s = max(0.0, (starts - now).total_seconds())
        if wait_s:
            print(f"[mlplatform.cost] {what}: waiting {wait_s:.0f} s for catalog {self.name}'s off-peak window "
                  f"({starts.isoformat(timespec='minutes')}), where node-hours cost {self.off_peak_saving():.0%} less",
                  flush=True)
            (sleep or time.sleep)(wait_s)
        return wait_s

    def off_peak_saving(self, cost: float = 1.0) -> float:
        """What running off-peak saves on work costing `cost` at the normal price: cost × (1 − price_factor).
        With the default cost 1.0 it is the fraction saved (0.4 for a factor of 0.6); 0 without a window."""
        if self.off_peak is None:
            return 0.0
        return cost * (1.0 - self.off_peak.price_factor)

    def check_groups(self, groups: Any) -> None:
        """Raise CostError unless every node group (cluster spec NodeGroups) is priced, naming all missing."""
        missing = []
        for g in groups:
            try:
                self.entry(g.region, g.name, g.market)
            except CostError:
                missing.append(f"`{g.name}` (market {getattr(g.market, 'value', g.market)}, region {g.region})")
        if missing:
            raise CostError(
                f"catalog {self.name} has no price for node group(s) {', '.join(missing)}; add an entry under "
                "`prices` for each (region, node_group, market)."
            )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def share(held: Mapping[str, float], total: Mapping[str, float]) -> float:
    """The fraction of a node a holder pays for: max(held CPU / total CPU, held GPU / total GPU),
    ignoring resources the node lacks (missing or zero total), capped at 1.0."""
    fractions = [float(held.get(r, 0) or 0) / float(total[r]) for r in ("CPU", "GPU") if total.get(r)]
    return min(1.0, max([0.0, *fractions]))


def cost_of(share_: float, per_hour: float, seconds: float) -> float:
    """Cost of holding `share_` of a node priced `per_hour` for `seconds` (the module's rule)."""
    return share_ * per_hour * seconds / 3600.0


def load(path: str | os.PathLike[str]) -> PriceCatalog:
    """Read a price catalog file (SpecError naming every problem)."""
    return config.load(path, PriceCatalog)


def for_cluster_spec(spec: Any, spec_path: str | os.PathLike[str] | None) -> PriceCatalog | None:
    """The catalog a cluster spec names (its path is relative to the spec file), checked to price
    every node group of the cluster; None when the spec names none."""
    if not spec.price_catalog:
        return None
    base = Path(spec_path).parent if spec_path else Path.cwd()
    path = (base / spec.price_catalog).resolve()
    try:
        catalog = load(path)
        catalog.check_groups(spec.groups())
    except (SpecError, CostError) as e:
        raise type(e)(f"price_catalog of cluster {spec.name!r}: {e}") from None
    return catalog


def encode(catalog: PriceCatalog) -> str:
    return json.dumps(catalog.to_json(), sort_keys=True, separators=(",", ":"))


def publish(gcs_address: str, catalog: PriceCatalog) -> None:
    """Put the catalog in the cluster's GCS key-value store (the caller holds the cluster's token)."""
    from ray._raylet import GcsClient

    from mlplatform.residency.names import KV_NAMESPACE

    GcsClient(address=gcs_address).internal_kv_put(KV_KEY.encode(), encode(catalog).encode(), True,
                                                   KV_NAMESPACE.encode())


def current() -> PriceCatalog | None:
    """The catalog of the cluster this process is connected to (its GCS), else the file
    $MLPLATFORM_PRICE_CATALOG names, else None."""
    import ray

    if ray.is_initialized():
        from ray.experimental import internal_kv

        from mlplatform.residency.names import KV_NAMESPACE

        raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        if raw:
            try:
                return PriceCatalog.model_validate(json.loads(raw))
            except ValueError as e:
                raise CostError(
                    f"The cluster's price catalog (GCS key {KV_KEY}) is unreadable ({e}); restart the cluster "
                    "with `mlplatform cluster up` so it is set again."
                ) from None
    path = os.environ.get(CATALOG_ENV)
    if path:
        try:
            return load(path)
        except SpecError as e:
            raise SpecError(f"{CATALOG_ENV}: {e}") from None
    return None


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def _parse(hhmm: str) -> dt.time:
    hours, minutes = hhmm.split(":")
    return dt.time(int(hours), int(minutes))


def _clock(at: dt.datetime) -> dt.time:
    return dt.time(at.hour, at.minute, at.second, at.microsecond)


def _publish_main() -> None:
    """`python -m mlplatform.cost.catalog GCS_ADDRESS < catalog.json`: what `cluster up` runs, in a
    child process holding the cluster's token, so `up` itself keeps no Ray client state."""
    import sys

    publish(sys.argv[1], PriceCatalog.model_validate(json.loads(sys.stdin.read())))


if __name__ == "__main__":
    _publish_main()
