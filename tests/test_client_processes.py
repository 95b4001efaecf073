"""One client process hosts the rounds of many sessions (issue 25): their events and replies kept
apart, one session's slow calls and stops never holding up another's, a Go crash ending only the
rounds of that process, and the process recycled so that neonize's leak per connect stays bounded."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.connection import events
from bot.connection.client_process import ClientProcesses, ProcessClient
from tests.crashing_client import CRASHING_STORE
from tests.fake_network import FakeServer
from tests.fake_whatsapp import wait_until
from tests.synthetic import create_paired_store
from tests import test_client_process

black_hole = test_client_process.black_hole_proxy  # (a fixture: a loopback proxy that never answers)


class Round:
    """A round of a session, run on a thread as the runtime runs it; its events in a queue."""

    def __init__(self, processes: ClientProcesses, store: Path) -> None:
        self.received: queue.Queue[events.ClientEvent] = queue.Queue()
        self.client: ProcessClient = processes(store, self.received.put)  # type: ignore[assignment]
        self.ended: list[str | None] = []
        self._thread = threading.Thread(target=lambda: self.ended.append(self.client.run()), daemon=True)
        self._thread.start()

    def next_event(self) -> events.ClientEvent:
        return self.received.get(timeout=30)

    def next_message(self) -> events.IncomingMessage:
        event = self.next_event()
        assert isinstance(event, events.IncomingMessage), event
        self.client.message_handled(event.message_id)
        return event

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_end(self, timeout: float = 30) -> str | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the round did not end"
        return self.ended[0]


@pytest.fixture
def processes_factory() -> Iterator[list[ClientProcesses]]:
    made: list[ClientProcesses] = []
    yield made
    for processes in made:
        processes.close()


def message(message_id: str, text: str) -> dict[str, object]:
    return {
        "message_id": message_id,
        "chat": "5511999990000@s.whatsapp.net",
        "sender": "5511999990000@s.whatsapp.net",
        "push_name": "Cliente",
        "text": text,
        "from_me": False,
        "is_group": False,
        "timestamp": int(time.time()),
        "kind": "text",
    }


def test_two_sessions_in_one_client_process_never_see_each_others_events_replies_or_slow_calls(
    tmp_path: Path, processes_factory: list[ClientProcesses]
) -> None:
    servers = {name: FakeServer() for name in ("vendas", "suporte")}
    stores = {name: tmp_path / name / "whatsmeow.sqlite3" for name in servers}
    for store in stores.values():
        store.parent.mkdir()
        create_paired_store(store)
    routes = ";".join(f"{stores[name]}={server.address}" for name, server in servers.items())
    processes = ClientProcesses(logging.WARNING, child=[sys.executable, "-m", "tests.fake_network", routes])
    processes_factory.append(processes)
    checks: list[threading.Thread] = []
    try:
        vendas, suporte = Round(processes, stores["vendas"]), Round(processes, stores["suporte"])
        assert isinstance(vendas.next_event(), events.Connected)
        assert isinstance(suporte.next_event(), events.Connected)
        assert vendas.client.pid == suporte.client.pid and processes.pids() == [vendas.client.pid]

        # Each session's customers reach that session only, in order, each once.
        servers["vendas"].customer_sends(message("V1", "quero comprar"))
        servers["suporte"].customer_sends(message("S1", "não funciona"))
        assert suporte.next_message().message_id == "S1"
        servers["vendas"].customer_sends(message("V2", "quanto custa?"))
        assert [vendas.next_message().message_id for _ in range(2)] == ["V1", "V2"]
        servers["suporte"].customer_sends(message("S2", "ainda não"))
        assert suporte.next_message().message_id == "S2"
        for name, ids in (("vendas", ["V1", "V2"]), ("suporte", ["S1", "S2"])):
            wait_until(lambda: len(servers[name].acknowledged) == 2, message="the acknowledgements")
            assert sorted(servers[name].acknowledged) == ids

        # Each reply leaves from its own number, and its answer comes back to its own caller.
        sent_v = vendas.client.send_text("5511999990000@s.whatsapp.net", "Temos sim!")
        sent_s = suporte.client.send_text("5511999990000@s.whatsapp.net", "Vamos verificar.")
        assert [(s.text, s.message_id) for s in servers["vendas"].sent] == [("Temos sim!", sent_v)]
        assert [(s.text, s.message_id) for s in servers["suporte"].sent] == [("Vamos verificar.", sent_s)]

        # vendas's number checks wait on WhatsApp, more than its lane holds: suporte's calls (and
        # vendas's own replies) go past them.
        servers["vendas"].hold_checks()
        for n in range(6):
            checks.append(threading.Thread(target=_check_quietly, args=(vendas.client, f"55119{n:08d}"), daemon=True))
            checks[-1].start()
        wait_until(lambda: servers["vendas"].checks_waiting() == 4, message="vendas's lane full of checks")
        assert suporte.client.check_numbers(["5511988887777"])[0]["number"] == "5511988887777"
        suporte.client.mark_read("5511999990000@s.whatsapp.net", "5511999990000@s.whatsapp.net", "S2")
        vendas.client.send_text("5511999990000@s.whatsapp.net", "Um momento")
        assert servers["vendas"].checks_waiting() == 4

        # Stopping one session's round stops that client only.
        suporte.client.stop()
        assert suporte.wait_end() is None
        assert vendas.running()
        servers["vendas"].customer_sends(message("V3", "ok"))
        assert vendas.next_message().message_id == "V3"
        servers["vendas"].release_checks()
        for thread in checks:
            thread.join(30)
        vendas.client.stop()
        assert vendas.wait_end() is None
    finally:
        for server in servers.values():
            server.release_checks()
            server.close()


def _check_quietly(client: ProcessClient, number: str) -> None:
    try:
        client.check_numbers([number])
    except Exception:
        pass  # (the test looks at the server's side)


def test_a_go_crash_ends_every_round_of_its_process_and_later_rounds_run_in_a_new_one(
    tmp_path: Path, black_hole: list, processes_factory: list[ClientProcesses]
) -> None:
    processes = ClientProcesses(logging.WARNING, child=[sys.executable, "-m", "tests.crashing_client"])
    processes_factory.append(processes)
    stores = [tmp_path / f"s{n}.sqlite3" for n in range(2)]
    first = [Round(processes, store) for store in stores]  # the real client, dialling a proxy that never answers
    wait_until(lambda: len(black_hole) == 2, timeout=60, message="both rounds dialling")
    crashed_pid = first[0].client.pid
    assert first[1].client.pid == crashed_pid

    crash = Round(processes, tmp_path / CRASHING_STORE)  # a Go panic in a third session's round
    ends = [r.wait_end() for r in (*first, crash)]
    # SIGABRT (a shell says 134): none left hanging, none taken for a clean end
    assert ends == ["the client process exited with code -6"] * 3

    again = Round(processes, stores[0])  # the session's next round: a fresh process, and it works
    wait_until(lambda: len(black_hole) == 3, timeout=60, message="the next round dialling")
    assert again.client.pid not in (None, crashed_pid) and processes.pids() == [again.client.pid]

    # The crash came right after the crashing session's round opened: its next round runs alone,
    # and crashing again takes nobody else with it.
    retry = Round(processes, tmp_path / CRASHING_STORE)
    assert retry.wait_end() == "the client process exited with code -6"
    assert retry.client.pid not in (crashed_pid, again.client.pid)
    assert processes.pids() == [again.client.pid] and not again.ended  # (its dial hangs for a minute)
    again.client.stop()
    assert again.wait_end() is not None


def test_stopping_a_round_whose_dial_hangs_leaves_the_other_rounds_of_its_process_alone(
    tmp_path: Path, black_hole: list, processes_factory: list[ClientProcesses]
) -> None:
    """whatsmeow's stop waits for a hanging dial (a minute): that round is over for the daemon after
    the stop grace, while the process's other rounds go on and new ones start there."""
    processes = ClientProcesses(logging.WARNING, stop_grace_seconds=2)
    processes_factory.append(processes)
    a, b = Round(processes, tmp_path / "a.sqlite3"), Round(processes, tmp_path / "b.sqlite3")
    wait_until(lambda: len(black_hole) == 2, timeout=60, message="both rounds dialling")
    a.client.stop()
    assert a.wait_end() == "the client did not stop within 2 s"
    c = Round(processes, tmp_path / "a.sqlite3")  # the stopped session's next round, in the same process
    wait_until(lambda: len(black_hole) == 3, timeout=60, message="the next round dialling")
    assert c.client.pid == b.client.pid == a.client.pid
    assert not b.ended  # untouched (its own dial gives up only a minute after it began)


