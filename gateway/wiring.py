"""The service graph: which services a daemon runs, each built with what it uses.

Every collaborator is a typed constructor argument, so the graph is read here, top to
bottom, and checked by mypy (``make test`` runs it on this module): nothing is looked up
by name, reached through the daemon or patched in after construction. Where a service
needs only part of another it names a small port, declared next to the service that uses
it: the HTTP API's :class:`gateway.http.routes.JobIntake` and
:class:`gateway.http.routes.HealthView`, the health reporter's
:class:`gateway.health.HealthProbes`, the alarms' :class:`gateway.alarms.service.JobSink`.

Order of construction is the order of dependence:

1. the ack signer (``[http]``): the pipeline puts its URLs in every payload;
2. the upstream outbox (``[upstream]``): one object for the pipeline, which queues into
   it in its own transactions, and the link, whose drain it wakes;
3. the pipeline, then the link, then the alarms (their MQTT routes come after the
   pipeline's, so a rule never takes ``P/jobs`` or device acks away);
4. the health reporter, probing the client, the embedded broker, the pipeline's bridges
   and the link;
5. the HTTP API, woken by the pipeline's commit pulse.

The daemon (:mod:`gateway.daemon`) owns only the lifecycle: it starts the broker and its
client, calls :func:`build`, then runs the services in the returned order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.alarms.service import AlarmService
from gateway.broker.embedded import EmbeddedBroker
from gateway.config import Config, Secrets
from gateway.health import BoundPorts, HealthProbes, HealthReporter
from gateway.mqtt import GatewayClient
from gateway.pipeline.service import Pipeline
from gateway.service import Listening, Service
from gateway.storage import Database

if TYPE_CHECKING:  # aiohttp and the HTTP modules load only with [http]
    from gateway.http.acks import AckSigner

ReloadCallback = Callable[[Config], Awaitable[None] | None]


@dataclass(frozen=True)
class Runtime:
    """What exists before the services: the daemon's start time, the secrets the config's
    files hold (read with it: the cloud link's password, each push platform's keys), the
    gateway's own client of the broker and the embedded broker (None in external mode)."""

    started_at: str
    secrets: Secrets
    client: GatewayClient
    broker: EmbeddedBroker | None = None


@dataclass
class Graph:
    """The built services, in start order, what SIGHUP must call (name, callback), and what
    must run once every service has started and before READY=1 (runtime.json's ports)."""

    services: list[Service]
    reload_callbacks: list[tuple[str, ReloadCallback]] = field(default_factory=list)
    before_ready: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


Build = Callable[[Config, Database, Runtime], Graph]


def build(cfg: Config, db: Database, runtime: Runtime) -> Graph:
    """The default graph: pipeline (and with ``[upstream]`` the cloud link), alarms, health
    reporter and, with ``[http]``, the HTTP API."""
    signing: tuple[AckSigner, str | None] | None = None
    ack_url: Callable[[str], str] | None = None
    if cfg.http is not None:
        from gateway.http.acks import load_signer

        signing = load_signer(cfg)
        ack_url = signing[0].url  # every payload carries its signed ack URL (contract §8)

    services: list[Service] = []
    link = None
    if cfg.upstream is None:
        pipeline = Pipeline(cfg, db, ack_url=ack_url, secrets=runtime.secrets)
        services.append(pipeline)
    else:
        from gateway.upstream.link import UpstreamLink
        from gateway.upstream.outbox import Outbox

        # Status changes and acks are queued for the cloud in the pipeline's own
        # transactions, into the outbox the link drains (its listeners wake the drain).
        outbox = Outbox.for_upstream(cfg.upstream)
        pipeline = Pipeline(cfg, db, forward=outbox, ack_url=ack_url, secrets=runtime.secrets)
        link = UpstreamLink(cfg, db, pipeline, outbox, secrets=runtime.secrets.upstream)
        services += [pipeline, link]
    alarms = AlarmService(cfg, db, pipeline)
    services.append(alarms)

    listening: list[Listening] = []  # the HTTP API, once built below

    def bound_ports() -> BoundPorts:
        return BoundPorts(broker=runtime.broker.bound_ports() if runtime.broker is not None else {},
                          http=listening[0].bound_port if listening else None)

    reporter = HealthReporter(cfg, db, HealthProbes(client=runtime.client, started_at=runtime.started_at,
                                                    broker=runtime.broker, bridges=pipeline, upstream=link,
                                                    ports=bound_ports,
                                                    presence=runtime.broker.presence if runtime.broker else None,
                                                    upstream_set_aside=link.client.set_aside if link else None))
    services.append(reporter)
    graph = Graph(services, before_ready=[reporter.publish])  # the bound ports are in runtime.json at READY=1
    if signing is not None:
        from gateway.http import HttpService
        from gateway.http.pulse import Pulse
        from gateway.people.service import PeopleWriter

        signer, signer_error = signing
        changes = Pulse()
        pipeline.on_commit(changes.fire)  # event streams and the operator page re-read on commits
        http = HttpService(cfg, db, jobs=pipeline, health=reporter, signer=signer, changes=changes,
                           started_at=runtime.started_at, alarms=alarms, people=PeopleWriter(db),
                           signer_error=signer_error)
        services.append(http)
        listening.append(http)
        graph.reload_callbacks.append(("http credential cache", http.auth.invalidate))  # SIGHUP: forget logins
    return graph


__all__ = ["Build", "Graph", "ReloadCallback", "Runtime", "build"]
