"""Customers' messages through the whole daemon (runtime, chatbot, outbox) with a fake WhatsApp."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.connection import events
from bot.messages.rules import load_rules
from bot.process.config import SHIPPED_REPLIES
from bot.process.errors import SendOutcomeUnknown
from bot.messages.outbox import Channel, Outbox
from bot.session.state import State
from bot.wiring import Services, build_services
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, Calls, make_config

CUSTOMER = "5511912345678@s.whatsapp.net"
RULES = replace(load_rules(SHIPPED_REPLIES), typing_seconds=0.05)
_ids = itertools.count(1)


def incoming(
    text: str,
    *,
    chat: str = CUSTOMER,
    message_id: str | None = None,
    from_me: bool = False,
    is_group: bool = False,
    sent: float | None = None,
    sender: str | None = None,
    chat_phone: str | None = None,
) -> events.IncomingMessage:
    return events.IncomingMessage(
        message_id=message_id or f"WAMSG{next(_ids):08d}",
        chat=chat,
        sender=sender or chat,
        push_name="Ana",
        text=text,
        from_me=from_me,
        is_group=is_group,
        timestamp=int(sent or time.time()),
        chat_phone=chat_phone,
    )


class Daemon:
    """Builds and rebuilds (a "restart") the services over one database and one fake WhatsApp."""

    def __init__(self, db: Database, network: FakeWhatsApp, data_dir: Path) -> None:
        self.db, self.network, self.data_dir = db, network, data_dir
        self.services: Services | None = None

    def start(self) -> Services:
        config = make_config(self.data_dir)
        self.services = build_services(config, self.db, self.network.factory, RULES, timing=FAST)
        self.services.start()
        return self.services

    def stop(self) -> None:
        if self.services is not None:
            self.services.stop()

    def paired(self) -> Services:
        services = self.start()
        wait_until(lambda: services.runtime.state is State.QR, message="qr")
        self.network.current().scan_qr()
        wait_until(lambda: services.runtime.state is State.CONNECTED, message="connected")
        return services

    def deliver(self, message: events.IncomingMessage) -> None:
        self.network.current().emit(message)


@pytest.fixture
def daemon(db: Database, whatsmeow_template: Path, tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(db, FakeWhatsApp(schema_template=whatsmeow_template), tmp_path / "data")
    yield running
    running.stop()


def replies_to(network: FakeWhatsApp, chat: str = CUSTOMER) -> list[str]:
    return [m.text for m in network.sent if m.to == chat]


def processed(daemon: Daemon, *delivered: events.IncomingMessage) -> None:
    """Wait until the chatbot is done with each delivery (logged with its decision, and any reply
    queued with it, in one transaction; then handed back to the client) and the outbox with every
    reply queued (none left queued or being sent; the fake records a send before it is marked sent).
    From then on nothing more goes out for them: asserting that nothing did is not a race."""
    wanted = Counter(m.message_id for m in delivered)  # a redelivery is handed back once more
    wait_until(
        lambda: all(Counter(daemon.network.handled)[i] >= n for i, n in wanted.items()),
        message="the messages logged and handed back",
    )
    wait_until(
        lambda: (
            not any(
                m.direction == "out" and m.status in ("queued", "sending") for m in daemon.db.list_messages("default")
            )
        ),
        message="every reply decided on sent",
    )


def test_a_customer_gets_a_greeting_then_menu_answers(daemon: Daemon) -> None:
    daemon.paired()
    first = incoming("Oi, bom dia!")
    daemon.deliver(first)
    wait_until(lambda: len(replies_to(daemon.network)) == 1, message="greeting")
    daemon.deliver(incoming("2"))
    wait_until(lambda: len(replies_to(daemon.network)) == 2, message="menu answer")

    greeting, address = replies_to(daemon.network)
    assert greeting.startswith("Olá, Ana!") and "Rua das Flores" in address
    assert first.message_id in daemon.network.read  # blue ticks
    assert (CUSTOMER, True) in daemon.network.typing and (CUSTOMER, False) in daemon.network.typing
    expected = [("in", "replied"), ("out", "sent")] * 2
    wait_until(lambda: [(m.direction, m.status) for m in daemon.db.list_messages("default", CUSTOMER)] == expected)
    log = daemon.db.list_messages("default", CUSTOMER)
    assert log[1].message_id == daemon.network.sent[0].message_id and log[1].reason in ("greeting", "after_hours")


def test_a_redelivered_message_is_answered_once_also_after_a_restart(daemon: Daemon) -> None:
    daemon.paired()
    message = incoming("Qual o preço?")
    daemon.deliver(message)
    daemon.deliver(message)  # whatsmeow redelivers
    processed(daemon, message, message)
    assert len(replies_to(daemon.network)) == 1

    daemon.stop()  # a restart (or a restore) of the runtime...
    services = daemon.start()
    wait_until(lambda: services.runtime.state is State.CONNECTED, message="reconnected")
    daemon.deliver(message)  # ...after which whatsmeow delivers it again
    thanks = incoming("obrigado")
    daemon.deliver(thanks)
    processed(daemon, message, message, message, thanks)

    assert len(replies_to(daemon.network)) == 2
    logged = [m for m in daemon.db.list_messages("default") if m.message_id == message.message_id]
    assert len(logged) == 1


def test_messages_queued_while_offline_go_out_in_order_after_reconnecting(daemon: Daemon) -> None:
    services = daemon.paired()
    daemon.network.current().emit(events.Disconnected())
    wait_until(lambda: services.runtime.state is State.RECONNECTING)
    services.outbox.flush = passes = Calls(services.outbox.flush)  # (its thread calls self.flush)
    for n in range(5):
        services.outbox.enqueue(CUSTOMER, f"aviso {n}", reason="api", expires_in=None)
    passes.mark()
    passes.wait(message="an outbox pass over the queued messages")  # one that could have sent them
    assert daemon.network.sent == []

    daemon.network.current().emit(events.Connected())  # whatsmeow reconnected by itself

    wait_until(lambda: len(daemon.network.sent) == 5, message="the backlog")
    assert [m.text for m in daemon.network.sent] == [f"aviso {n}" for n in range(5)]


def test_a_restart_while_offline_loses_no_queued_message(daemon: Daemon) -> None:
    services = daemon.paired()
    daemon.network.connected = False
    daemon.network.current().emit(events.Disconnected())
    wait_until(lambda: services.runtime.state is State.RECONNECTING)
    daemon.deliver(incoming("oi"))  # a reply queued while offline
    wait_until(lambda: [m.status for m in daemon.db.list_messages("default")] == ["replied", "queued"])
    for n in range(3):
        services.outbox.enqueue(CUSTOMER, f"pedido {n} pronto", reason="api", expires_in=None)
    wait_until(lambda: len([m for m in daemon.db.list_messages("default") if m.status == "queued"]) == 4)

    daemon.stop()
    daemon.network.connected = True
    daemon.start()

    wait_until(lambda: len(daemon.network.sent) == 4, message="everything after the restart")
    texts = [m.text for m in daemon.network.sent]
    assert texts[0].startswith("Olá, Ana!") and texts[1:] == [f"pedido {n} pronto" for n in range(3)]
    wait_until(lambda: {m.status for m in daemon.db.list_messages("default") if m.direction == "out"} == {"sent"})


def test_groups_broadcasts_newsletters_and_own_messages_get_no_reply(daemon: Daemon) -> None:
    daemon.paired()
    daemon.deliver(incoming("oi grupo", chat="120363025246125888@g.us", is_group=True))
    daemon.deliver(incoming("status", chat="status@broadcast"))
    daemon.deliver(incoming("news", chat="120363144038483540@newsletter"))
    customer = incoming("oi")
    daemon.deliver(customer)
    wait_until(lambda: len(daemon.network.sent) == 1)
    own = daemon.network.sent[0].message_id
    # The echo of a message comes after its send returned and was recorded (the fake's send returns
    # at once, before the outbox's mark_sent commits: under load the echo could overtake it).
    wait_until(lambda: daemon.db.is_own_message("default", own), message="our reply recorded as sent")
    daemon.deliver(incoming("echo of our reply", message_id=own, from_me=True))
    # Each one, answered or not, is handed back to the client once logged (it may take the next).
    wait_until(lambda: len(daemon.network.handled) == 5, message="every message handed back")
    # A message is marked read after its hand-back (a round trip to WhatsApp): once one more,
    # ignored, message is handed back, whatever the earlier ones were to be marked read has been.
    last = incoming("mais uma", chat="120363025246125888@g.us", is_group=True)
    daemon.deliver(last)
    processed(daemon, last)

    assert len(daemon.network.sent) == 1
    statuses = {m.text: (m.status, m.reason) for m in daemon.db.list_messages("default") if m.direction == "in"}
    assert statuses["oi grupo"] == ("ignored", "group")
    assert statuses["status"] == ("ignored", "broadcast")
    assert statuses["news"] == ("ignored", "newsletter")
    assert daemon.network.read == [customer.message_id]  # ignored chats are not even marked read
    assert "echo of our reply" not in {m.text for m in daemon.db.list_messages("default")}
    logged = {m.message_id for m in daemon.db.list_messages("default") if m.direction == "in"}
    assert set(daemon.network.handled) == logged | {own}


def test_an_operator_answering_from_the_phone_pauses_the_bot_in_that_chat(daemon: Daemon) -> None:
    daemon.paired()
    daemon.deliver(incoming("oi"))
    wait_until(lambda: len(replies_to(daemon.network)) == 1)
    operator = incoming("Oi Ana, aqui é a Maria!", from_me=True)  # typed on the phone
    customer = incoming("oi Maria, quero um bolo")
    daemon.deliver(operator)
    daemon.deliver(customer)
    processed(daemon, operator, customer)
    assert len(replies_to(daemon.network)) == 1  # the bot stays quiet while a person talks
    log = daemon.db.list_messages("default", CUSTOMER)
    assert [(m.direction, m.status, m.reason) for m in log][-2:] == [
        ("out", "sent", "operator"),
        ("in", "paused", "paused"),
    ]


def test_a_failing_send_is_retried_then_given_up(daemon: Daemon) -> None:
    services = daemon.paired()
    daemon.network.send_failures.extend(["websocket not connected"] * 10)
    message_id = services.outbox.enqueue(CUSTOMER, "olá", reason="api", expires_in=None)

    def row() -> object:
        return next(m for m in daemon.db.list_messages("default") if m.id == message_id)

    # The fake fails the send first; the outbox records the failure right after: wait for the record.
    wait_until(lambda: row().last_error is not None, message="the failed attempt recorded")
    assert (row().status, row().attempts, row().last_error) == ("queued", 1, "websocket not connected")
    assert daemon.network.send_failures.count("websocket not connected") == 9  # one attempt, the retry waits


def test_messages_delivered_long_after_they_were_sent_get_no_automatic_reply(daemon: Daemon) -> None:
    daemon.paired()
    late = incoming("oi, tem bolo?", sent=time.time() - 3 * 3600)  # sent during a 3-hour outage
    greeted = incoming("oi")
    daemon.deliver(late)
    daemon.deliver(greeted)
    processed(daemon, late, greeted)
    assert len(daemon.network.sent) == 1
    stale = next(m for m in daemon.db.list_messages("default") if m.text == "oi, tem bolo?")
    assert (stale.status, stale.reason) == ("ignored", "stale")


def test_a_message_received_while_the_database_is_away_is_answered_when_it_is_back(
    whatsmeow_template: Path, tmp_path: Path
) -> None:
    from database import PostgresDatabase
    from tests.pg_cluster import PostgresCluster

    cluster = PostgresCluster().start()
    db = PostgresDatabase(cluster.create_database(), connect_timeout=1, wait_timeout=1)
    db.open()
    daemon = Daemon(db, FakeWhatsApp(schema_template=whatsmeow_template), tmp_path / "data")
    try:
        daemon.paired()
        cluster.stop_server()
        daemon.deliver(incoming("oi"))
        others = [f"55119000000{n:02d}@s.whatsapp.net" for n in range(20)]
        for chat in others:  # more than the client process lets be unlogged
            daemon.deliver(incoming("bom dia", chat=chat))
        # Handed back to the client, each of them: holding whatsmeow through an outage would stall it
        wait_until(lambda: len(set(daemon.network.handled)) == 21, message="all handed back during the outage")
        assert daemon.network.sent == []  # nowhere to record them yet: kept in memory, not dropped

        cluster.start_server()

        wait_until(lambda: len(daemon.network.sent) == 21, timeout=60, message="the replies after the outage")
        first = next(sent for sent in daemon.network.sent if sent.to == CUSTOMER)
        assert first.text.startswith("Olá, Ana!")
        wait_until(
            lambda: [m.status for m in db.list_messages("default", CUSTOMER)] == ["replied", "sent"], message="logged"
        )
    finally:
        daemon.stop()
        db.close()
        cluster.stop()


def test_a_stale_message_does_not_end_a_hand_off_pause(daemon: Daemon) -> None:
    daemon.paired()
    daemon.deliver(incoming("atendente"))
    wait_until(lambda: len(daemon.network.sent) == 1, message="hand-off reply")
    late = incoming("oi??", sent=time.time() - 3 * 3600)  # a late delivery, ignored
    waiting = incoming("alguém?")
    daemon.deliver(late)
    daemon.deliver(waiting)
    processed(daemon, late, waiting)
    assert len(daemon.network.sent) == 1  # still paused for the person who was called
    last = daemon.db.list_messages("default", CUSTOMER)[-1]
    assert (last.text, last.status) == ("alguém?", "paused")


def test_every_message_received_during_a_shutdown_is_logged(daemon: Daemon) -> None:
    services = daemon.paired()
    client = daemon.network.current()
    delivered: list[str] = []
    sink = client._sink

    def acknowledged(event: events.ClientEvent) -> None:  # what Go hands over has been acked to WhatsApp
        if isinstance(event, events.IncomingMessage):
            delivered.append(event.message_id)
        sink(event)

    client._sink = acknowledged

    def customers_keep_writing() -> None:
        n = 0
        while not client.stopped.is_set():
            client.emit(incoming(f"pergunta {n}", chat=f"55119{n % 40:08d}@s.whatsapp.net"))
            n += 1
            time.sleep(0.005)

    writer = threading.Thread(target=customers_keep_writing)
    writer.start()
    wait_until(lambda: len(delivered) >= 30, message="traffic")
    services.stop()
    writer.join(5)
    logged = {m.message_id for m in daemon.db.list_messages("default") if m.direction == "in"}
    assert set(delivered) <= logged


def test_a_send_whose_outcome_is_unknown_is_never_retried(db: Database) -> None:
    attempts: list[str] = []

    def send(jid: str, text: str) -> str:
        attempts.append(text)
        raise SendOutcomeUnknown("send_text: no answer from the client within 60 s")

    outbox = Outbox(db, "default", Channel(send, lambda: True, lambda jid, seconds: None))
    row = outbox.enqueue(CUSTOMER, "Seu pedido saiu", reason="api", expires_in=None)
    outbox.flush()
    outbox.flush()
    (message,) = [m for m in db.list_messages("default") if m.id == row]
    assert attempts == ["Seu pedido saiu"]  # the customer may have it: never a second copy
    assert message.status == "failed" and "outcome unknown" in (message.last_error or "")


def test_only_a_take_over_settles_what_the_last_owner_left_mid_send(daemon: Daemon) -> None:
    db = daemon.db
    row = db.enqueue_outgoing("default", CUSTOMER, "Já chamei um atendente", reason="api", expires_at=None, now=now())
    assert db.claim_outgoing(row)  # the owner is sending it right now
    # Held for as long as the test needs it (a short TTL could run out before the daemon is even up).
    owner = db.acquire_lease("default", "host-a/deploy/1", ttl_seconds=3600)
    assert owner is not None
    db.acquire_lease = attempts = Calls(db.acquire_lease)  # (the standby's lease keeper calls db.acquire_lease)
    services = daemon.start()
    wait_until(lambda: services.runtime.state is State.STANDBY, message="standby")
    services.outbox.flush = passes = Calls(services.outbox.flush)
    attempts.mark()
    passes.mark()
    attempts.wait(2, message="two more take-over attempts of the standby")  # each refused: the owner is live
    passes.wait(message="an outbox pass of the standby")
    assert status_of(db, row) == "sending"  # a standby never touches the live owner's sends
    with db.transaction() as tx:  # ...which then crashes: its lease runs out, in one step
        tx.execute("UPDATE whatsapp_session_leases SET expires_at = 0 WHERE owner_id = 'host-a/deploy/1'")
    wait_until(lambda: services.runtime.fence is not None, timeout=15, message="the take-over")
    wait_until(lambda: status_of(db, row) == "failed", message="the interrupted send settled")


def status_of(db: Database, row: int) -> str:
    return next(m.status for m in db.list_messages("default") if m.id == row)


def now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.parametrize("kind", ["reaction", "edit", "revoke", "sticker"])
def test_reactions_edits_revokes_and_stickers_are_logged_and_never_answered(daemon: Daemon, kind: str) -> None:
    daemon.paired()
    greeting = incoming("oi")
    daemon.deliver(greeting)
    wait_until(lambda: len(replies_to(daemon.network)) == 1, message="greeting")
    protocol = replace(incoming(""), kind=kind)
    daemon.deliver(protocol)
    wait_until(lambda: any(m.message_id == protocol.message_id for m in daemon.db.list_messages("default")))
    (logged,) = [m for m in daemon.db.list_messages("default") if m.message_id == protocol.message_id]
    assert (logged.status, logged.message_type) == ("ignored", kind)
    processed(daemon, protocol)
    assert len(replies_to(daemon.network)) == 1  # no "não entendi" and no menu


def test_a_voice_note_gets_its_reply_and_a_person(daemon: Daemon) -> None:
    daemon.paired()
    daemon.deliver(incoming("oi"))
    wait_until(lambda: len(replies_to(daemon.network)) == 1, message="greeting")
    voice = replace(incoming(""), kind="audio")
    daemon.deliver(voice)
    wait_until(lambda: len(replies_to(daemon.network)) == 2, message="the reply to the voice note")
    assert "Recebi seu áudio" in replies_to(daemon.network)[-1]
    (logged,) = [m for m in daemon.db.list_messages("default") if m.message_id == voice.message_id]
    assert logged.message_type == "audio" and logged.reason == "media:audio"
    hello = incoming("alô?")
    daemon.deliver(hello)  # a person takes it from here: the bot stays quiet
    processed(daemon, hello)
    assert len(replies_to(daemon.network)) == 2


def test_receipts_move_a_sent_reply_to_delivered_then_read_and_never_back(daemon: Daemon) -> None:
    daemon.paired()
    daemon.deliver(incoming("oi"))
    wait_until(lambda: len(daemon.network.sent) == 1, message="the reply")
    reply_id = daemon.network.sent[0].message_id

    def reply_status() -> str:
        return next(m.status for m in daemon.db.list_messages("default", CUSTOMER) if m.direction == "out")

    wait_until(lambda: reply_status() == "sent", message="sent")
    client = daemon.network.current()
    client.emit(events.Receipt(message_ids=[reply_id], chat=CUSTOMER, status="delivered", timestamp=int(time.time())))
    wait_until(lambda: reply_status() == "delivered", message="delivered")
    client.emit(events.Receipt(message_ids=[reply_id, "3EB0UNKNOWN"], chat=CUSTOMER, status="read", timestamp=0))
    wait_until(lambda: reply_status() == "read", message="read")
    client.emit(events.Receipt(message_ids=[reply_id], chat=CUSTOMER, status="delivered", timestamp=0))  # late
    client.emit(events.Receipt(message_ids=[], chat=CUSTOMER, status="read", timestamp=0))  # (a marker)
    # Receipts are stored on the events thread, in order, before the next event's handlers run: once
    # a message delivered after them is handed back, both late receipts have been applied (or refused).
    after = incoming("entrou no grupo", chat="120363025246125888@g.us", is_group=True)  # ignored, no reply
    client.emit(after)
    processed(daemon, after)
    assert reply_status() == "read"
    inbound = next(m for m in daemon.db.list_messages("default", CUSTOMER) if m.direction == "in")
    assert inbound.status == "replied"  # receipts are about what we sent only


LID_CHAT = "987654321012345@lid"  # the same customer, as WhatsApp addresses one-to-one chats more and more


def test_a_customer_writing_from_a_lid_chat_is_answered_there_and_listed_once_with_the_phone(daemon: Daemon) -> None:
    daemon.paired()
    first = incoming("Oi, bom dia!", chat=LID_CHAT, sender="987654321012345:3@lid", chat_phone=CUSTOMER)
    daemon.deliver(first)
    wait_until(lambda: len(daemon.network.sent) == 1, message="the greeting")
    # whatsmeow gives the phone with some messages only (SenderAlt, or its LID map): it is kept.
    second = incoming("2", chat=LID_CHAT, sender="987654321012345:3@lid")
    daemon.deliver(second)
    processed(daemon, first, second)

    assert [m.to for m in daemon.network.sent] == [LID_CHAT, LID_CHAT]  # in the chat they wrote from
    assert daemon.network.sent[0].text.startswith("Olá, Ana!") and "Rua das Flores" in daemon.network.sent[1].text
    assert (LID_CHAT, True) in daemon.network.typing and first.message_id in daemon.network.read
    logged = [(m.direction, m.status) for m in daemon.db.list_messages("default", LID_CHAT)]
    assert logged == [("in", "replied"), ("out", "sent")] * 2
    assert daemon.db.list_messages("default", CUSTOMER) == []  # never a second chat at the phone JID
    (chat,) = daemon.db.list_chats("default")
    assert (chat.chat_jid, chat.phone_jid, chat.unanswered) == (LID_CHAT, CUSTOMER, 0)
    received = [e for e in daemon.db.events_after("default", 0) if e.event_type == "message.received"]
    assert [json.loads(e.payload)["chat_phone"] for e in received] == [CUSTOMER, CUSTOMER]


# --- with the fake as harsh as whatsmeow (tests/fake_whatsapp.py's switches) ---------------------


def test_messages_delivered_before_connected_are_logged_marked_read_and_answered_once(daemon: Daemon) -> None:
    """whatsmeow delivers what the server queued while the client was away before it dispatches
    Connected (which waits for its pre-key check): those customers get their blue ticks and one
    answer each, once connected."""
    daemon.paired()
    daemon.stop()
    other = "5511955554444@s.whatsapp.net"
    backlog = [incoming("oi, vocês abrem hoje?"), incoming("bom dia", chat=other)]
    pre_keys = threading.Event()
    daemon.network.offline_backlog = list(backlog)
    daemon.network.store_writes_before_connected = 5
    daemon.network.connected_gate = pre_keys
    try:
        services = daemon.start()
        wait_until(
            lambda: (
                {m.message_id for m in daemon.db.list_messages("default") if m.direction == "in"}
                == {m.message_id for m in backlog}
            ),
            message="the backlog logged",
        )
        # The connection is up (the messages came over it): they are marked read before Connected.
        wait_until(lambda: set(daemon.network.read) == {m.message_id for m in backlog}, message="blue ticks")
        assert services.runtime.state is not State.CONNECTED and daemon.network.sent == []
    finally:
        pre_keys.set()
    wait_until(lambda: services.runtime.state is State.CONNECTED, message="connected")
    processed(daemon, *backlog)
    assert sorted(m.to for m in daemon.network.sent) == sorted([CUSTOMER, other])  # one answer each
    assert all(m.text.startswith("Olá, Ana!") for m in daemon.network.sent)


def test_a_reply_whose_send_has_no_answer_is_never_sent_again(daemon: Daemon) -> None:
    """The send went out and its answer never came (the customer may well have it): failed, never
    retried, not after the next sends nor after a reconnect."""
    services = daemon.paired()
    daemon.network.unknown_send_outcomes.append("send_text: no answer from the client within 60 s")
    daemon.deliver(incoming("oi"))
    wait_until(
        lambda: any(m.status == "failed" for m in daemon.db.list_messages("default", CUSTOMER)),
        message="the reply settled as failed",
    )
    client = daemon.network.current()
    client.emit(events.Disconnected())
    wait_until(lambda: services.runtime.state is State.RECONNECTING)
    client.emit(events.Connected())  # the outbox looks at its queue again on every connect...
    later = services.outbox.enqueue(CUSTOMER, "Seu pedido saiu", reason="api", expires_in=None)
    # ...and once this later message went out, the outbox has been over its queue since the failure.
    wait_until(lambda: status_of(daemon.db, later) == "sent", message="the later message sent")
    assert [m.text[:9] for m in daemon.network.sent] == ["Olá, Ana!", "Seu pedid"]  # one copy of the reply
    (reply,) = [m for m in daemon.db.list_messages("default", CUSTOMER) if m.reason not in ("api", None)][1:]
    assert reply.status == "failed" and "outcome unknown" in (reply.last_error or "") and reply.attempts == 1


def test_a_slow_send_does_not_hold_up_the_blue_ticks_of_other_messages(daemon: Daemon) -> None:
    daemon.paired()
    sending = threading.Event()
    daemon.network.send_gate = sending
    other = "5511955554444@s.whatsapp.net"
    try:
        first = incoming("oi")
        daemon.deliver(first)
        wait_until(lambda: CUSTOMER in daemon.network.sends_started, message="the first reply on its way")
        second = incoming("bom dia", chat=other)
        daemon.deliver(second)
        # WhatsApp has not answered the first send yet: the second customer's ticks do not wait for it.
        wait_until(lambda: second.message_id in daemon.network.read, message="the second message marked read")
        assert daemon.network.sent == [] and not sending.is_set()
    finally:
        sending.set()
    processed(daemon, first, second)
    assert sorted(m.to for m in daemon.network.sent) == sorted([CUSTOMER, other])
