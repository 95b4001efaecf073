"""One daemon's metrics for many sessions (issue 25): one ``Metrics`` serves every session's
runtime; each per-session number carries ``session_id``, one family per metric, one sample per
session; the process's own numbers stay unlabelled."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.host import Host
from bot.metrics import Metrics
from bot.session.state import State
from bot.wiring import Services, build_services
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, make_config
from tests.test_host import QUICK, state_of
from tests.test_messaging import RULES, incoming

SESSIONS = ("suporte", "vendas")


class TwoSessions:
    """Two sessions' services on one database, each with its own (fake) WhatsApp, one Metrics."""

    def __init__(self, db: Database, template: Path, tmp_path: Path) -> None:
        self.db, self.metrics = db, Metrics()
        base = make_config(tmp_path)
        self.networks = {sid: FakeWhatsApp(schema_template=template) for sid in SESSIONS}
        self.services: dict[str, Services] = {
            sid: build_services(
                replace(base, session_id=sid), db, self.networks[sid].factory, RULES, timing=FAST, metrics=self.metrics
            )
            for sid in SESSIONS
        }

    def pair(self, session_id: str) -> None:
        services = self.services[session_id]
        wait_until(lambda: services.runtime.state is State.QR, message=f"{session_id}: qr")
        self.networks[session_id].current().scan_qr()
        wait_until(lambda: services.runtime.state is State.CONNECTED, message=f"{session_id}: connected")

    def answered(self, session_id: str, count: int) -> None:
        network = self.networks[session_id]
        for _ in range(count):
            network.current().emit(incoming("oi"))
        wait_until(lambda: len(network.sent) == count, message=f"{session_id}: {count} replies")


@pytest.fixture
def two(db: Database, whatsmeow_template: Path, tmp_path: Path) -> Iterator[TwoSessions]:
    sessions = TwoSessions(db, whatsmeow_template, tmp_path)
    try:
        yield sessions
    finally:
        for services in sessions.services.values():
            services.stop()


def families(metrics: Metrics) -> dict[str, list]:
    """Every family by name, after checking that none is printed twice (an invalid exposition)."""
    parsed = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = Counter(family.name for family in parsed)
    assert [name for name, n in names.items() if n > 1] == []
    return {family.name: family.samples for family in parsed}


def by_session(samples: list, name: str, **labels: str) -> dict[str, float]:
    """A family's samples named ``name`` with ``labels``, by session."""
    return {
        s.labels["session_id"]: s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    }


def test_two_sessions_share_one_metrics_each_family_once_one_sample_per_session(two: TwoSessions) -> None:
    for services in two.services.values():
        services.start()
    two.pair("vendas")
    wait_until(lambda: two.services["suporte"].runtime.state is State.QR, message="suporte: qr")

    shown = families(two.metrics)
    state = shown["zapkeep_state"]
    assert by_session(state, "zapkeep_state", state="connected") == {"vendas": 1.0, "suporte": 0.0}
    assert by_session(state, "zapkeep_state", state="qr") == {"vendas": 0.0, "suporte": 1.0}
    assert len(state) == len(SESSIONS) * len(State)  # one sample per session and state, no more
    for name in (
        "zapkeep_lease_owned",
        "zapkeep_fencing_token",
        "zapkeep_mirror_pending_changes",
        "zapkeep_database_up",
    ):
        assert set(by_session(shown[name], name)) == set(SESSIONS) and len(shown[name]) == len(SESSIONS), name
    assert by_session(shown["zapkeep_lease_owned"], "zapkeep_lease_owned") == {"vendas": 1.0, "suporte": 1.0}
    # The process's own numbers: one sample each, no session.
    assert [s.labels for s in shown["process_open_fds"]] == [{}]

    two.pair("suporte")
    two.answered("vendas", 1)
    two.answered("suporte", 2)
    received = "zapkeep_messages_received_total"
    sent = "zapkeep_messages_sent_total"
    wait_until(
        lambda: (
            by_session(families(two.metrics)["zapkeep_messages_sent"], sent, outcome="sent")
            == {"vendas": 1.0, "suporte": 2.0}
        ),
        message="each session's sends counted under it",
    )
    shown = families(two.metrics)
    assert by_session(shown["zapkeep_messages_received"], received, outcome="replied") == {
        "vendas": 1.0,
        "suporte": 2.0,
    }
    for sid in SESSIONS:
        # After the reconciliation that follows a connect and the snapshot that follows a pairing
        # (either could store the rows itself, and the mirror would then count none of them).
        runtime = two.services[sid].runtime
        wait_until(lambda r=runtime: r.status().last_reconcile_at is not None, message=f"{sid}: reconciled")
        wait_until(lambda s=sid: two.db.list_history(s) != [], message=f"{sid}: the snapshot after pairing")
        two.networks[sid].current().write_store(rows=3)

    def mirrored_rows() -> dict[str, float]:
        return by_session(families(two.metrics)["zapkeep_mirror_rows"], "zapkeep_mirror_rows_total")

    def counted(sid: str) -> bool:
        return mirrored_rows().get(sid, 0.0) >= 3

    for sid in SESSIONS:
        # A reconciliation that a loaded machine runs late may still store a change itself (the
        # mirror then counts none of it): the next change is the mirror's.
        for _ in range(10):
            try:
                wait_until(lambda s=sid: counted(s), timeout=5, message=f"{sid}: its changes counted under it")
                break
            except AssertionError:
                two.networks[sid].current().write_store(rows=3)
        assert counted(sid), mirrored_rows()
    tokens = by_session(shown["zapkeep_fencing_token"], "zapkeep_fencing_token")
    assert tokens == {sid: float(two.services[sid].runtime.fence.token) for sid in SESSIONS}

    # A session removed from the daemon: none of its samples is shown again; the other's stay.
    two.services["suporte"].stop()
    two.metrics.unwatch("suporte")
    shown = families(two.metrics)
    left = {s.labels.get("session_id") for samples in shown.values() for s in samples} - {None}
    assert left == {"vendas"}
    assert by_session(shown["zapkeep_messages_received"], received, outcome="replied") == {"vendas": 1.0}
    assert by_session(shown["zapkeep_state"], "zapkeep_state", state="connected") == {"vendas": 1.0}


def test_a_host_shows_each_hosted_session_once_and_forgets_a_deleted_one(
    db: Database, network: FakeWhatsApp, tmp_path: Path
) -> None:
    host = Host(make_config(tmp_path), db, network.factory, RULES, host_timing=QUICK, owner_id="host-a", timing=FAST)
    host.start()
    try:
        host.create_session("vendas")
        for session_id in ("default", "vendas"):
            wait_until(lambda sid=session_id: state_of(host, sid) is State.QR, message=f"{session_id}: qr")
        shown = families(host.metrics)
        assert by_session(shown["zapkeep_state"], "zapkeep_state", state="qr") == {"default": 1.0, "vendas": 1.0}

        assert host.delete_session("vendas")
        shown = families(host.metrics)
        left = {s.labels.get("session_id") for samples in shown.values() for s in samples} - {None}
        assert left == {"default"}
    finally:
        host.stop()
