"""The one place that builds a session's parts: the runtime's own (the mirror, the lease keeper,
the scheduler, pairing, backups, restores, the send gateway, the metrics), then the chatbot, its
outbox, the state journal and the webhooks around it, started and stopped in a fixed order. The
daemon, the tests and the benchmarks build a session the same way."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler

from bot.connection import events
from bot.session.backups import Backups, SessionView
from bot.messages.rules import Rules
from bot.process.config import Config
from bot.connection.gateway import SendGateway
from bot.session.lease import LeaseKeeper
from bot.messages.chatbot import Chatbot
from bot.metrics import Metrics
from bot.session.mirror import Mirror
from bot.messages.outbox import Channel, Outbox
from bot.connection.pairing import Pairing
from bot.process.retry import RetrySchedule
from bot.process.ticker import Ticker
from bot.session.restores import Restores
from bot.runtime import RECONNECT, Runtime, RuntimeParts, Timing, Waiter
from bot.messages.webhooks import Dispatcher, StateJournal
from database import Database


def default_owner_id() -> str:
    """Who holds a lease, for humans: host, deployment (on Railway) and process."""
    deployment = os.environ.get("RAILWAY_DEPLOYMENT_ID", "-")[:12]
    return f"{socket.gethostname()}/{deployment}/{os.getpid()}"


@dataclass(frozen=True)
class Timers:
    """The periodic machinery the sessions of one process share (one scheduler, one ticker)."""

    scheduler: BackgroundScheduler
    ticker: Ticker

    @classmethod
    def new(cls) -> Timers:
        scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        return cls(scheduler, Ticker())

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.ticker.stop()


def build_runtime(
    config: Config,
    db: Database,
    client_factory: events.ClientFactory,
    *,
    backoff: RetrySchedule = RECONNECT,
    timing: Timing | None = None,
    wait: Waiter | None = None,
    jitter: Callable[[], float] | None = None,
    owner_id: str | None = None,
    metrics: Metrics | None = None,
    timers: Timers | None = None,
    leases_kept_by_host: bool = False,
) -> Runtime:
    """One session's runtime with its parts; nothing runs before ``start()``. ``timers``: shared
    with other sessions (started and stopped by their owner); without, the runtime has its own.
    ``leases_kept_by_host``: its lease is renewed with the host's others (``bot.host``), and never
    retried: the host decides which sessions it takes."""
    timing = timing or Timing()

    def parts(runtime: Runtime) -> RuntimeParts:
        return _runtime_parts(runtime, metrics or Metrics(), timing, timers, leases_kept_by_host)

    return Runtime(
        config,
        db,
        client_factory,
        parts,
        owner_id=owner_id or default_owner_id(),
        backoff=backoff,
        timing=timing,
        wait=wait,
        jitter=jitter,
    )


def _runtime_parts(
    runtime: Runtime, metrics: Metrics, timing: Timing, shared: Timers | None, leases_kept_by_host: bool
) -> RuntimeParts:
    """The parts call back into the runtime (its fence, its state, its lease): through functions
    read when called, so that none depends on the order they are built in."""
    config, db = runtime.config, runtime.db
    mirror = Mirror(
        db,
        config.session_id,
        config.store_path,
        fence=lambda: runtime.fence,
        on_fenced=lambda exc, fence: runtime._lease.lose(str(exc), fence),
        poll_wait_seconds=timing.mirror_poll_seconds,
        on_batch=metrics.session(config.session_id).mirrored,
    )
    lease = LeaseKeeper(
        db,
        config.session_id,
        runtime.owner_id,
        ttl_seconds=config.lease_ttl_seconds,
        renew_seconds=config.lease_renew_seconds,
        poll_seconds=timing.standby_poll_seconds,
        on_acquired=runtime._take_over,
        on_lost=runtime._demote,
        on_standby=runtime._enter_standby,
        own_thread=not leases_kept_by_host,
    )
    timers = shared or Timers.new()
    pairing = Pairing(config.session_id, config.pair_phone, runtime._set)
    backups = Backups(
        db,
        config.session_id,
        mirror,
        SessionView(
            fence=lambda: runtime.fence,
            state=lambda: runtime.state,
            status=lambda: runtime._status,
            update=runtime._set,
            lose=lease.lose,
        ),
    )
    restores = Restores(
        db, config.session_id, config.store_path, mirror, backups.lock, lambda: runtime.fence, lease.lose
    )
    metrics.watch(runtime.status, db, config.session_id)
    gateway = SendGateway(runtime._live_client, runtime._round_client, runtime._not_connected, runtime._stopping)
    return RuntimeParts(
        metrics,
        mirror,
        lease,
        timers.scheduler,
        pairing,
        backups,
        restores,
        gateway,
        timers.ticker,
        owns_timers=shared is None,
    )


@dataclass(frozen=True)
class Services:
    """A session: the runtime and what is built around it."""

    runtime: Runtime
    outbox: Outbox
    chatbot: Chatbot
    journal: StateJournal
    webhooks: list[Dispatcher] = field(default_factory=list)

    def start(self) -> None:
        for dispatcher in self.webhooks:  # first: they deliver every event from this start on
            dispatcher.start()
        self.outbox.start()
        self.chatbot.start()
        self.journal.start()
        self.runtime.start()

    def stop(self) -> None:
        """Stop receiving, log what was received (replies wait in the outbox for the next owner),
        then the final backup and the lease release."""
        self.runtime.stop_receiving()
        self.chatbot.stop()
        self.outbox.stop()
        self.runtime.stop()
        self.journal.stop()
        for dispatcher in self.webhooks:  # what is not delivered yet, the next owner delivers
            dispatcher.stop()


def build_services(
    config: Config,
    db: Database,
    client_factory: events.ClientFactory,
    rules: Rules,
    *,
    webhook_options: dict[str, object] | None = None,
    **runtime_options: object,
) -> Services:
    """``webhook_options``: the dispatchers' retry delays and timeouts (tests shorten them);
    ``runtime_options``: those of ``build_runtime``."""
    webhook_options = webhook_options or {}
    runtime = build_runtime(config, db, client_factory, **runtime_options)  # type: ignore[arg-type]
    outbox = Outbox(
        db,
        config.session_id,
        Channel(
            runtime.gateway.send_text,
            runtime.gateway.is_connected,
            runtime.gateway.show_typing,
            runtime.gateway.send_file,
        ),
        typing_seconds=rules.typing_seconds,
        metrics=runtime.metrics.session(config.session_id),
    )
    chatbot = Chatbot(
        db,
        config.session_id,
        rules,
        outbox,
        mark_read=runtime.gateway.mark_read,
        handled=runtime.gateway.message_handled,
        metrics=runtime.metrics.session(config.session_id),
    )
    runtime.message_handlers.append(chatbot.submit)
    runtime.connected_listeners.append(outbox.notify)
    runtime.receipt_handlers.append(outbox.on_receipt)
    runtime.take_over_listeners.append(outbox.settle_interrupted)
    journal = StateJournal(db, config.session_id, runtime.status)
    runtime.state_listeners.append(journal.on_state)
    webhooks = [
        Dispatcher(
            db,
            config.session_id,
            url,
            config.webhook_secret or "",
            event_types=config.webhook_events,
            owns_session=lambda: runtime.fence is not None,
            **webhook_options,  # type: ignore[arg-type]
        )
        for url in config.webhook_urls
    ]
    if webhooks:
        runtime.metrics.watch_webhooks(config.session_id, lambda: [d.status for d in webhooks])
    return Services(runtime, outbox, chatbot, journal, webhooks)
