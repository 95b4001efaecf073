"""Many sessions in one daemon (issue 25): each paired, answering from its own number and logging
under its own id; one session's poison message, failed client round or refused restore leaves the
others connected; a deleted session stays gone; a restart on an empty disk brings every session
back without a QR. (A real Go crash ends the whole shared client process: what it does to the
other sessions of that process is tests/test_client_processes.py's.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.host import Host, HostTiming
from bot.process.config import SHIPPED_REPLIES
from bot.process.errors import ConfigError, NotFoundError, SessionExists
from bot.session.state import State
from database import Database
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST, make_config
from tests.test_messaging import RULES, incoming

QUICK = HostTiming(sync_seconds=0.2, command_wait_seconds=0.1)


class Daemons:
    """Hosts (each one "daemon") over one database and one fake WhatsApp; stopped at the end."""

    def __init__(self, db: Database, network: FakeWhatsApp, tmp_path: Path) -> None:
        self.db, self.network, self.tmp_path = db, network, tmp_path
        self.running: list[Host] = []

    def start(self, name: str = "a", **env: str) -> Host:
        config = make_config(self.tmp_path / name, **env)
        host = Host(
            config, self.db, self.network.factory, RULES, host_timing=QUICK, owner_id=f"host-{name}", timing=FAST
        )
        self.running.append(host)
        host.start()
        return host

    def stop(self, host: Host) -> None:
        host.stop()
        self.running.remove(host)

    def stop_all(self) -> None:
        for host in list(self.running):
            self.stop(host)


@pytest.fixture
def daemons(db: Database, network: FakeWhatsApp, tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(db, network, tmp_path)
    yield made
    made.stop_all()


def state_of(host: Host, session_id: str) -> State | None:
    services = host.services(session_id)
    return None if services is None else services.runtime.state


def pair(host: Host, network: FakeWhatsApp, session_id: str) -> None:
    wait_until(lambda: state_of(host, session_id) is State.QR, message=f"{session_id} shows a QR")
    network.current(session_id=session_id).scan_qr()
    wait_until(lambda: state_of(host, session_id) is State.CONNECTED, message=f"{session_id} connected")


def customer(n: int) -> str:
    return f"55119{n:08d}@s.whatsapp.net"


def answered(network: FakeWhatsApp, session_id: str, chat: str) -> int:
    return sum(1 for m in network.sent if m.session_id == session_id and m.to == chat)


def ask_and_wait(host: Host, network: FakeWhatsApp, session_id: str, n: int, text: str = "oi") -> None:
    before = answered(network, session_id, customer(n))
    message = incoming(text, chat=customer(n))
    network.current(session_id=session_id).emit(message)
    wait_until(lambda: answered(network, session_id, customer(n)) > before, message=f"{session_id} answered")
    logged = host.db.list_messages(session_id)
    assert any(m.message_id == message.message_id for m in logged)


def test_twenty_sessions_pair_answer_from_their_own_number_and_survive_one_sessions_failures(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    host = daemons.start()
    assert host.hosted() == ["default"]  # a first boot with no session creates one
    ids = ["default"] + [f"loja-{n:02d}" for n in range(1, 20)]
    for session_id in ids[1:]:
        host.create_session(session_id)
    assert host.hosted() == sorted(ids)
    with pytest.raises(SessionExists):
        host.create_session("loja-01")
    for session_id in ids:
        pair(host, network, session_id)
    for n, session_id in enumerate(ids):
        ask_and_wait(host, network, session_id, n)
    # Each reply went out through its own session's client, to its own customer, and nowhere else.
    assert {(m.session_id, m.to) for m in network.sent} == {(sid, customer(n)) for n, sid in enumerate(ids)}
    for n, session_id in enumerate(ids):
        chats = {m.chat_jid for m in db.list_messages(session_id)}
        assert chats == {customer(n)}

    victim = "loja-07"
    client = network.current(session_id=victim)
    client.emit(incoming("oi\x00tudo\ud800", chat="a\ud800b"))  # a poison message
    with pytest.raises(NotFoundError):
        host.services(victim).runtime.restore(version=999)  # a refused restore
    client.crash()  # its round ends as a crashed client's does
    wait_until(
        lambda: state_of(host, victim) is State.CONNECTED and network.current(session_id=victim) is not client,
        message="the crashed session back (no QR: its store is intact)",
    )
    for n, session_id in enumerate(ids):
        assert state_of(host, session_id) is State.CONNECTED
        ask_and_wait(host, network, session_id, n, "menu")


def test_a_session_deleted_from_another_daemon_is_gone_for_good_also_after_a_restart(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    first = daemons.start("a", BACKUP_INTERVAL_SECONDS="5")
    first.create_session("vendas")
    pair(first, network, "default")
    pair(first, network, "vendas")
    wait_until(lambda: db.load_session("vendas") is not None, message="vendas stored")
    second = daemons.start("b", BACKUP_INTERVAL_SECONDS="5")
    # Two daemons share two sessions: one each (the first hands one over).
    wait_until(lambda: len(first.owned()) == 1 and len(second.owned()) == 1, message="one session each")
    owner, other = (first, second) if first.owned() == ["vendas"] else (second, first)
    assert owner.owned() == ["vendas"] and other.owned() == ["default"]

    assert other.delete_session("vendas")  # deleted through the daemon that does not run it
    wait_until(lambda: owner.hosted() == [], message="the owner stopped the deleted session")
    survivor = other.services("default").runtime
    for _ in range(2):  # two reconciliation intervals of the daemon that ran it
        seen = survivor.status().last_reconcile_at
        wait_until(lambda: survivor.status().last_reconcile_at != seen, timeout=60, message="a reconciliation")
    assert db.load_session("vendas") is None and "vendas" not in db.session_ids()
    assert not (owner.config.data_dir / "sessions" / "vendas").exists()

    daemons.stop_all()
    again = daemons.start("a")
    assert again.hosted() == ["default"]
    assert db.load_session("vendas") is None and "vendas" not in db.session_ids()


def test_every_session_comes_back_after_a_restart_on_an_empty_disk_without_a_qr(
    daemons: Daemons, network: FakeWhatsApp, db: Database
) -> None:
    host = daemons.start("a")
    for session_id in ("vendas", "suporte"):
        host.create_session(session_id)
    for session_id in ("default", "vendas", "suporte"):
        pair(host, network, session_id)
    for session_id in ("default", "vendas", "suporte"):
        wait_until(lambda s=session_id: db.load_session(s) is not None, message=f"{session_id} stored")

    def overview() -> dict[str, tuple[str, bool, str | None]]:
        return {o.session_id: (o.state, o.connected, o.owner) for o in db.session_overview()}

    # What the owner publishes, every instance reads: connected, and whose.
    wait_until(
        lambda: overview() == {s: ("connected", True, "host-a") for s in ("default", "vendas", "suporte")},
        message="the live state published",
    )
    daemons.stop(host)
    assert overview() == {s: ("not_running", False, None) for s in ("default", "vendas", "suporte")}
    rounds_before = len(network.clients)

    redeployed = daemons.start("fresh-disk")
    assert redeployed.hosted() == ["default", "suporte", "vendas"]
    for n, session_id in enumerate(redeployed.hosted()):
        wait_until(lambda s=session_id: state_of(redeployed, s) is State.CONNECTED, message=f"{session_id} restored")
        ask_and_wait(redeployed, network, session_id, n)
    assert all(not c.qr_codes for c in network.clients[rounds_before:])


def test_with_session_id_set_a_daemon_hosts_that_session_only(daemons: Daemons, db: Database) -> None:
    db.register_session("vendas")
    host = daemons.start("a", SESSION_ID="suporte")
    assert host.hosted() == ["suporte"]
    assert db.session_ids() == ["suporte", "vendas"]  # registered, as today's first boot stores it
    host.create_session("outro")  # registered for the daemons that host every session
    assert host.hosted() == ["suporte"]


def test_a_session_may_answer_with_rules_of_its_own_from_the_rules_directory(
    daemons: Daemons, network: FakeWhatsApp, tmp_path: Path
) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shipped = SHIPPED_REPLIES.read_text(encoding="utf-8")
    (rules_dir / "padaria.toml").write_text(shipped, encoding="utf-8")
    (rules_dir / "oficina.toml").write_text(shipped.replace("Cardápio e preços", "Peças e serviços"), encoding="utf-8")
    (tmp_path / "outside.toml").write_text(shipped, encoding="utf-8")
    host = daemons.start("a", BOT_REPLIES=str(rules_dir / "padaria.toml"))
    for refused in ("../outside.toml", str(tmp_path / "outside.toml"), "missing.toml"):
        with pytest.raises((ValueError, ConfigError)):
            host.create_session("oficina", rules=refused)
    assert "oficina" not in host.db.session_ids()  # a refused file registers nothing
    host.create_session("oficina", rules="oficina.toml")
    pair(host, network, "default")
    pair(host, network, "oficina")
    ask_and_wait(host, network, "oficina", 1)
    ask_and_wait(host, network, "default", 2)
    replies = {m.session_id: m.text for m in network.sent}
    assert "Peças e serviços" in replies["oficina"] and "Cardápio" not in replies["oficina"]
    assert "Cardápio e preços" in replies["default"]
