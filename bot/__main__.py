"""Entry point: ``python -m bot`` runs the daemon; the other commands serve operators.

    python -m bot [run]            the daemon: WhatsApp session + chatbot + admin API
    python -m bot sessions [--json] every session in the database: state, stored, phone, owner, last saved
    python -m bot status           stored sessions and their history (JSON)
    python -m bot backup           sync the local store into the database, keep a snapshot
    python -m bot restore [-v N]   rewrite the local store from the database (daemon stopped)
    python -m bot delete [--purge] delete the stored session (--purge: its history too)
    python -m bot export FILE      write the stored document to FILE ('-': stdout; sealed with a key)
    python -m bot import FILE      validate FILE and store it as the session (an export, sealed or
                                   not, or the saved answer of GET /api/session/restore)
    python -m bot rekey            re-encrypt the stored session under SESSION_ENCRYPTION_KEY
    python -m bot console          chat with the rules in the terminal (no WhatsApp)

Every command but run and console takes ``--session ID`` (default: SESSION_ID, else ``default``):
the session it acts on, its rows and its local store DATA_DIR/sessions/ID.

This is the one place that loads .env, opens the pool, starts threads and installs signal
handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

from dotenv import find_dotenv, load_dotenv

from bot import __version__

from bot.process import logs
from bot.process.config import SHORT_TOKEN, Config, checked_session_id
from bot.process.errors import ConfigError, ZapkeepError
from bot.connection.events import ClientFactory
from database import Database, DatabaseError, open_database

log = logging.getLogger("bot")

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str], *, client_factory: ClientFactory | None = None) -> int:
    """``client_factory``: another WhatsApp for the daemon (the benchmarks' fake server)."""
    args = _parser().parse_args(argv)
    load_dotenv(find_dotenv(usecwd=True), override=False)  # the .env of the working directory
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        print(f"zapkeep: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.python_log_level(), config.log_format)
    try:
        if args.command == "run":
            return run_daemon(config, client_factory)
        if args.command == "console":
            from bot.console import run_console

            return run_console(config, name=args.name)
        if getattr(args, "session", None) is not None:  # (the commands that act on one session)
            config = replace(config, session_id=checked_session_id(args.session, "--session"))
        return run_command(config, args)
    except ConfigError as exc:  # found after the environment, e.g. in the rules file
        print(f"zapkeep: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ZapkeepError, DatabaseError) as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # Ctrl-C in the console or during a command: nothing to explain
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


STORED = (
    "Reads DATABASE_URL (unset: the embedded SQLite database in DATA_DIR), SESSION_ID and the encryption keys "
    "(SESSION_ENCRYPTION_KEY, SESSION_ENCRYPTION_KEY_OLD)."
)
LOCAL = f"{STORED} The local store is DATA_DIR/sessions/SESSION_ID (or --session)."
# What these commands read needs the keys the stored session is sealed with: checked first.
NEEDS_KEYS = ("run", "backup", "restore", "export", "import", "rekey")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description="zapkeep WhatsApp bot daemon (also installed as the `zapkeep` command).",
        epilog="Configuration comes from the environment and a .env file; see README.md and .env.example.",
    )
    parser.add_argument("--version", action="version", version=f"zapkeep {__version__}")
    commands = parser.add_subparsers(dest="command")

    def command(name: str, summary: str, reads: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {reads}")

    def session_command(name: str, summary: str, reads: str) -> argparse.ArgumentParser:
        """A command that acts on one session: its rows and its local store."""
        parser = command(name, summary, reads)
        parser.add_argument(
            "--session",
            metavar="ID",
            help="the session to act on (default: SESSION_ID, else 'default'); its store is DATA_DIR/sessions/ID",
        )
        return parser

    command(
        "run",
        "run the daemon (the default)",
        "Reads every variable in .env.example: DATABASE_URL, SESSION_ID, DATA_DIR, PORT, API_TOKEN, "
        "METRICS_TOKEN, CONSOLE_PASSWORD, WEBHOOK_URL, WEBHOOK_SECRET, WEBHOOK_EVENTS, BACKUP_INTERVAL_SECONDS, PAIR_PHONE, BOT_REPLIES, LOG_LEVEL, LOG_FORMAT, "
        "LEASE_TTL_SECONDS, LEASE_RENEW_SECONDS, SESSION_ENCRYPTION_KEY, SESSION_ENCRYPTION_KEY_OLD, TRUST_PROXY, "
        "HTTPS_PROXY, "
        "RAILWAY_DEPLOYMENT_ID.",
    )
    sessions = command("sessions", "every session in the database: state, stored, phone, owner, last saved", STORED)
    sessions.add_argument("--json", action="store_true", help="as JSON instead of a table")
    session_command("status", "stored sessions and their history, as JSON", STORED)
    session_command("backup", "sync the local store into the database and keep a snapshot in history", LOCAL)
    restore = session_command("restore", "rewrite the local store from the database (daemon stopped)", LOCAL)
    restore.add_argument("-v", "--version", type=_history_version, help="a historical version instead of the latest")
    delete = session_command("delete", "delete the stored session", STORED)
    delete.add_argument("--purge", action="store_true", help="delete its history too")
    export = session_command("export", "write the stored document to FILE ('-' for stdout)", STORED)
    export.add_argument("file")
    export.add_argument(
        "--clear", action="store_true", help="unencrypted, even with SESSION_ENCRYPTION_KEY set (it holds the keys!)"
    )
    import_ = session_command("import", "validate FILE and store it as the session", STORED)
    import_.add_argument(
        "file",
        help="'-' for stdin; each of these as it is: what `export` writes (clear, or sealed with a key), "
        "the answer of GET /api/session/restore saved with curl (?clear=true or sealed), or the bare session document",
    )
    session_command(
        "rekey",
        "re-encrypt every stored credential of the session under SESSION_ENCRYPTION_KEY (unset: decrypt); "
        "safe beside the running daemon",
        STORED,
    )
    console = command("console", "chat with the rules in the terminal, no WhatsApp", "Reads BOT_REPLIES.")
    console.add_argument("--name", default="Cliente", help="your WhatsApp name in the conversation")
    parser.set_defaults(command="run")
    return parser


def _open(config: Config, command: str) -> Database:
    """The database, with the configured keys; for commands that read credentials, stored ones
    sealed with a key we lack stop here, before anything is written."""
    from bot.session.sealing import Sealer, require_known_keys

    sealer = Sealer.from_config(config)
    db = open_database(config.database_url, config.embedded_database_path, sealer)
    if command in NEEDS_KEYS:
        try:
            require_known_keys(db.key_ids(config.session_id), sealer, config.session_id)
        except ConfigError:
            db.close()
            raise
    return db


# --- the daemon ----------------------------------------------------------------------------------


def run_daemon(config: Config, client_factory: ClientFactory | None = None) -> int:
    try:
        import magic  # noqa: F401  (what neonize's import needs first; checked here without loading Go)
    except ImportError as exc:
        if "libmagic" not in str(exc):
            raise
        # Slim images (Railpack's runtime image among them) lack the library.
        print(
            "zapkeep: the system library libmagic is missing (neonize needs it): install the package libmagic1 "
            "(Debian/Ubuntu: apt-get install libmagic1; Railway: railpack.json deploy.aptPackages)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    from bot.messages.rules import load_rules
    from bot.connection.client_process import process_client_factory
    from bot.host import Host
    from session_api import create_app, execute_command
    from session_api.server import ApiServer

    rules = load_rules(config.bot_replies)  # a bad rules file stops the boot, naming the line or rule
    if config.api_token is None:
        config = replace(config, api_token=secrets.token_urlsafe(32))
        log.warning("API_TOKEN is not set; generated one for this run only: %s", config.api_token)
    elif len(config.api_token) < SHORT_TOKEN:
        log.warning("API_TOKEN is shorter than %d characters; use a long random one", SHORT_TOKEN)
    if config.console_password is not None and len(config.console_password) < SHORT_TOKEN:
        log.warning("CONSOLE_PASSWORD is shorter than %d characters; use a long one", SHORT_TOKEN)

    stop = threading.Event()
    _install_signal_handlers(stop)
    db = _open(config, "run")
    log.info(
        "database: %s; %s; credentials %s",
        db.backend,
        f"session {config.session_id} (SESSION_ID), store {config.store_path}"
        if config.single_session
        else f"every session in the database (at most MAX_SESSIONS={config.max_sessions}), stores in {config.data_dir / 'sessions'}",
        f"encrypted with key {db.sealer.key_id}" if db.sealer.key_id else "stored in clear (no SESSION_ENCRYPTION_KEY)",
    )
    client_factory = client_factory or process_client_factory(config.python_log_level())
    host = Host(config, db, client_factory, rules)
    if config.single_session:
        logs.bind(config.session_id)  # also the lines of the process's own threads
    app = create_app(host, db, reply_expiry=rules.reply_expiry)
    host.command_handler = lambda command: execute_command(app, command)
    try:
        server = ApiServer(app, "0.0.0.0", config.port, trusted_proxy=config.trusted_proxy)
    except OSError as exc:
        db.close()
        raise ZapkeepError(f"cannot listen on PORT {config.port}: {exc.strerror or exc}") from None
    try:
        server.start()  # first, so the platform's health check passes while the sessions boot
        host.start()
        log.info(
            "console and API at http://localhost:%d/ (sessions: %s)", config.port, ", ".join(host.hosted()) or "none"
        )
        stop.wait()
        log.info("shutting down")
    finally:
        server.stop()
        host.stop()
        close = getattr(client_factory, "close", None)  # the client processes, once no session uses them
        if close is not None:
            close()
        db.close()
    log.info("stopped cleanly")
    logging.shutdown()
    return 0


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # timeout(1), docker stop and impatient operators send more than one: skipping the
            # final backup and the lease release would lose changes and stall the next start.
            log.warning("received %s again: still storing the last changes and releasing the lease", name)
            return
        log.info("received %s", name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


# --- operator commands -----------------------------------------------------------------------------


def run_command(config: Config, args: argparse.Namespace) -> int:
    from bot.session import persistence
    from bot.session.sealing import Sealer

    db = _open(config, args.command)
    try:
        session_id = config.session_id
        if args.command == "sessions":
            from bot.session import listing

            lines = listing.list_sessions(db)
            if args.json:
                print(json.dumps([asdict(line) for line in lines], indent=2, default=str))
            else:
                print(listing.table(lines))
        elif args.command == "status":
            sessions = [
                {**asdict(summary), "history": [asdict(h) for h in db.list_history(summary.session_id)]}
                for summary in db.list_sessions()
            ]
            local = _local_mirror_state(config, db)
            print(
                json.dumps({"database": db.backend, "sessions": sessions, "local_store": local}, indent=2, default=str)
            )
        elif args.command == "backup":
            _refuse_beside_a_live_owner(db, session_id)
            _refuse_an_unrelated_store(db, config)
            result = persistence.sync_session(db, session_id, config.store_path)
            if not result.paired:
                raise ZapkeepError(f"the local store {config.store_path} holds no paired device")
            version = persistence.snapshot_to_history(db, session_id, None, "cli")
            outcome = "written" if result.written_rows or version else "unchanged"
            print(
                f"{outcome}: session {session_id}, {result.written_rows} rows written ({result.total_rows} stored), "
                f"checksum {result.checksum}, "
                + (f"history version {version}" if version else "history already holds this state")
            )
        elif args.command == "restore":
            _refuse_beside_a_live_owner(db, session_id)
            record = (
                db.load_session(session_id)
                if args.version is None
                else db.load_history_version(session_id, args.version)
            )
            if record is None:
                raise ZapkeepError(f"no stored snapshot of session {session_id}")
            persistence.restore_record(db, record, config.store_path)
            print(f"restored session {session_id} version {record.version} to {config.store_path}")
        elif args.command == "delete":
            _refuse_beside_a_live_owner(db, session_id)
            if not db.delete_session(session_id, keep_history=not args.purge):
                raise ZapkeepError(f"no stored session {session_id}")
            print(f"deleted session {session_id}" + (" and its history" if args.purge else ""))
        elif args.command == "export":
            _, text = persistence.export_document(db, session_id)
            _write_private(args.file, text if args.clear else Sealer.from_config(config).seal_export(text, session_id))
        elif args.command == "import":
            _refuse_beside_a_live_owner(db, session_id)
            text = sys.stdin.read() if args.file == "-" else _read_file(Path(args.file))
            version = persistence.import_document(db, session_id, Sealer.from_config(config).open_export(text))
            print(f"imported session {session_id} as version {version}")
        elif args.command == "rekey":
            _rekey(db, session_id)
        return 0
    finally:
        db.close()


def _rekey(db: Database, session_id: str) -> None:
    target = f"key {db.sealer.key_id}" if db.sealer.key_id else "clear text (no SESSION_ENCRYPTION_KEY)"
    count = db.reseal(session_id)
    print(f"session {session_id}: {count.rows} rows and {count.snapshots} history snapshots moved to {target}")
    if count.unreadable:
        raise ZapkeepError(
            f"session {session_id}: {count.unreadable} stored payloads do not decrypt (altered, or moved from "
            "another session or row) and were left as they were; a restore refuses them"
        )
    left = db.key_ids(session_id) - {db.sealer.key_id}
    if left:  # a daemon still running with the old configuration went on writing with its key
        names = ", ".join(sorted(key_id or "clear text" for key_id in left))
        raise ZapkeepError(
            f"session {session_id}: some payloads are still under {names}, written meanwhile by a daemon "
            "configured with it\nRedeploy every daemon with the new SESSION_ENCRYPTION_KEY, then run rekey again."
        )


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ZapkeepError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ZapkeepError(f"{path} is not a UTF-8 text file (a session document is JSON)") from None


def _refuse_beside_a_live_owner(db: Database, session_id: str) -> None:
    """A running daemon owns its session's store and rows: writing beside it would be undone or
    would tear its store. (A crashed owner's lease runs out, and then this works.)"""
    lease = db.lease(session_id)
    if lease is not None and lease.owner_id is not None and lease.expires_in_seconds > 0:
        raise ZapkeepError(
            f"session {session_id} is owned by the running daemon {lease.owner_id} "
            f"(lease valid for {lease.expires_in_seconds:.0f} s)\n"
            "Stop it first, or use its HTTP API (POST /api/session/backup, /api/session/restore)."
        )


def _refuse_an_unrelated_store(db: Database, config: Config) -> None:
    """Only the store that produced what is stored (or any store, when nothing is) may be pushed."""
    from bot.session import persistence
    from bot.session.store_worker import inspect_store

    record = db.load_session(config.session_id)
    if record is None or record.format_version == 1:
        return
    if not persistence.descends_from(inspect_store(config.store_path), record):
        raise ZapkeepError(
            f"the local store {config.store_path} does not descend from the stored session "
            "(an older copy, or another host's): backing it up would overwrite newer data\n"
            "Restore the stored session first (python -m bot restore), or import an export on purpose."
        )


def _local_mirror_state(config: Config, db: Database) -> dict[str, object] | None:
    """This host's store against what is stored: how many of its changes the database lacks."""
    from bot.session.store_worker import inspect_store

    info = inspect_store(config.store_path)
    if info is None:
        return None
    record = db.load_session(config.session_id)
    stored_sequence = record.mirror_sequence if record is not None else 0
    same_lineage = record is not None and record.lineage == info.lineage
    return {
        "session_id": config.session_id,
        "path": str(config.store_path),
        "device_jid": info.device_jid,
        "lineage": info.lineage,
        "sequence": info.sequence,
        "last_mirrored_at": record.updated_at if record is not None else None,
        "pending_changes": max(0, info.sequence - stored_sequence) if same_lineage else None,
        "descends_from_stored": same_lineage and info.sequence >= stored_sequence,
    }


def _write_private(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds credentials
        os.fchmod(fd, 0o600)  # also when the file was there before, readable by others
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise ZapkeepError(f"cannot write {target}: {exc.strerror or exc}") from None


def _history_version(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a history version (a whole number from 1)")
    return int(text)


def cli() -> None:
    """The ``zapkeep`` command (pip install .): the same as ``python -m bot``."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
