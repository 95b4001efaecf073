"""Synthetic but schema-valid whatsmeow stores: random keys of the lengths whatsmeow CHECKs."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HELPER = Path(__file__).with_name("neonize_helper.py")
DEVICE_USER = "5511987654321"
DEVICE_JID = f"{DEVICE_USER}:7@s.whatsapp.net"  # whatsmeow's canonical form, device suffix included
PUSH_NAME = "Padaria Zapkeep"


@dataclass(frozen=True)
class StoreSize:
    pre_keys: int = 500
    sessions: int = 300
    contacts: int = 800
    sender_keys: int = 60
    app_state_keys: int = 30
    mutation_macs: int = 300


REALISTIC = StoreSize()
SMALL = StoreSize(pre_keys=20, sessions=10, contacts=10, sender_keys=3, app_state_keys=2, mutation_macs=5)
MEDIUM = StoreSize(pre_keys=800, sessions=2000, contacts=5000, sender_keys=400, app_state_keys=60, mutation_macs=3000)
LARGE = StoreSize(  # 3x MEDIUM
    pre_keys=2400, sessions=6000, contacts=15000, sender_keys=1200, app_state_keys=180, mutation_macs=9000
)


def neonize(command: str, store: Path, *args: str, timeout: float = 120) -> object:
    """Run the real neonize library in a child process and return its JSON answer."""
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, str(HELPER), command, str(store), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"neonize helper {command} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def create_paired_store(path: Path, size: StoreSize = SMALL, *, seed: int = 1) -> None:
    """neonize creates the schema; a synthetic device and its key material are added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    neonize("create", path)
    fill_store(path, size, seed=seed)


def fill_store(path: Path, size: StoreSize, *, seed: int = 1) -> None:
    rng = random.Random(seed)

    def key(n: int) -> bytes:
        return rng.randbytes(n)

    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key,"
            " signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig, adv_account_sig_key,"
            " adv_device_sig, platform, push_name) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                DEVICE_JID,
                rng.randrange(2**32),
                key(32),
                key(32),
                key(32),
                1,
                key(64),
                key(32),
                key(180),
                key(64),
                key(32),
                key(64),
                "android",
                PUSH_NAME,
            ),
        )
        conn.executemany(
            "INSERT INTO whatsmeow_pre_keys (jid, key_id, key, uploaded) VALUES (?,?,?,?)",
            [(DEVICE_JID, n + 1, key(32), n % 3 != 0) for n in range(size.pre_keys)],
        )
        peers = [f"55119{n:08d}" for n in range(size.sessions)]
        conn.executemany(
            "INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (?,?,?)",
            [(DEVICE_JID, f"{peer}.0", key(rng.randrange(900, 2200))) for peer in peers],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_identity_keys (our_jid, their_id, identity) VALUES (?,?,?)",
            [(DEVICE_JID, f"{peer}.0", key(32)) for peer in peers],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, first_name, full_name, push_name) VALUES (?,?,?,?,?)",
            [
                (DEVICE_JID, f"55218{n:08d}@s.whatsapp.net", f"Cliente {n}", f"Cliente Número {n}", f"Cliente {n} ☕")
                for n in range(size.contacts)
            ],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_sender_keys (our_jid, chat_id, sender_id, sender_key) VALUES (?,?,?,?)",
            [
                (DEVICE_JID, f"1203630{n:011d}@g.us", f"{peers[n % len(peers)]}.0", key(180))
                for n in range(size.sender_keys)
            ],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_sync_keys (jid, key_id, key_data, timestamp, fingerprint) VALUES (?,?,?,?,?)",
            [(DEVICE_JID, key(6), key(32), 1_700_000_000 + n, key(24)) for n in range(size.app_state_keys)],
        )
        names = ["critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low"]
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_version (jid, name, version, hash) VALUES (?,?,?,?)",
            [(DEVICE_JID, name, rng.randrange(1, 900), key(128)) for name in names],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_mutation_macs (jid, name, version, index_mac, value_mac) VALUES (?,?,?,?,?)",
            [(DEVICE_JID, names[n % len(names)], n, key(32), key(32)) for n in range(size.mutation_macs)],
        )
        conn.executemany(
            "INSERT INTO whatsmeow_lid_map (lid, pn) VALUES (?,?)",
            [(f"{10**14 + n}", peer) for n, peer in enumerate(peers)],
        )
    conn.close()


def table_rows(path: Path) -> dict[str, list[tuple]]:
    """Every whatsmeow table's rows, sorted, for comparing two stores."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'whatsmeow%' ORDER BY name"
            )
        ]
        return {name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr) for name in names}
    finally:
        conn.close()
