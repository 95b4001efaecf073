"""Configuration from the environment: parsed once at boot into a frozen dataclass.

Every variable name here is a contract with operators (the README's Configuration table); add, never rename.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bot.process.errors import ConfigError
from database import EVENT_TYPES  # (defined where the events are written)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,100}")
PHONE_PATTERN = re.compile(r"\d{10,15}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
SHIPPED_REPLIES = Path(__file__).parent.parent / "messages" / "replies.pt-BR.toml"
SHORT_TOKEN = 16  # below this the boot warns: a short bearer token can be guessed
ENCRYPTION_KEY_BYTES = 32  # AES-256
GENERATE_KEY = "python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'"


def is_valid_session_id(value: str) -> bool:
    """A session id names a directory, so only a safe alphabet is accepted."""
    return SESSION_ID_PATTERN.fullmatch(value) is not None


def checked_session_id(value: str, name: str) -> str:
    """SESSION_ID's rule for whatever names a session (the variable, the CLI's ``--session``)."""
    if not is_valid_session_id(value):
        raise ConfigError(f"{name} must be 1-100 letters, digits, '-' or '_'")
    return value


@dataclass(frozen=True)
class Config:
    database_url: str | None = field(repr=False)  # it carries the database's password
    session_id: str
    data_dir: Path
    port: int
    api_token: str | None = field(repr=False)
    backup_interval_seconds: int
    session_encryption_key: bytes | None = field(repr=False)  # 32 bytes: credentials encrypted at rest
    pair_phone: str | None
    bot_replies: Path
    log_level: str
    lease_ttl_seconds: int = 10
    lease_renew_seconds: int = 3
    log_format: str = "text"  # or "json": one object a line
    metrics_token: str | None = field(default=None, repr=False)  # opens GET /metrics to a scraper
    console_password: str | None = field(default=None, repr=False)  # signs in to the web console (else API_TOKEN)
    webhook_urls: tuple[str, ...] = field(default=(), repr=False)  # (a URL may carry credentials)
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_events: tuple[str, ...] = EVENT_TYPES  # the types delivered to the webhooks
    # Keys stored credentials may still be sealed with (rotation); never used to seal.
    session_encryption_keys_old: tuple[bytes, ...] = field(default=(), repr=False)
    # TRUST_PROXY: whose X-Forwarded-For/-Proto the API believes: "*" (any peer: the platform's
    # proxy is the only way in), one address, or None (nobody's: the headers are dropped).
    trusted_proxy: str | None = None
    # SESSION_ID set: this daemon hosts that one session; unset: every session in the database.
    single_session: bool = False
    max_sessions: int = 100  # MAX_SESSIONS: how many sessions this daemon hosts at most

    @property
    def session_dir(self) -> Path:
        return self.data_dir / "sessions" / self.session_id

    @property
    def store_path(self) -> Path:
        return self.session_dir / "whatsmeow.sqlite3"

    @property
    def embedded_database_path(self) -> Path:
        return self.data_dir / "zapkeep.sqlite3"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Read and check every variable; the first bad one raises ConfigError naming it."""

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        database_url = get("DATABASE_URL")
        if database_url is not None and not database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL must be a postgresql:// URL (or unset for the embedded SQLite database)")

        single_session = get("SESSION_ID") is not None
        session_id = checked_session_id(get("SESSION_ID") or "default", "SESSION_ID")

        pair_phone = get("PAIR_PHONE")
        if pair_phone is not None:
            pair_phone = re.sub(r"[\s()+-]", "", pair_phone)
            if not PHONE_PATTERN.fullmatch(pair_phone):
                raise ConfigError("PAIR_PHONE must be a phone number with country code, 10-15 digits")

        encryption_key = _encryption_key(get("SESSION_ENCRYPTION_KEY"), "SESSION_ENCRYPTION_KEY")
        old_keys = tuple(
            _encryption_key(text, "SESSION_ENCRYPTION_KEY_OLD")
            for text in re.split(r"[\s,]+", get("SESSION_ENCRYPTION_KEY_OLD") or "")
            if text
        )

        log_level = (get("LOG_LEVEL") or "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")

        log_format = (get("LOG_FORMAT") or "text").lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")

        api_token = get("API_TOKEN")
        metrics_token = get("METRICS_TOKEN")

        bot_replies = Path(get("BOT_REPLIES") or SHIPPED_REPLIES)

        lease_ttl = _int_in_range(get("LEASE_TTL_SECONDS"), "LEASE_TTL_SECONDS", default=10, low=3, high=3600)
        lease_renew = _int_in_range(get("LEASE_RENEW_SECONDS"), "LEASE_RENEW_SECONDS", default=3, low=1, high=1200)
        if lease_renew * 2 >= lease_ttl:
            raise ConfigError("LEASE_RENEW_SECONDS must be less than half of LEASE_TTL_SECONDS")

        webhook_urls = tuple(re.split(r"[\s,]+", get("WEBHOOK_URL") or "")) if get("WEBHOOK_URL") else ()
        for url in webhook_urls:
            _check_webhook_url(url)
        webhook_secret = get("WEBHOOK_SECRET")
        if webhook_urls and webhook_secret is None:
            raise ConfigError("WEBHOOK_SECRET must be set with WEBHOOK_URL (every delivery is signed with it)")
        webhook_events = (
            tuple(re.split(r"[\s,]+", get("WEBHOOK_EVENTS") or "")) if get("WEBHOOK_EVENTS") else EVENT_TYPES
        )
        unknown = [name for name in webhook_events if name not in EVENT_TYPES]
        if unknown:
            raise ConfigError(f"WEBHOOK_EVENTS: unknown event {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}")

        trusted_proxy = _trusted_proxy(get("TRUST_PROXY"))

        return cls(
            database_url=database_url,
            session_id=session_id,
            data_dir=Path(get("DATA_DIR") or "./data"),
            port=_int_in_range(get("PORT"), "PORT", default=8080, low=1, high=65535),
            api_token=api_token,
            backup_interval_seconds=_int_in_range(
                get("BACKUP_INTERVAL_SECONDS"), "BACKUP_INTERVAL_SECONDS", default=120, low=5, high=86400
            ),
            session_encryption_key=encryption_key,
            session_encryption_keys_old=old_keys,
            pair_phone=pair_phone,
            bot_replies=bot_replies,
            log_level=log_level,
            log_format=log_format,
            metrics_token=metrics_token,
            console_password=get("CONSOLE_PASSWORD"),
            webhook_urls=webhook_urls,
            webhook_secret=webhook_secret,
            webhook_events=webhook_events,
            lease_ttl_seconds=lease_ttl,
            lease_renew_seconds=lease_renew,
            trusted_proxy=trusted_proxy,
            single_session=single_session,
            max_sessions=_int_in_range(get("MAX_SESSIONS"), "MAX_SESSIONS", default=100, low=1, high=10000),
        )

    def python_log_level(self) -> int:
        return logging.getLevelName(self.log_level)


