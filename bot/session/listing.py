"""Every session the database holds, for an operator (``python -m bot sessions``): whether it is
stored, its paired device, who owns it now (the live lease) and when it was last saved."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bot.session.state import phone_of
from database import Database

COLUMNS = ("SESSION", "STORED", "PHONE", "DEVICE", "OWNER", "LAST SAVED")


@dataclass(frozen=True)
class SessionLine:
    session_id: str
    stored: bool
    device_jid: str | None
    phone: str | None
    push_name: str | None
    owner: str | None  # the instance holding a live lease; None: no daemon runs it
    last_saved_at: datetime | None


def list_sessions(db: Database) -> list[SessionLine]:
    """The stored sessions, by id, each with its lease's live owner."""
    lines = []
    for summary in db.list_sessions():
        lines.append(
            SessionLine(
                session_id=summary.session_id,
                stored=True,
                device_jid=summary.device_jid,
                phone=phone_of(summary.device_jid),
                push_name=summary.push_name,
                owner=live_owner(db, summary.session_id),
                last_saved_at=summary.updated_at,
            )
        )
    return lines


def live_owner(db: Database, session_id: str) -> str | None:
    lease = db.lease(session_id)
    if lease is None or lease.owner_id is None or lease.expires_in_seconds <= 0:
        return None
    return lease.owner_id


def table(lines: list[SessionLine]) -> str:
    """Aligned columns under a header; '-' where there is nothing to show."""
    rows = [COLUMNS] + [
        (
            line.session_id,
            "yes" if line.stored else "no",
            line.phone or "-",
            line.device_jid or "-",
            line.owner or "-",
            line.last_saved_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if line.last_saved_at else "-",
        )
        for line in lines
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
