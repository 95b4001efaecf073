"""Wiring of one session's services: the runtime, the chatbot and its outbox, started and
stopped in a fixed order. The daemon and the tests build them the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.connection import events
from bot.messages.rules import Rules
from bot.process.config import Config
from bot.messages.chatbot import Chatbot
from bot.messages.outbox import Channel, Outbox
from bot.runtime import Runtime
from bot.messages.webhooks import Dispatcher, StateJournal
from database import Database


@dataclass
class Services:
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
    """``webhook_options``: the dispatchers' retry delays and timeouts (tests shorten them)."""
    webhook_options = webhook_options or {}
    runtime = Runtime(config, db, client_factory, **runtime_options)  # type: ignore[arg-type]
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
        metrics=runtime.metrics,
    )
    chatbot = Chatbot(
        db,
        config.session_id,
        rules,
        outbox,
        mark_read=runtime.gateway.mark_read,
        handled=runtime.gateway.message_handled,
        metrics=runtime.metrics,
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
        runtime.metrics.watch_webhooks(lambda: [d.status for d in webhooks])
    return Services(runtime, outbox, chatbot, journal, webhooks)