def _check_webhook_url(url: str) -> None:
    """The message never repeats the URL: its path or query may hold a token."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ConfigError("WEBHOOK_URL holds a URL that does not parse (its port?)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("WEBHOOK_URL must be one or more http:// or https:// URLs, separated by commas")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("WEBHOOK_URL must not carry a user or password (put a token in its path or query)")


def _trusted_proxy(text: str | None) -> str | None:
    """true (any peer), false, or the proxy's IP address."""
    if text is None or text.lower() in ("0", "false", "no", "off"):
        return None
    if text.lower() in ("1", "true", "yes", "on"):
        return "*"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(f"TRUST_PROXY must be true, false or the proxy's IP address, got {text[:60]!r}") from None


def _encryption_key(text: str | None, name: str) -> bytes | None:
    """32 bytes in base64 (standard or URL-safe alphabet). The message never repeats the value."""
    if text is None:
        return None
    try:
        padded = text + "=" * (-len(text) % 4)  # often lost when copied
        key = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name} is not base64; generate a key with: {GENERATE_KEY}") from None
    if len(key) != ENCRYPTION_KEY_BYTES:
        raise ConfigError(
            f"{name} must be {ENCRYPTION_KEY_BYTES} bytes in base64, got {len(key)}; generate one with: {GENERATE_KEY}"
        )
    return key


def _int_in_range(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value
