"""The connection's life around the clock: stale events, stalls, readiness, operator stop/start."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

from bot.connection import events
from bot.session.persistence import sync_session
from bot.runtime import Runtime
from bot.session.state import State
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.synthetic import create_paired_store
from tests.runtime_helpers import FAST, start_paired

CUSTOMER = "5511912345678@s.whatsapp.net"


def message(message_id: str, text: str = "oi") -> events.IncomingMessage:
    return events.IncomingMessage(message_id, CUSTOMER, CUSTOMER, "Ana", text, False, False, 1_700_000_000)


def test_late_events_of_a_stopped_round_do_not_change_the_next_one(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime: Runtime = runtime_factory()
    handled: list[str] = []
    runtime.message_handlers.append(lambda m: handled.append(m.message_id))
    old = start_paired(runtime, network, db)
    runtime.reconnect()
    wait_until(lambda: network.current() is not old and runtime.state is State.CONNECTED, message="a new round")
    # Go's thread of the stopped client still delivers what it had queued:
    for late in (events.StreamReplaced(), events.LoggedOut(reason="401"), events.Disconnected(), message("late")):
        old._sink(late)
    wait_until(lambda: handled == ["late"], message="the late message handled")  # acknowledged: never lost
    assert runtime.state is State.CONNECTED and runtime.readiness().ready
    assert network.current().device_jid() is not None  # the LoggedOut did not wipe the session


def test_readiness_says_why_customers_are_not_served_and_reconnect_takes_a_replaced_stream_back(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime: Runtime = runtime_factory()
    runtime.start()
    wait_until(lambda: runtime.state is State.QR, message="qr")
    waiting = runtime.readiness()
    assert not waiting.ready and waiting.state == "qr" and "scan the QR" in (waiting.reason or "")
    network.current().scan_qr()
    wait_until(lambda: runtime.readiness().ready, message="ready once connected")

    network.current().emit(events.StreamReplaced())
    wait_until(lambda: runtime.state is State.REPLACED, message="replaced")
    replaced = runtime.readiness()
    assert not replaced.ready and "reconnect" in (replaced.reason or "")
    assert runtime.fence is not None  # the lease is kept: a standby fighting the other client would flap
    wait_until(lambda: not any(c.running.is_set() and not c.stopped.is_set() for c in network.clients))

    runtime.reconnect()
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected again")
    assert runtime.readiness().ready


def test_a_reconnect_that_stalls_after_a_drop_gets_a_fresh_round(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime: Runtime = runtime_factory(timing=replace(FAST, reconnect_watchdog_seconds=0.5))
    stalled = start_paired(runtime, network, db)
    states: list[str] = []  # reconnecting lasts about the watchdog's 0.5 s: recorded, not polled for
    runtime.state_listeners.append(lambda status: states.append(status.state))
    stalled.emit(events.Disconnected())  # whatsmeow reconnects by itself... and never manages to
    wait_until(lambda: stalled.stopped.is_set(), timeout=30, message="the watchdog stopping the stalled round")
    wait_until(lambda: network.current() is not stalled and runtime.state is State.CONNECTED, message="a new round")
    assert states[0] == State.RECONNECTING.value and states[-1] == State.CONNECTED.value


def test_an_operator_stops_and_starts_the_connection_without_unlinking(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime: Runtime = runtime_factory()
    client = start_paired(runtime, network, db)
    rounds = len(network.clients)
    runtime.stop_connection()
    wait_until(lambda: runtime.state is State.DISCONNECTED, message="disconnected")
    assert client.stopped.is_set() and len(network.clients) == rounds  # no new round while stopped
    stopped = runtime.readiness()
    assert not stopped.ready and "POST /api/session/start" in (stopped.reason or "")
    assert runtime.fence is not None and client.device_jid() is not None  # still ours, still linked

    runtime.start_connection()
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected again")
    assert len(network.clients) == rounds + 1


def test_the_reason_a_stored_session_was_refused_at_boot_stays_in_the_status(
    runtime_factory, network: FakeWhatsApp, db: Database, tmp_path: Path
) -> None:
    store = tmp_path / "elsewhere.sqlite3"
    create_paired_store(store)
    sync_session(db, "default", store)
    # The stored head names a column whatsmeow does not have: the document is refused for its
    # content. (Rows that do not open are another matter: restore_needed, test_encryption.)
    head = json.loads(db.load_session("default").session_data)
    head["tables"][0]["columns"][0] = "intruder"
    with db.transaction() as tx:
        tx.execute("UPDATE whatsapp_sessions SET session_data = %s", (db.json_param(json.dumps(head)),))
    network.connected = False  # every dial fails and sets its own last_error
    runtime: Runtime = runtime_factory()
    runtime.start()
    wait_until(lambda: runtime.status().reconnect_count >= 2, message="failed dials")
    status = runtime.status()
    assert status.boot_error and status.boot_error != status.last_error
    assert "refused at boot" in (runtime.readiness().reason or "")


def replaced_session(runtime_factory, network: FakeWhatsApp, db: Database) -> Runtime:
    """A paired, connected session whose stream another client then took."""
    runtime: Runtime = runtime_factory()
    start_paired(runtime, network, db).emit(events.StreamReplaced())
    wait_until(lambda: runtime.state is State.REPLACED, message="replaced")
    return runtime


def test_reconnecting_twice_at_once_after_replaced_runs_one_client(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime = replaced_session(runtime_factory, network, db)
    callers = [threading.Thread(target=runtime.reconnect) for _ in range(2)]  # a double click
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)

    def running() -> list:
        return [c for c in network.clients if c.running.is_set() and not c.stopped.is_set()]

    def supervisors() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "supervisor"]

    # Both calls have returned: every supervisor they started exists. What a second one would do
    # is run a client of its own: wait until each has one (or none is left to), then count.
    wait_until(
        lambda: runtime.state is State.CONNECTED and len(running()) == len(supervisors()),
        message="every supervisor's round connected",
    )
    assert len(running()) == 1
    assert len(supervisors()) == 1


def test_stop_after_replaced_then_start_and_logout_while_stopped_pairs_again(
    runtime_factory, network: FakeWhatsApp, db: Database
) -> None:
    runtime = replaced_session(runtime_factory, network, db)
    runtime.stop_connection()
    assert runtime.state is State.DISCONNECTED
    runtime.start_connection()
    wait_until(lambda: runtime.state is State.CONNECTED, message="connected after start")

    runtime.stop_connection()
    wait_until(lambda: runtime.state is State.DISCONNECTED, message="disconnected")
    runtime.logout()  # unlinked: the way back is a new pairing, not a silent "disconnected"
    wait_until(lambda: runtime.state is State.QR, message="pairing again")
