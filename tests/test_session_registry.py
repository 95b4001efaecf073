"""Many sessions in one database (issue 25), on both back-ends: which sessions exist (the registry,
its tombstones, sessions stored by older releases), what owners publish about them, the overview
every instance answers from, and commands for a session's owner (fenced claims, LISTEN/NOTIFY)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from database import (
    CommandRequest,
    Database,
    HeadWrite,
    LiveState,
    PostgresDatabase,
    RowChange,
)
from tests.fake_whatsapp import wait_until

JID = "5511:1@s.whatsapp.net"
SEND = CommandRequest(
    "POST", "/api/messages/send", "session_id=vendas", "application/json", b'{"to": "5511", "text": "Oi"}'
)
STOP = CommandRequest("POST", "/api/session/stop", "", None, b"")


def _store(db: Database, session_id: str, n: int = 1) -> None:
    """Store a session the way a mirror (or a release before the registry) does: no registration."""
    head = HeadWrite(session_id, f'{{"head": {n}}}', f"sha256:{n:064d}", 100, JID, "Loja", "lineage")
    db.replace_session(head, [RowChange("whatsmeow_device", f"'{JID}'", f'["{JID}"]', f"{n:064x}")], sequence=n)


def _expire_lease(db: Database, session_id: str) -> None:
    with db.transaction() as tx:  # (one statement: nobody renews it in between)
        tx.execute("UPDATE whatsapp_session_leases SET expires_at = 0 WHERE session_id = %s", (session_id,))


# --- the registry ---


def test_a_session_is_created_once_and_a_second_create_changes_nothing(db: Database) -> None:
    assert db.session_ids() == [] and db.registered_session("vendas") is None
    assert db.register_session("vendas", pair_phone="5511988887777", rules="vendas.json") is True
    assert db.register_session("suporte") is True
    assert db.register_session("vendas", pair_phone="5511000000000", rules=None) is False

    assert db.session_ids() == ["suporte", "vendas"]
    vendas = db.registered_session("vendas")
    assert (vendas.session_id, vendas.pair_phone, vendas.rules, vendas.deleted_at) == (
        "vendas",
        "5511988887777",
        "vendas.json",
        None,
    )
    assert vendas.created_at.tzinfo is not None and abs(datetime.now(UTC) - vendas.created_at) < timedelta(hours=1)
    assert db.is_tombstoned("vendas") is False


def test_concurrent_creates_of_one_id_create_it_once(db: Database) -> None:
    results: list[bool] = []
    start = threading.Barrier(6)

    def create() -> None:
        start.wait()
        results.append(db.register_session("vendas"))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]


def test_a_session_stored_by_an_older_release_exists_and_cannot_be_created_again(db: Database) -> None:
    _store(db, "antigo")
    assert db.session_ids() == ["antigo"]
    assert db.register_session("antigo", pair_phone="5511") is False
    stored = db.registered_session("antigo")
    assert (stored.session_id, stored.pair_phone, stored.rules, stored.deleted_at) == ("antigo", None, None, None)
    assert stored.created_at == db.list_sessions()[0].created_at.replace(tzinfo=UTC)

    assert db.tombstone_session("antigo") is True
    assert db.session_ids() == [] and db.is_tombstoned("antigo")
    assert db.load_session("antigo") is not None  # the tombstone deletes nothing: the caller does
    assert db.register_session("antigo") is True  # created anew over its tombstone
    assert db.session_ids() == ["antigo"] and not db.is_tombstoned("antigo")


def test_a_deleted_session_stays_gone_until_created_again(db: Database) -> None:
    assert db.register_session("vendas", pair_phone="5511988887777", rules="vendas.json")
    first = db.registered_session("vendas")
    _store(db, "vendas")

    assert db.tombstone_session("vendas") is True
    assert db.tombstone_session("vendas") is False  # gone already
    assert db.delete_session("vendas") is True  # (what the caller does next)
    assert db.session_ids() == [] and db.is_tombstoned("vendas")
    assert db.registered_session("vendas").deleted_at is not None

    _store(db, "vendas", 2)  # an owner that had not heard of the delete mirrors it again...
    assert db.session_ids() == []  # ...and it stays gone
    assert [o.session_id for o in db.session_overview()] == []

    assert db.register_session("vendas", rules="novo.json") is True
    again = db.registered_session("vendas")
    assert (again.pair_phone, again.rules, again.deleted_at) == (None, "novo.json", None)
    assert again.created_at >= first.created_at
    assert db.session_ids() == ["vendas"] and not db.is_tombstoned("vendas")


def test_deleting_a_session_that_never_existed_leaves_no_trace(db: Database) -> None:
    assert db.tombstone_session("nunca") is False
    assert db.is_tombstoned("nunca") is False and db.registered_session("nunca") is None
    assert db.register_session("nunca") is True


# --- live state and the overview ---


def test_owners_publish_live_state_that_every_instance_reads(db: Database) -> None:
    db.publish_live(LiveState("vendas", "host-a/1", "qr", False, None, None, None))
    first = db.live_states()["vendas"]
    db.publish_live(LiveState("vendas", "host-a/1", "connected", True, "5511988887777", "Loja", None))
    db.publish_live(LiveState("suporte", "host-b/2", "reconnecting", False, "5511977776666", None, "timeout"))

    live = db.live_states()
    assert sorted(live) == ["suporte", "vendas"]
    vendas = live["vendas"]
    assert (vendas.owner_id, vendas.state, vendas.connected, vendas.phone, vendas.push_name, vendas.last_error) == (
        "host-a/1",
        "connected",
        True,
        "5511988887777",
        "Loja",
        None,
    )
    assert live["suporte"].connected is False and live["suporte"].last_error == "timeout"
    assert vendas.updated_at.tzinfo is not None and vendas.updated_at >= first.updated_at

    db.clear_live("vendas")
    assert sorted(db.live_states()) == ["suporte"]


def test_the_overview_lists_every_existing_session_with_its_owner_and_state(db: Database) -> None:
    # running here: leased, published
    db.register_session("a-vendas")
    db.acquire_lease("a-vendas", "host-a/1", ttl_seconds=60)
    db.publish_live(LiveState("a-vendas", "host-a/1", "connected", True, "5511988887777", "Vendas", None))
    # stored by an older release, never leased
    _store(db, "b-antigo")
    # its owner was killed while connected: the row it left behind, a lease run out
    db.register_session("c-morto")
    db.acquire_lease("c-morto", "host-c/3", ttl_seconds=60)
    db.publish_live(LiveState("c-morto", "host-c/3", "connected", True, "5511977776666", "Morto", "killed"))
    _expire_lease(db, "c-morto")
    # deleted: not listed, whatever it left behind
    db.register_session("d-apagado")
    db.publish_live(LiveState("d-apagado", "host-a/1", "connected", True, None, None, None))
    db.tombstone_session("d-apagado")
    # just taken by an owner that has published nothing yet
    db.register_session("e-novo")
    db.acquire_lease("e-novo", "host-b/2", ttl_seconds=60)

    overview = {o.session_id: o for o in db.session_overview()}
    assert list(overview) == ["a-vendas", "b-antigo", "c-morto", "e-novo"]

    a = overview["a-vendas"]
    assert (a.state, a.connected, a.phone, a.push_name, a.owner, a.last_mirrored_at) == (
        "connected",
        True,
        "5511988887777",
        "Vendas",
        "host-a/1",
        None,
    )
    assert 0 < a.lease_expires_in_seconds <= 60

    b = overview["b-antigo"]
    assert (b.state, b.connected, b.owner, b.lease_expires_in_seconds, b.push_name) == (
        "not_running",
        False,
        None,
        None,
        "Loja",  # (the stored name, nothing published)
    )
    assert b.last_mirrored_at == db.list_sessions()[0].updated_at.replace(tzinfo=UTC)
    assert (b.phone, b.device_jid, a.device_jid) == (None, JID, None)

    c = overview["c-morto"]
    assert (c.state, c.connected, c.owner, c.phone, c.last_error) == (
        "not_running",
        False,
        None,
        "5511977776666",
        "killed",
    )
    assert c.lease_expires_in_seconds < 0

    e = overview["e-novo"]
    assert (e.state, e.connected, e.owner) == ("starting", False, "host-b/2")


# --- commands ---


def test_a_command_is_claimed_once_by_its_sessions_owner_and_answered(db: Database) -> None:
    vendas = db.acquire_lease("vendas", "host-a/1", ttl_seconds=60)
    suporte = db.acquire_lease("suporte", "host-a/1", ttl_seconds=60)
    db.acquire_lease("outra", "host-b/2", ttl_seconds=60)
    first = db.enqueue_command("vendas", SEND)
    elsewhere = db.enqueue_command("outra", STOP)
    second = db.enqueue_command("suporte", STOP)
    third = db.enqueue_command("vendas", STOP)

    waiting = db.command(first)
    assert (waiting.session_id, waiting.request, waiting.claimed_by, waiting.status_code, waiting.answer) == (
        "vendas",
        SEND,
        None,
        None,
        None,
    )
    assert waiting.created_at.tzinfo is not None

    claimed = db.claim_commands("host-a/1", [vendas, suporte])
    assert [c.id for c in claimed] == [first, second, third]  # oldest first, only the fenced sessions'
    assert [c.request for c in claimed] == [SEND, STOP, STOP]
    assert {c.claimed_by for c in claimed} == {"host-a/1"} and all(c.claimed_at for c in claimed)
    assert db.claim_commands("host-a/1", [vendas, suporte]) == []  # claimed once
    assert db.command(elsewhere).claimed_by is None

    db.finish_command(first, 200, {"id": 7, "status": "queued", "texto": "Olá"})
    db.finish_command(first, 500, {"error": "late"})  # only the first answer counts
    done = db.command(first)
    assert (done.status_code, done.answer) == (200, {"id": 7, "status": "queued", "texto": "Olá"})
    assert done.finished_at is not None and done.finished_at >= done.claimed_at
    assert done.request.body == b""  # what it carried (a file, an imported session's credentials) is gone
    assert db.command(10_000) is None


def test_a_stale_fence_claims_nothing(db: Database) -> None:
    stale = db.acquire_lease("vendas", "host-a/1", ttl_seconds=60)
    queued = db.enqueue_command("vendas", SEND)
    _expire_lease(db, "vendas")
    assert db.claim_commands("host-a/1", [stale]) == []  # its lease ran out

    owner = db.acquire_lease("vendas", "host-b/2", ttl_seconds=60)  # taken over
    assert db.claim_commands("host-a/1", [stale]) == []
    assert db.command(queued).claimed_by is None
    assert [c.id for c in db.claim_commands("host-b/2", [owner])] == [queued]


def test_finished_commands_are_pruned_and_waiting_ones_kept(db: Database) -> None:
    fence = db.acquire_lease("vendas", "host-a/1", ttl_seconds=60)
    old, claimed = db.enqueue_command("vendas", SEND), db.enqueue_command("vendas", STOP)
    db.claim_commands("host-a/1", [fence])
    db.finish_command(old, 200, {})
    waiting = db.enqueue_command("vendas", STOP)

    assert db.prune_commands(datetime.now(UTC) - timedelta(hours=1)) == 0  # finished after it
    assert db.prune_commands(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert db.command(old) is None
    assert db.command(claimed).claimed_by == "host-a/1" and db.command(waiting) is not None


def test_close_ends_a_wait_for_commands(db: Database) -> None:
    db.wait_for_commands(0)  # (PostgreSQL: listening now)
    ended = threading.Event()

    def wait() -> None:
        db.wait_for_commands(600)
        ended.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: _waiting(db, waiter), message="the waiter to wait")
    db.close()
    waiter.join(timeout=60)
    assert ended.is_set()


def _waiting(db: Database, waiter: threading.Thread) -> bool:
    """The waiter is inside its wait (PostgreSQL: it holds the listener)."""
    return waiter.is_alive() and (not isinstance(db, PostgresDatabase) or db._listener_lock.locked())


def test_sqlite_polls_for_commands(tmp_path) -> None:
    from database import SqliteDatabase

    db = SqliteDatabase(tmp_path / "z.sqlite3")
    db.open()
    assert db.wait_for_commands(0.01) is True  # (no notifications: every wait ends in a look)


# --- PostgreSQL: an owner is woken by NOTIFY, also after its listening connection was lost ---


@pytest.fixture
def two_instances(database_url: str):
    """The owner's database and another instance's, on one PostgreSQL database."""
    owner, requester = PostgresDatabase(database_url), PostgresDatabase(database_url)
    owner.open()
    requester.open()
    try:
        yield owner, requester
    finally:
        requester.close()
        owner.close()


class Waiter:
    """The owner's command thread: one wait_for_commands(600), its answer kept. Unless something
    was announced already, it is seen waiting on a live LISTEN connection before the test goes on,
    so an answer it gives later comes from a notification, not from a wait that ended at once."""

    def __init__(self, db: PostgresDatabase, *, announced: bool = False) -> None:
        self.answer: bool | None = None
        self._thread = threading.Thread(target=self._wait, args=(db,))
        self._thread.start()
        if not announced:
            wait_until(
                lambda: not self._thread.is_alive() or (db._listener_lock.locked() and _listening(db) == 1),
                message="the owner to wait on a listening connection",
            )
            assert self._thread.is_alive(), f"the wait ended with nothing announced ({self.answer})"

    def _wait(self, db: PostgresDatabase) -> None:
        self.answer = db.wait_for_commands(600)

    def woken(self) -> bool:
        self._thread.join(timeout=60)  # (a bound on a hang: unwoken, it would wait 600 s)
        return not self._thread.is_alive() and self.answer is True


def _listening(db: PostgresDatabase) -> int:
    """Connections of this database listening for commands (the server's view)."""
    with db.transaction() as tx:
        return tx.scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            (PostgresDatabase.LISTEN_COMMANDS,),
        )


