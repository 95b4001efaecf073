"""Ownership leases and fencing tokens, on both back-ends."""

from __future__ import annotations

import time

import pytest

from database import Database, FencedOut, SessionWrite


def _write(n: int) -> SessionWrite:
    return SessionWrite("default", f'{{"n": {n}}}', f"sha256:{n:064d}", "5511:1@s.whatsapp.net", "Loja")


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
    time.sleep(0.5)
    assert not db.renew_lease(stale, ttl_seconds=30)
    assert db.lease("default").expires_in_seconds < 0
    fresh = db.acquire_lease("default", "host-b/2", ttl_seconds=30)
    assert fresh is not None and fresh.token == stale.token + 1


def test_a_stale_token_cannot_overwrite_or_delete_the_row(db: Database) -> None:
    old = db.acquire_lease("default", "host-a/1", ttl_seconds=30)
    assert db.save_session(_write(1), old).written
    db.release_lease(old)
    new = db.acquire_lease("default", "host-b/2", ttl_seconds=30)
    assert db.save_session(_write(2), new).written
    row = db.load_session("default")

    with pytest.raises(FencedOut, match="no longer valid"):
        db.save_session(_write(3), old)
    with pytest.raises(FencedOut):
        db.delete_session("default", fence=old)

    assert db.load_session("default") == row
    assert [h.version for h in db.list_history("default")] == [2, 1]
    assert db.delete_session("default", fence=new)


def test_an_expired_owner_cannot_write_even_if_nobody_took_over(db: Database) -> None:
    stale = db.acquire_lease("default", "host-a/1", ttl_seconds=0.3)
    time.sleep(0.5)
    with pytest.raises(FencedOut):
        db.save_session(_write(1), stale)
    assert db.load_session("default") is None
