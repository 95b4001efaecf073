"""Ownership leases and fencing tokens, on both back-ends."""

from __future__ import annotations

import threading
import time

import pytest

from database import Database, Fence, FencedOut, HeadWrite, MirrorBatch, RowChange, SessionWrite
from tests.fake_whatsapp import wait_until

JID = "5511:1@s.whatsapp.net"


def _write(n: int) -> SessionWrite:
    return SessionWrite("default", f'{{"n": {n}}}', f"sha256:{n:064d}", JID, "Loja")


def _head(n: int) -> HeadWrite:
    return HeadWrite("default", f'{{"head": {n}}}', f"sha256:{n:064d}", 100 + n, JID, f"Loja {n}", "lineage")


def _row(n: int) -> RowChange:
    return RowChange("whatsmeow_pre_keys", f"'{JID}',{n}", f'["{JID}", {n}]', f"{n:064x}")


def test_one_owner_at_a_time_and_each_take_over_raises_the_token(db: Database) -> None:
    first = db.acquire_lease("default", "host-a/1", ttl_seconds=30)
    assert first is not None and first.token == 1
    assert db.acquire_lease("default", "host-b/2", ttl_seconds=30) is None  # held by a live owner
    assert db.renew_lease(first, ttl_seconds=30)

    assert db.release_lease(first)
    second = db.acquire_lease("default", "host-b/2", ttl_seconds=30)
    assert second is not None and second.token == 2
    assert not db.renew_lease(first, ttl_seconds=30)  # the old owner can never revive it
    assert db.lease("default").owner_id == "host-b/2"
    assert db.acquire_lease("other", "host-a/1", ttl_seconds=30).token == 1  # sessions are independent


def test_an_expired_lease_can_be_taken_and_is_not_renewable(db: Database) -> None:
    stale = db.acquire_lease("default", "host-a/1", ttl_seconds=0.3)
    wait_until(lambda: db.lease("default").expires_in_seconds <= 0, message="the lease expired (database clock)")
    assert not db.renew_lease(stale, ttl_seconds=30)
    assert db.lease("default").expires_in_seconds < 0
    fresh = db.acquire_lease("default", "host-b/2", ttl_seconds=30)
    assert fresh is not None and fresh.token == stale.token + 1


def _stale_writes(db: Database, stale: Fence) -> None:
    """Every kind of session write a stale owner could attempt: each is refused."""
    with pytest.raises(FencedOut, match="no longer valid"):
        db.write_batch(MirrorBatch("default", 10, [_row(10)], checksum="sha256:" + "a" * 64), stale)  # rows only
    with pytest.raises(FencedOut, match="no longer valid"):
        db.write_batch(MirrorBatch("default", 11, [_row(11)], head=_head(11)), stale)  # rows and a new head
    with pytest.raises(FencedOut, match="no longer valid"):
        db.replace_session(_head(12), [_row(12)], 12, stale)
    with pytest.raises(FencedOut, match="no longer valid"):
        db.save_history(_write(13), stale)
    with pytest.raises(FencedOut, match="no longer valid"):
        db.set_lineage("default", "taken-over", 14, stale)
    with pytest.raises(FencedOut):
        db.delete_session("default", fence=stale)
    with pytest.raises(FencedOut):
        db.delete_session("default", keep_history=False, fence=stale)


def test_a_stale_token_cannot_overwrite_or_delete_the_row(db: Database) -> None:
    old = db.acquire_lease("default", "host-a/1", ttl_seconds=30)
    db.replace_session(_head(1), [_row(1)], 1, old)
    assert db.save_history(_write(1), old) == 1
    db.release_lease(old)
    new = db.acquire_lease("default", "host-b/2", ttl_seconds=30)
    db.write_batch(MirrorBatch("default", 2, [_row(2)], head=_head(2)), new)
    assert db.save_history(_write(2), new) == 2
    row = db.load_session("default")
    rows = db.load_rows("default")
    assert row.push_name == "Loja 2" and row.mirror_sequence == 2 and len(rows) == 2

    _stale_writes(db, old)
    with pytest.raises(FencedOut, match="cannot write session"):  # a fence only ever covers its own session
        db.write_batch(MirrorBatch("other", 1, [_row(1)], head=_head(1)), new)

    assert db.load_session("default") == row
    assert db.load_rows("default") == rows
    assert [h.version for h in db.list_history("default")] == [2, 1]
    assert db.load_session("other") is None
    assert db.delete_session("default", fence=new)
    assert db.load_session("default") is None and db.load_rows("default") == []


