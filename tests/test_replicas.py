"""Several replicas share the sessions (issue 26): three real daemons on one PostgreSQL and twelve
sessions; each ends up owning its share; kill -9 of one, a fourth joining and SIGTERM of another
move sessions without losing a message, answering one twice, or any session ever being hosted (a
client connected) by two instances at once, sampled every 0.5 s throughout."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.fake_whatsapp import wait_until
from tests.replicas import TAG, DoubleHosting, Replicas

SESSIONS = [f"s{n:02d}" for n in range(1, 13)]


def test_three_instances_share_twelve_sessions_through_a_crash_a_join_and_a_redeploy(
    database_url: str, tmp_path: Path
) -> None:
    cluster = Replicas(database_url, tmp_path, SESSIONS)
    double = DoubleHosting(cluster.server).start()
    try:
        a = cluster.instance()
        cluster.seed(a)
        a.start()
        # Alone, it takes every session (stored from its disk, then connected).
        wait_until(lambda: cluster.settled([a], 12, 12), timeout=90, message="the first instance hosts all 12")
        b, c = cluster.instance().start(), cluster.instance().start()
        wait_until(lambda: cluster.settled([a, b, c], 3, 5), timeout=90, message="three instances share the 12")
        cluster.everyone_writes()
        # What operators see, from any instance: the live instances and the sessions each owns.
        owners = cluster.owners()
        listed = json.loads(cluster.get(c, "/api/instances"))["instances"]
        assert {i["instance_id"]: sorted(i["sessions"]) for i in listed} == {
            owner: sorted(s for s, o in owners.items() if o == owner) for owner in set(owners.values())
        }
        assert [i["this_instance"] for i in listed].count(True) == 1
        assert all(i["heartbeat_age_seconds"] < 6 for i in listed)  # live: younger than the lease TTL

        # /metrics: the sessions this instance owns; the first took all 12 (and handed 8 over).
        def gauge(name: str) -> float:
            return float(re.search(rf"^{name} (\S+)$", cluster.get(a, "/metrics"), re.M).group(1))

        # (a scrape and the fake server's connections are two moments: a hand-over may fall between)
        wait_until(
            lambda: gauge("zapkeep_sessions_owned") == cluster.owned_by()[a.process.pid],
            message="the owned-sessions gauge says what a hosts",
        )
        assert gauge("zapkeep_take_overs_total") >= 12

        # kill -9: its sessions wait for their leases to run out, then the other two take them,
        # restored from the database (the fake server pairs nothing new: a QR would never connect).
        cluster.kill(b)
        after_kill = [cluster.message(session) for session in SESSIONS]  # sent while b's wait
        wait_until(lambda: cluster.settled([a, c], 5, 7), timeout=90, message="the survivors host all 12")
        wait_until(lambda: all(cluster.answers()[t] >= 1 for t in after_kill), timeout=60, message="answered")
        # Their session.state events name the instance that connected them now.
        wait_until(
            lambda: {s: cluster.last_connected_by(s) for s in SESSIONS} == cluster.owners(), message="events name them"
        )

        # A fourth instance joins: it gets its share, handed over one at a time.
        d = cluster.instance().start()
        wait_until(lambda: cluster.settled([a, c, d], 3, 5), timeout=90, message="the newcomer's share")
        cluster.everyone_writes()

        # SIGTERM (a redeploy): every session flushed and released, taken by the others.
        assert cluster.terminate(a) == 0, a.log()[-3000:]
        assert a.log().count("lease released") >= 3
        wait_until(lambda: cluster.settled([c, d], 5, 7), timeout=60, message="a's sessions moved")
        cluster.everyone_writes()
        logged = cluster.logged()
    finally:
        double.stop()
        cluster.stop_all()

    assert double.samples > 0 and double.seen == []  # never two instances hosting one session
    assert cluster.server.replaced == 0  # ... nor one client replacing another's stream
    answers = cluster.answers()
    tags = {f"m{n}" for n in range(1, len(cluster.sent) + 1)}
    assert {t: answers[t] for t in tags if answers[t] != 1} == {}  # each answered exactly once
    assert set(cluster.sent) <= logged  # none lost
    # Each reply came from the number the customer wrote to.
    by_tag = {f"m{int(mid[4:])}": session for mid, session in cluster.sent.items()}
    assert all(by_tag[t] == sent.session for sent in cluster.server.sent for t in TAG.findall(sent.text))
