"""Run the real neonize library in its own process (never in the test process, which opens
store files with Python's sqlite3: the two SQLites must not share a process).

    python tests/neonize_helper.py create STORE           let whatsmeow create its schema
    python tests/neonize_helper.py devices STORE          print the devices whatsmeow sees (JSON)
    python tests/neonize_helper.py write-contacts STORE N [PAUSE_S]
                                                          make Go write N contact rows, 25 per
                                                          transaction, print the failures
"""

from __future__ import annotations

import json
import logging
import os
import sys

logging.basicConfig(level=logging.WARNING)
logging.getLogger("neonize.utils.log").setLevel(logging.WARNING)
os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")  # connect() must never leave the machine


def main(command: str, store: str, *args: str) -> int:
    from neonize.client import ClientFactory

    if command in ("create", "devices"):
        devices = ClientFactory.get_all_devices_from_db(store)
        print(json.dumps([{"jid": f"{d.JID.User}@{d.JID.Server}", "push_name": d.PushName} for d in devices]))
        return 0
    if command == "write-contacts":
        return write_contacts(store, int(args[0]), float(args[1]) if len(args) > 1 else 0.0)
    raise SystemExit(f"unknown command {command}")


def write_contacts(store: str, count: int, pause: float) -> int:
    import threading
    import time

    from neonize.client import NewClient
    from neonize.proto.Neonize_pb2 import ContactEntry
    from neonize.utils import build_jid

    client = NewClient(store)
    worker = threading.Thread(target=_connect_quietly, args=(client,), daemon=True)
    worker.start()
    worker.join(30)  # offline, connect() fails at the closed proxy within milliseconds
    failures = 0
    batch = 25
    for start in range(0, count, batch):
        entries = [
            ContactEntry(JID=build_jid(f"55119{n:08d}"), FirstName=f"Go {n}", FullName=f"Go Contact {n}")
            for n in range(start, min(count, start + batch))
        ]
        try:
            client.contact.put_all_contact_name(entries)
        except Exception as exc:  # report, the test asserts none
            failures += 1
            print(f"write failed: {exc}", file=sys.stderr)
        time.sleep(pause)
    print(json.dumps({"written": count, "failures": failures}))
    sys.stdout.flush()
    os._exit(0)  # Go's worker thread is not a daemon; don't wait for it


def _connect_quietly(client) -> None:
    try:
        client.connect()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