def test_an_expired_owner_cannot_write_even_if_nobody_took_over(db: Database) -> None:
    stale = db.acquire_lease("default", "host-a/1", ttl_seconds=0.3)
    wait_until(lambda: db.lease("default").expires_in_seconds <= 0, message="the lease expired (database clock)")
    _stale_writes(db, stale)
    assert db.load_session("default") is None
    assert db.load_rows("default") == []
    assert db.list_history("default") == []


def test_an_expired_owner_cannot_change_a_stored_session_either(db: Database) -> None:
    db.replace_session(_head(1), [_row(1)], 1)  # stored by an admin (unfenced)
    db.save_history(_write(1))
    stale = db.acquire_lease("default", "host-a/1", ttl_seconds=60)
    db.write_batch(MirrorBatch("default", 2, [_row(2)], checksum="sha256:" + "b" * 64), stale)  # while it holds
    assert db.load_session("default").mirror_sequence == 2 and len(db.load_rows("default")) == 2
    with db.transaction() as tx:  # then its lease runs out (a pause longer than the lease)
        tx.execute("UPDATE whatsapp_session_leases SET expires_at = 0")
    row, rows = db.load_session("default"), db.load_rows("default")

    _stale_writes(db, stale)

    assert db.load_session("default") == row
    assert db.load_rows("default") == rows
    assert [h.version for h in db.list_history("default")] == [1]


def test_a_slow_renewal_never_makes_a_lease_look_longer_than_the_database_holds_it(db: Database) -> None:
    from bot.session.lease import LeaseKeeper

    class SlowAnswers:
        """The database renews at once but its answer arrives late; then it stops answering."""

        def __init__(self) -> None:
            self.renewals = 0

        def __getattr__(self, name: str):
            return getattr(db, name)

        def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
            self.renewals += 1
            if self.renewals > 1:
                time.sleep(5)  # unreachable from here on
            renewed = db.renew_lease(fence, ttl_seconds)
            time.sleep(1.5)
            return renewed

    keeper = LeaseKeeper(
        SlowAnswers(),  # type: ignore[arg-type]
        "default",
        "host-a",
        ttl_seconds=3,
        renew_seconds=0.5,
        poll_seconds=0.5,
        on_acquired=lambda fence, waited: None,
        on_lost=lambda reason: None,
        on_standby=lambda: None,
    )
    assert keeper.try_acquire()
    keeper.start()
    deadline = time.monotonic() + 8
    while keeper.fresh() and time.monotonic() < deadline:
        lease = db.lease("default")
        assert lease is not None and lease.expires_in_seconds > 0  # fresh here means held there
        time.sleep(0.02)
    assert not keeper.fresh()
    keeper.stop()


def test_a_take_over_longer_than_the_renewal_interval_is_renewed_at_once(db: Database) -> None:
    """Restoring a large session at take-over may take longer than the renewal interval; the lease
    must be renewed as soon as it ends, not a whole interval later, when the watchdog (which gives
    the lease up ttl - renew seconds after the last renewal) would already have declared it lost."""
    from bot.session.lease import LeaseKeeper

    lost: list[str] = []
    restored = threading.Event()

    def restore(fence: Fence, waited: float | None) -> None:
        time.sleep(5)  # 5 + 4 > 12 - 4: a renewal a whole interval later comes after the watchdog's limit
        restored.set()

    keeper = LeaseKeeper(
        db,
        "default",
        "host-a",
        ttl_seconds=12,
        renew_seconds=4,
        poll_seconds=0.5,
        on_acquired=restore,
        on_lost=lost.append,
        on_standby=lambda: None,
    )
    keeper.start()
    try:
        wait_until(lambda: keeper.fence is not None, message="the take-over")
        taken = keeper.fence
        wait_until(restored.is_set, timeout=30, message="the restore")

        def renewed() -> bool:
            keeper.check()  # what the runtime's watchdog does every few seconds
            return db.lease("default").expires_in_seconds > 10  # ~7 s were left after the restore

        wait_until(renewed, timeout=30, message="the renewal")
        assert lost == [] and keeper.fence == taken and keeper.fresh()
    finally:
        keeper.stop()


def test_nobody_takes_a_deleted_session_until_it_is_created_again(db: Database) -> None:
    """A standby that took a deleted session over would restore it and store it again."""
    db.register_session("vendas")
    owner = db.acquire_lease("vendas", "host-a/1", ttl_seconds=30)
    assert owner is not None and db.release_lease(owner)
    assert db.tombstone_session("vendas")
    assert db.acquire_lease("vendas", "host-b/2", ttl_seconds=30) is None
    assert db.register_session("vendas")  # created again on purpose
    again = db.acquire_lease("vendas", "host-b/2", ttl_seconds=30)
    assert again is not None and again.token == owner.token + 1