def tree_descriptors(processes: ClientProcesses) -> int:
    """Open descriptors of this process and of every client process."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [os.getpid(), *processes.pids()])


@pytest.mark.parametrize("limit", ["rounds", "descriptors"])
def test_client_processes_are_recycled_so_descriptors_stay_flat_over_many_rounds(
    tmp_path: Path, limit: str, processes_factory: list[ClientProcesses], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connect leaks a store connection pool in neonize (~2 descriptors a failed dial): a
    process taking every round would grow without bound. Here each round fails its dial at a
    closed port at once, as a session reconnecting through an outage does."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    stores = [tmp_path / f"s{n}.sqlite3" for n in range(3)]
    if limit == "rounds":
        processes = ClientProcesses(logging.WARNING, rounds_per_child=10)
    else:  # a fresh process's descriptors, and 10 more
        probe = ClientProcesses(logging.WARNING)
        processes_factory.append(probe)
        first = Round(probe, stores[0])
        first.wait_end()
        fresh = len(os.listdir(f"/proc/{probe.pids()[0]}/fd"))
        processes = ClientProcesses(logging.WARNING, descriptors_per_child=fresh + 10)
    processes_factory.append(processes)
    samples: list[int] = []
    pids: set[int] = set()
    for n in range(1, 121):
        finished = Round(processes, stores[n % 3])
        assert "proxyconnect tcp" in (finished.wait_end() or "")  # it dialled, and failed
        pids.add(finished.client.pid)  # type: ignore[arg-type]
        wait_until(lambda: set(processes.pids()) <= {finished.client.pid}, message="a drained process gone")
        if n % 10 == 5:
            samples.append(tree_descriptors(processes))
    assert len(pids) >= 5, pids  # recycled
    # Flat: a process's leak before its recycle is ~10 (without recycling, +10 at every sample).
    assert max(samples[3:]) <= max(samples[:3]) + 15, samples
