"""Instances sharing the sessions (issue 26), on both back-ends: one statement renews every lease
an instance holds and beats its heartbeat; live instances are those whose heartbeat is younger than
a lease's life; hosts sharing sessions each run only the sessions they own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.session.state import State
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import Calls
from tests.test_host import Daemons, pair


def test_one_statement_renews_every_lease_the_instance_still_holds_and_beats(db: Database) -> None:
    fences = [db.acquire_lease(f"s{n}", "a", 30) for n in range(3)]
    other = db.acquire_lease("s9", "b", 30)
    assert all(fences) and other is not None
    db.release_lease(fences[2])
    taken = db.acquire_lease("s2", "b", 30)  # released by a, taken by b: never renewed for a
    assert taken is not None
    before = {lease.session_id: lease.expires_in_seconds for lease in db.leases()}

    renewed = db.beat_and_renew("a", [f for f in fences if f is not None] + [other], 60, 100)

    assert renewed == {"s0", "s1"}  # not s2 (b's now), not s9 (b's fence, not a's)
    after = {lease.session_id: lease for lease in db.leases()}
    assert after["s0"].expires_in_seconds > before["s0"] and after["s1"].expires_in_seconds > before["s1"]
    assert after["s2"].owner_id == "b" and after["s2"].expires_in_seconds <= before["s2"]
    assert after["s9"].owner_id == "b" and after["s9"].expires_in_seconds <= before["s9"]
    live = {i.instance_id: i for i in db.live_instances(30)}
    assert set(live) == {"a"} and live["a"].sessions_owned == 2 and live["a"].max_sessions == 100


def test_an_instance_is_live_while_its_heartbeat_is_younger_than_the_ttl(db: Database) -> None:
    assert db.beat_and_renew("a", [], 10, 5) == set()  # no lease: a heartbeat alone
    db.beat_and_renew("b", [], 10, 100)
    db.beat_and_renew("c", [], 10, 100)
    assert [i.instance_id for i in db.live_instances(10)] == ["a", "b", "c"]
    with db.transaction() as tx:  # b's last beat 11 s ago: as old as a crashed instance's
        tx.execute("UPDATE whatsapp_instances SET heartbeat_at = heartbeat_at - 11 WHERE instance_id = %s", ("b",))
    assert [i.instance_id for i in db.live_instances(10)] == ["a", "c"]
    db.leave("c")  # a graceful stop signs off at once
    assert [i.instance_id for i in db.live_instances(10)] == ["a"]
    fence = db.acquire_lease("s1", "c", 10)
    assert fence is not None
    assert db.beat_and_renew("c", [fence], 10, 100, beat=False) == {"s1"}  # still storing and releasing
    assert [i.instance_id for i in db.live_instances(10)] == ["a"]  # ... without coming back to life


@pytest.fixture
def daemons(db: Database, network: FakeWhatsApp, tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(db, network, tmp_path)
    yield made
    made.stop_all()


def test_hosts_sharing_sessions_run_only_their_own_and_renew_them_in_one_statement_each_round(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    renewals = Calls(db.renew_lease)
    beats = Calls(db.beat_and_renew)
    db.renew_lease = renewals  # type: ignore[method-assign]
    db.beat_and_renew = beats  # type: ignore[method-assign]
    lease = {"LEASE_TTL_SECONDS": "6", "LEASE_RENEW_SECONDS": "1"}
    first = daemons.start("a", **lease)
    for session_id in ("s1", "s2", "s3"):
        first.create_session(session_id)
    for session_id in ("default", "s1", "s2", "s3"):
        pair(first, network, session_id)
        wait_until(lambda s=session_id: db.load_session(s) is not None, message=f"{session_id} stored")
    second = daemons.start("b", **lease)
    wait_until(lambda: len(first.owned()) == 2 and len(second.owned()) == 2, message="two sessions each")
    # Each runs the sessions it owns, and nothing else (no standby copy of the other's).
    assert first.hosted() == first.owned() and second.hosted() == second.owned()
    assert set(first.owned()).isdisjoint(second.owned())
    for host in (first, second):
        for session_id in host.owned():
            wait_until(lambda h=host, s=session_id: h.services(s).runtime.status().connected, message="connected")

    renewals.mark()
    beats.mark()
    beats.wait(6, message="three renewal rounds of each host")  # (each host beats every second)
    assert renewals.ended == 0  # no lease renewed on its own: the hosts' single statements did it
    assert all(first.services(s).runtime.lease.fresh() for s in first.owned())
    assert all(second.services(s).runtime.lease.fresh() for s in second.owned())


def test_a_host_that_cannot_renew_disconnects_before_its_leases_run_out_then_takes_them_again(
    daemons: Daemons, network: FakeWhatsApp, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long enough margin (the renewal interval) between giving up and the lease's expiry for a
    # loaded machine's polling to see the first before the second.
    host = daemons.start("a", LEASE_TTL_SECONDS="12", LEASE_RENEW_SECONDS="5")
    pair(host, network, "default")
    runtime = host.services("default").runtime
    token = runtime.fence.token
    client = network.current(session_id="default")

    def away(*args: object, **kwargs: object) -> set[str]:
        raise ConnectionError("the database is unreachable")

    monkeypatch.setattr(db, "beat_and_renew", away)
    wait_until(lambda: runtime.state is State.STANDBY, timeout=30, message="disconnected: renewals fail")
    lease = db.lease("default")
    assert lease is not None and lease.owner_id == host.instance_id and lease.expires_in_seconds > 0
    assert runtime.status().standby_cause == "not_renewed" and client.stopped.is_set()

    monkeypatch.undo()  # the database answers again: the session is taken again once its lease ran out
    wait_until(
        lambda: host.services("default") is not None and host.services("default").runtime.state is State.CONNECTED,
        timeout=60,
        message="taken again and connected",
    )
    assert host.services("default").runtime.fence.token > token


def test_a_session_is_handed_over_only_to_an_instance_with_room(
    daemons: Daemons, network: FakeWhatsApp, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Four sessions, two instances, one of them capped at MAX_SESSIONS=1: the fair share is 2, but
    the big one keeps 3, since a fourth released session would have nobody to take it."""
    big = daemons.start("big")
    for session_id in ("s1", "s2", "s3"):
        big.create_session(session_id)
    for session_id in ("default", "s1", "s2", "s3"):
        pair(big, network, session_id)
        wait_until(lambda s=session_id: db.load_session(s) is not None, message=f"{session_id} stored")
    small = daemons.start("small", MAX_SESSIONS="1")
    wait_until(lambda: len(big.owned()) == 3 and len(small.owned()) == 1, message="one session handed over")

    caplog.set_level(logging.INFO, logger="bot.host")
    rounds = Calls(db.live_instances)
    db.live_instances = rounds  # type: ignore[method-assign]
    rounds.wait(20, message="ten balancing rounds of each")  # where a second hand-over would happen
    assert not [r for r in caplog.records if "handed over" in r.getMessage()]
    assert len(big.owned()) == 3 and len(small.owned()) == 1
