"""Every session the database holds, for an operator (``python -m bot sessions``): whether it is
stored, its paired device, who owns it now (the live lease), its state and when it was last saved."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bot.session.state import phone_of
from database import Database

COLUMNS = ("SESSION", "STATE", "STORED", "PHONE", "DEVICE", "OWNER", "LAST SAVED")


@dataclass(frozen=True)
class SessionLine:
    session_id: str
    state: str  # the live owner's; "not_running" when no instance holds its lease
    stored: bool
    device_jid: str | None
    phone: str | None
    push_name: str | None
    owner: str | None  # the instance holding a live lease; None: no daemon runs it
    last_saved_at: datetime | None


def list_sessions(db: Database) -> list[SessionLine]:
    """Every existing session (registered or stored, not deleted), by id."""
    return [
        SessionLine(
            session_id=session.session_id,
            state=session.state,
            stored=session.last_mirrored_at is not None,
            device_jid=session.device_jid,
            phone=session.phone or phone_of(session.device_jid),
            push_name=session.push_name,
            owner=session.owner,
            last_saved_at=session.last_mirrored_at,
        )
        for session in db.session_overview()
    ]


def table(lines: list[SessionLine]) -> str:
    """Aligned columns under a header; '-' where there is nothing to show."""
    rows = [COLUMNS] + [
        (
            line.session_id,
            line.state,
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
