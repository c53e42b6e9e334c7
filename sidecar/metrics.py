"""Prometheus metrics on a private registry, with bounded label values."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sidecar import __version__

# Method labels are learned from calls the portal accepted; past this many, new names share one.
MAX_METHOD_LABELS = 300
OTHER = "other"
UNKNOWN = "unknown"
INVALID = "invalid"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The sidecar's named metrics; one instance per application, never global."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bitrix_sidecar_requests", "Proxied calls by REST method and final HTTP status.",
            ["method", "code"], registry=r)
        self.request_duration = Histogram(
            "bitrix_sidecar_request_duration_seconds",
            "Whole proxied call as the client saw it.", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "bitrix_sidecar_upstream_duration_seconds", "Each HTTP request to the portal.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_retries = Counter(
            "bitrix_sidecar_upstream_retries", "Calls repeated, by reason.", ["reason"],
            registry=r)
        self.upstream_errors = Counter(
            "bitrix_sidecar_upstream_errors",
            "Calls the portal did not answer usefully, by kind.", ["kind"], registry=r)
        self.refreshes = Counter(
            "bitrix_sidecar_token_refreshes",
            "Token renewals by trigger (schedule, auth_error, on_demand, startup, cli) and "
            "result (ok, failed, rejected, adopted).", ["trigger", "result"], registry=r)
        self.refresh_duration = Histogram(
            "bitrix_sidecar_token_refresh_duration_seconds",
            "Round trips to the OAuth server's token endpoint.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.expires_at = Gauge(
            "bitrix_sidecar_token_expires_at_seconds",
            "Unix time the held access token expires (0: none held).", registry=r)
        self.last_refresh = Gauge(
            "bitrix_sidecar_token_last_refresh_timestamp_seconds",
            "Unix time the held pair was obtained.", registry=r)
        self.refresh_failing = Gauge(
            "bitrix_sidecar_refresh_failing",
            "1 while renewals fail (a failure episode is open).", registry=r)
        self.refresh_failures = Gauge(
            "bitrix_sidecar_refresh_consecutive_failures",
            "Failed renewal attempts since the last success.", registry=r)
        self.reauthorization_required = Gauge(
            "bitrix_sidecar_reauthorization_required",
            "1 when a person must authorize the app again.", registry=r)
        self.authorized = Gauge(
            "bitrix_sidecar_authorized", "1 while a token pair is held.", registry=r)
        self.inflight = Gauge(
            "bitrix_sidecar_inflight_requests",
            "Requests in progress on the proxy listener (REST calls, /token and /oauth/).",
            registry=r)
        self.queue_depth = Gauge(
            "bitrix_sidecar_queue_depth", "Calls waiting for the portal's rate limit.",
            registry=r)
        self.queue_wait = Histogram(
            "bitrix_sidecar_queue_wait_seconds", "Time calls waited for their turn.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60), registry=r)
        self.batch_size = Histogram(
            "bitrix_sidecar_calls_per_upstream_request",
            "Client calls carried by each upstream request (1 = not coalesced).",
            buckets=(1, 2, 5, 10, 20, 30, 40, 50), registry=r)
        self.queue_rejected = Counter(
            "bitrix_sidecar_queue_rejected",
            "Calls refused because they would wait past SIDECAR_QUEUE_TIMEOUT.", registry=r)
        self.upstream_limited = Counter(
            "bitrix_sidecar_upstream_limited",
            "Portal answers 503 QUERY_LIMIT_EXCEEDED and 429 OPERATION_TIME_LIMIT.", ["error"],
            registry=r)
        self.endpoint_refused = Counter(
            "bitrix_sidecar_endpoint_refused",
            "Token answers and install events naming another portal (scheme, host or port) "
            "than the authorized one, by source (refresh, exchange, install); never followed.",
            ["source"], registry=r)
        self.store_available = Gauge(
            "bitrix_sidecar_store_available",
            "1 while the token store (the SQLite file or the PostgreSQL database) answers; 0 "
            "while it does not: the held token serves, no renewal without its lock.",
            registry=r)
        self.store_available.set(1)
        self.store_errors = Counter(
            "bitrix_sidecar_store_errors", "Token store reads or writes that failed.",
            registry=r)
        self.alerts = Counter(
            "bitrix_sidecar_alerts", "Alert webhook deliveries by event and result.",
            ["event", "result"], registry=r)
        self.connections_open = Gauge(
            "bitrix_sidecar_open_connections", "Client connections open, by listener.",
            ["listener"], registry=r)
        self.connections_refused = Counter(
            "bitrix_sidecar_connections_refused",
            "Connections closed at once because the listener had SIDECAR_MAX_CONNECTIONS open.",
            ["listener"], registry=r)
        self.request_timeouts = Counter(
            "bitrix_sidecar_request_timeouts",
            "Requests answered 408 (or cut) for not arriving whole within "
            "SIDECAR_REQUEST_TIMEOUT, by listener.", ["listener"], registry=r)
        self.portal_events = Counter(
            "bitrix_sidecar_portal_events",
            "Marketplace mode: portals added (installed), removed (uninstalled) and moved (a "
            "token answer named a new allowed address).", ["event"], registry=r)
        self.install_checks_refused = Counter(
            "bitrix_sidecar_install_checks_refused",
            "Install payloads refused 503 because too many were being checked (app.info) "
            "at once.", registry=r)
        self.shared_budget_available = Gauge(
            "bitrix_sidecar_shared_budget_available",
            "1 while the fleet's shared rate budget (PostgreSQL) is reachable; 0 while this "
            "sidecar falls back to its local share (always 1 with SQLite).", registry=r)
        self.shared_budget_available.set(1)
        self.fleet_replicas = Gauge(
            "bitrix_sidecar_fleet_replicas",
            "Sidecars seen on the shared database in the last 30 s (1 with SQLite).", registry=r)
        self.fleet_replicas.set(1)
        info = Gauge("bitrix_sidecar_build_info", "Version of the running sidecar.",
                     ["version"], registry=r)
        info.labels(version=__version__).set(1)
        self._methods: set[str] = set()
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def method_label(self, method: str, *, known: bool) -> str:
        """Map a REST method name to a bounded label value.

        A name becomes a label of its own only once the portal has accepted it (``known``), and
        only up to MAX_METHOD_LABELS names: made-up names cannot create series.
        """
        if not method:
            return INVALID
        name = method.lower()
        if name in self._methods:
            return name
        if not known:
            return UNKNOWN
        if len(self._methods) >= MAX_METHOD_LABELS:
            return OTHER
        self._methods.add(name)
        return name

    def observe_request(self, method: str, code: int, seconds: float) -> None:
        """Count one proxied call and its duration."""
        key = (method, code)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(method=method, code=str(code)),
                self.request_duration.labels(method=method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """Return the registry in Prometheus text format."""
        return generate_latest(self.registry)
