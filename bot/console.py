"""`python -m bot console`: chat with the rules in the terminal, with no WhatsApp and no phone.

The same engine, message log and outbox as the daemon, over a throw-away embedded database;
the bot's replies are printed instead of sent. Commands: /clock HH:MM (or YYYY-MM-DD HH:MM),
/operator TEXT (as if answered from the phone), /help, /quit.
"""

from __future__ import annotations

import itertools
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bot.connection import events
from bot.messages.rules import Rules, load_rules
from bot.process.config import Config
from bot.messages.chatbot import Chatbot
from bot.messages.outbox import Channel, Outbox
from database import SqliteDatabase

CHAT = "5511900000000@s.whatsapp.net"
HELP = "/clock HH:MM | /clock YYYY-MM-DD HH:MM | /operator TEXT | /help | /quit"


class _Clock:
    def __init__(self) -> None:
        self.fixed: datetime | None = None

    def __call__(self) -> datetime:
        return self.fixed or datetime.now(UTC)


def run_console(config: Config, *, name: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    rules = load_rules(config.bot_replies)
    logging.getLogger().setLevel(max(config.python_log_level(), logging.WARNING))  # the chat is the output
    clock = _Clock()
    ids = (f"console-{n}" for n in itertools.count(1))

    def show(_: str, text: str) -> str:
        stdout.write("bot> " + text.replace("\n", "\n     ") + "\n\n")
        stdout.flush()
        return next(ids)

    with tempfile.TemporaryDirectory(prefix="zapkeep-console-") as scratch:
        db = SqliteDatabase(Path(scratch) / "console.sqlite3")
        db.open()
        outbox = Outbox(db, "console", Channel(show, lambda: True, lambda chat, seconds: None), clock=clock)
        bot = Chatbot(db, "console", rules, outbox, clock=clock)
        interactive = stdin.isatty()
        stdout.write(f"zapkeep console: rules from {config.bot_replies} ({rules.business}). {HELP}\n\n")
        while True:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                return 0
            text = line.rstrip("\n")
            if text.startswith("/"):
                if not _command(text, rules, clock, bot, next(ids), stdout):
                    return 0
                continue
            bot.handle(
                events.IncomingMessage(
                    message_id=next(ids),
                    chat=CHAT,
                    sender=CHAT,
                    push_name=name,
                    text=text,
                    from_me=False,
                    is_group=False,
                    timestamp=int(clock().timestamp()),
                )
            )
            if outbox.flush() == 0:
                stdout.write("bot> (no reply: the bot is paused in this chat)\n\n")
                stdout.flush()


def _command(text: str, rules: Rules, clock: _Clock, bot: Chatbot, message_id: str, stdout: TextIO) -> bool:
    command, _, argument = text.partition(" ")
    if command == "/quit":
        return False
    if command == "/clock":
        try:
            clock.fixed = _parse_clock(argument.strip(), rules, clock())
        except ValueError:
            stdout.write("usage: /clock HH:MM or /clock YYYY-MM-DD HH:MM\n\n")
            return True
        local = clock.fixed.astimezone(rules.timezone)
        stdout.write(
            f"(clock set to {local:%Y-%m-%d %H:%M} {rules.timezone.key}; "
            f"{'open' if rules.is_open(clock.fixed) else 'closed'})\n\n"
        )
    elif command == "/operator":
        bot.handle(
            events.IncomingMessage(
                message_id=message_id,
                chat=CHAT,
                sender=CHAT,
                push_name="",
                text=argument,
                from_me=True,
                is_group=False,
                timestamp=int(clock().timestamp()),
            )
        )
        stdout.write("(an operator answered from the phone: the bot steps back in this chat)\n\n")
    else:
        stdout.write(HELP + "\n\n")
    stdout.flush()
    return True


def _parse_clock(value: str, rules: Rules, now: datetime) -> datetime:
    if len(value) <= 5:
        hour, minute = (int(part) for part in value.split(":"))
        local = now.astimezone(rules.timezone).replace(hour=hour, minute=minute, second=0, microsecond=0)
    else:
        local = datetime.strptime(value, "%Y-%m-%d %H:%M").replace(tzinfo=rules.timezone)
    return local.astimezone(UTC)
