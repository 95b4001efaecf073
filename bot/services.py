"""Wiring of one session's services: the runtime, the chatbot and its outbox, started and
stopped in a fixed order. The daemon and the tests build them the same way."""

from __future__ import annotations

from dataclasses import dataclass

from bot import events
from bot.chatbot import Rules
from bot.config import Config
from bot.messaging import Chatbot
from bot.outbox import Channel, Outbox
from bot.runtime import Runtime
from database import Database


@dataclass
class Services:
    runtime: Runtime
    outbox: Outbox
    chatbot: Chatbot

    def start(self) -> None:
        self.outbox.start()
        self.chatbot.start()
        self.runtime.start()

    def stop(self) -> None:
        """Stop receiving, log what was received (replies wait in the outbox for the next owner),
        then the final backup and the lease release."""
        self.runtime.stop_receiving()
        self.chatbot.stop()
        self.outbox.stop()
        self.runtime.stop()


def build_services(
    config: Config, db: Database, client_factory: events.ClientFactory, rules: Rules, **runtime_options: object
) -> Services:
    runtime = Runtime(config, db, client_factory, **runtime_options)  # type: ignore[arg-type]
    outbox = Outbox(
        db,
        config.session_id,
        Channel(runtime.gateway.send_text, runtime.gateway.is_connected, runtime.gateway.show_typing),
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
    return Services(runtime, outbox, chatbot)