def test_a_command_from_another_instance_wakes_the_waiting_owner(two_instances) -> None:
    owner, requester = two_instances
    assert owner.wait_for_commands(600) is True  # listening begins: look once at once
    waiter = Waiter(owner)
    command_id = requester.enqueue_command("vendas", SEND)
    assert waiter.woken()
    fence = owner.acquire_lease("vendas", "host-a/1", ttl_seconds=60)
    assert [c.id for c in owner.claim_commands("host-a/1", [fence])] == [command_id]

    # Enqueued while the owner was busy between two waits: the next wait still hears it.
    requester.enqueue_command("vendas", STOP)
    assert Waiter(owner, announced=True).woken()


def test_a_wait_with_nothing_announced_ends_at_its_timeout(two_instances) -> None:
    owner, _ = two_instances
    owner.wait_for_commands(600)
    assert owner.wait_for_commands(0.2) is False  # (the timer set short)


def test_the_owner_listens_again_after_its_connection_was_lost(two_instances) -> None:
    owner, requester = two_instances
    owner.wait_for_commands(600)
    with requester.transaction() as tx:  # the server ends the listening connection (a restart, a proxy)
        ended = tx.scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = %s",
            (PostgresDatabase.LISTEN_COMMANDS,),
        )
    assert ended == 1
    wait_until(lambda: _listening(requester) == 0, message="the listening connection to end")
    assert owner.wait_for_commands(600) is True  # the broken connection: look now...
    assert owner.wait_for_commands(600) is True  # ...listening again: look now
    waiter = Waiter(owner)
    requester.enqueue_command("vendas", SEND)
    assert waiter.woken()
