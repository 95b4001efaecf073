"""The chatbot's rules: a TOML file in, one decision per customer message out. Pure: no I/O
beyond reading the file, no clock of its own (the caller passes "now")."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bot.process.errors import ConfigError

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_NAMES_PT = ("seg", "ter", "qua", "qui", "sex", "sáb", "dom")
_RANGE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
_PLACEHOLDERS = {"business", "name", "menu", "hours"}
# What customers send besides text; "other" covers the rest (and must have a reply).
MEDIA_KINDS = ("audio", "image", "video", "document", "sticker", "location", "contact", "poll", "other")
SHORTENED = ("after_hours", "fallback")  # decisions whose long block is not repeated to a chat


def normalise(text: str) -> str:
    """Case- and accent-insensitive form: 'Preço' and 'preco' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


@dataclass(frozen=True)
class MenuItem:
    title: str
    reply: str | None
    handoff: bool


@dataclass(frozen=True)
class Rule:
    name: str
    keywords: tuple[str, ...]
    pattern: re.Pattern[str] | None
    reply: str


@dataclass(frozen=True)
class Rules:
    business: str
    greeting: str
    greeting_after_silence: timedelta
    timezone: ZoneInfo
    hours: tuple[tuple[tuple[time, time], ...], ...]  # per weekday, Monday first
    after_hours: str
    menu_header: str
    menu_keywords: tuple[str, ...]
    menu_items: tuple[MenuItem, ...]
    handoff_keywords: tuple[str, ...]
    handoff_reply: str
    handoff_pause: timedelta
    operator_pause: timedelta
    rules: tuple[Rule, ...]
    fallback: str
    mark_read: bool
    typing_seconds: float
    reply_expiry: timedelta
    media_replies: Mapping[str, str]  # message kind (audio, image...) -> reply; "other" for the rest; {}: fallback
    media_handoff: frozenset[str]  # kinds a person must look at: the bot then steps back
    media_ignored: frozenset[str]  # kinds never answered (e.g. stickers)
    repeat_window: timedelta  # a long block goes to a chat at most once this long...
    short_replies: Mapping[str, str]  # ...then these (by decision reason: after_hours, fallback)

    def ignores(self, kind: str) -> bool:
        return kind in self.media_ignored

    def is_open(self, now: datetime) -> bool:
        local = now.astimezone(self.timezone)
        return any(start <= local.time() < end for start, end in self.hours[local.weekday()])

    def hours_text(self) -> str:
        """In words, consecutive days with the same hours grouped: "seg a sex 7h-19h, sáb 7h-13h"."""
        groups: list[tuple[int, int, tuple[tuple[time, time], ...]]] = []
        for day, ranges in enumerate(self.hours):
            if groups and groups[-1][2] == ranges and groups[-1][1] == day - 1:
                groups[-1] = (groups[-1][0], day, ranges)
            else:
                groups.append((day, day, ranges))
        parts = []
        for first, last, ranges in groups:
            if not ranges:
                continue
            days = DAY_NAMES_PT[first] if first == last else f"{DAY_NAMES_PT[first]} a {DAY_NAMES_PT[last]}"
            parts.append(f"{days} {' e '.join(f'{_clock(start)}-{_clock(end)}' for start, end in ranges)}")
        return ", ".join(parts) if parts else "sem horário definido"

    def menu_text(self) -> str:
        lines = [self.menu_header] + [f"{n}. {item.title}" for n, item in enumerate(self.menu_items, start=1)]
        return "\n".join(lines)


@dataclass(frozen=True)
class ChatContext:
    """What the engine knows of the chat before this message."""

    last_incoming_at: datetime | None
    paused_until: datetime | None
    last_reply_reason: str | None = None
    last_reply_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    reply: str | None
    reason: str  # greeting, after_hours, menu, menu_item, rule:<name>, handoff, fallback, paused
    pause_until: datetime | None = None


def decide(rules: Rules, text: str, push_name: str, chat: ChatContext, now: datetime, kind: str = "text") -> Decision:
    """The reply (if any) to one customer message (a media message's caption counts as its text)."""
    if chat.paused_until is not None and chat.paused_until > now:
        return Decision(None, "paused", chat.paused_until)
    decision = _decide(rules, text, push_name, chat, now, kind)
    short = rules.short_replies.get(decision.reason)
    recently = chat.last_reply_at is not None and now - chat.last_reply_at < rules.repeat_window
    if short is not None and recently and chat.last_reply_reason == decision.reason:
        return replace(decision, reply=short.format_map(_values(rules, push_name)))
    return decision


def _values(rules: Rules, push_name: str) -> dict[str, str]:
    return {
        "business": rules.business,
        "name": push_name.strip() or "cliente",
        "menu": rules.menu_text(),
        "hours": rules.hours_text(),
    }


def _decide(rules: Rules, text: str, push_name: str, chat: ChatContext, now: datetime, kind: str) -> Decision:
    values = _values(rules, push_name)
    reply_template = rules.media_replies.get(kind, rules.media_replies.get("other"))
    if kind != "text" and not text.strip() and reply_template is not None:
        reply = reply_template.format_map(values)
        handoff = now + rules.handoff_pause if kind in rules.media_handoff else None
        return Decision(reply, f"media:{kind}", handoff)
    is_open = rules.is_open(now)
    silent_long = chat.last_incoming_at is None or now - chat.last_incoming_at >= rules.greeting_after_silence
    words = normalise(text)

    if _matches_any(words, rules.handoff_keywords):
        return _handoff(rules, values, now)
    if silent_long:
        template = rules.greeting if is_open else rules.after_hours
        return Decision(template.format_map(values), "greeting" if is_open else "after_hours")
    if item := _menu_choice(rules, words):
        if item.handoff:
            return _handoff(rules, values, now)
        return Decision((item.reply or "").format_map(values), "menu_item")
    if _matches_any(words, rules.menu_keywords):
        return Decision(rules.menu_text(), "menu")
    for rule in rules.rules:
        if _matches_any(words, rule.keywords) or (rule.pattern is not None and rule.pattern.search(text)):
            return Decision(rule.reply.format_map(values), f"rule:{rule.name}")
    if not is_open:
        return Decision(rules.after_hours.format_map(values), "after_hours")
    return Decision(rules.fallback.format_map(values), "fallback")


def _clock(moment: time) -> str:
    if moment >= time(23, 59):
        return "24h"
    return f"{moment.hour}h{moment.minute:02d}" if moment.minute else f"{moment.hour}h"


def _handoff(rules: Rules, values: Mapping[str, str], now: datetime) -> Decision:
    return Decision(rules.handoff_reply.format_map(values), "handoff", now + rules.handoff_pause)


def _menu_choice(rules: Rules, words: str) -> MenuItem | None:
    match = re.fullmatch(r"(\d{1,2})[.)]?", words)
    if match is None:
        return None
    number = int(match[1])
    return rules.menu_items[number - 1] if 1 <= number <= len(rules.menu_items) else None


def _matches_any(words: str, keywords: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", words) for keyword in keywords)


# --- loading and validation -------------------------------------------------------------------


def load_rules(path: Path) -> Rules:
    """Parse and check the rules file; ConfigError names the file and the line or rule at fault."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"BOT_REPLIES: no rules file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"BOT_REPLIES: {path}: {exc}") from None
    try:
        return _build(raw)
    except _RuleError as exc:
        raise ConfigError(f"BOT_REPLIES: {path}: {exc}") from None


class _RuleError(ValueError):
    pass


def _build(raw: dict[str, Any]) -> Rules:
    greeting = _table(raw, "greeting")
    hours = _table(raw, "hours")
    menu = _table(raw, "menu")
    handoff = _table(raw, "handoff")
    fallback = _table(raw, "fallback")
    behaviour = _table(raw, "behaviour", required=False)
    media = _table(raw, "media", required=False)  # rules files written before it: the fallback answers
    repeat = _table(raw, "repeat", required=False)
    try:
        timezone = ZoneInfo(_text(hours, "timezone", "[hours]"))
    except (ZoneInfoNotFoundError, ValueError):
        raise _RuleError(f"[hours] timezone {hours.get('timezone')!r} is not a known time zone") from None
    items = menu.get("items")
    if not isinstance(items, list) or not items:
        raise _RuleError("[menu] needs at least one [[menu.items]]")
    menu_items = []
    for number, item in enumerate(items, start=1):
        where = f"[[menu.items]] #{number}"
        if not isinstance(item, dict):
            raise _RuleError(f"{where} must be a table")
        is_handoff = item.get("handoff", False) is True
        reply = None if is_handoff else _template(item, "reply", where)
        menu_items.append(MenuItem(_text(item, "title", where), reply, is_handoff))
    rules = []
    for number, rule in enumerate(raw.get("rules", []), start=1):
        name = rule.get("name") if isinstance(rule, dict) else None
        where = f"[[rules]] #{number} ({name!r})" if name else f"[[rules]] #{number}"
        if not isinstance(rule, dict) or not isinstance(name, str) or not name:
            raise _RuleError(f"{where} needs a name")
        keywords = _keywords(rule, "keywords", where, required=False)
        pattern = None
        if "regex" in rule:
            try:
                pattern = re.compile(_text(rule, "regex", where), re.IGNORECASE)
            except re.error as exc:
                raise _RuleError(f"{where}: regex does not compile: {exc}") from None
        if not keywords and pattern is None:
            raise _RuleError(f"{where} needs keywords or a regex")
        rules.append(Rule(name, keywords, pattern, _template(rule, "reply", where)))
    return Rules(
        business=_text(raw, "business", "the top level"),
        greeting=_template(greeting, "text", "[greeting]"),
        greeting_after_silence=timedelta(hours=_number(greeting, "after_silence_hours", "[greeting]", 12)),
        timezone=timezone,
        hours=tuple(_day(hours, day) for day in DAYS),
        after_hours=_template(hours, "after_hours", "[hours]"),
        menu_header=_text(menu, "header", "[menu]"),
        menu_keywords=_keywords(menu, "keywords", "[menu]", required=False),
        menu_items=tuple(menu_items),
        handoff_keywords=_keywords(handoff, "keywords", "[handoff]", required=True),
        handoff_reply=_template(handoff, "reply", "[handoff]"),
        handoff_pause=timedelta(minutes=_number(handoff, "pause_minutes", "[handoff]", 60)),
        operator_pause=timedelta(minutes=_number(handoff, "operator_pause_minutes", "[handoff]", 30)),
        rules=tuple(rules),
        fallback=_template(fallback, "text", "[fallback]"),
        mark_read=behaviour.get("mark_read", True) is True,
        typing_seconds=_number(behaviour, "typing_seconds", "[behaviour]", 1.0, high=10),
        reply_expiry=timedelta(minutes=_number(behaviour, "reply_expiry_minutes", "[behaviour]", 60, low=1)),
        media_replies={
            kind: _template(media, kind, "[media]")
            for kind in MEDIA_KINDS
            if kind in media or (media and kind == "other")
        },
        media_handoff=_kinds(media, "handoff"),
        media_ignored=_kinds(media, "ignore"),
        repeat_window=timedelta(minutes=_number(repeat, "window_minutes", "[repeat]", 30)),
        short_replies={reason: _template(repeat, reason, "[repeat]") for reason in SHORTENED if reason in repeat},
    )


def _kinds(media: dict[str, Any], key: str) -> frozenset[str]:
    value = media.get(key, [])
    if not isinstance(value, list) or not all(isinstance(kind, str) and kind in MEDIA_KINDS for kind in value):
        raise _RuleError(f"[media] {key} must be a list of message kinds ({', '.join(MEDIA_KINDS)})")
    return frozenset(value)


def _table(raw: dict[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    value = raw.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _RuleError(f"missing table [{name}]")
    return value


def _text(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _RuleError(f"{where}: {key} must be a non-empty text")
    return value


def _template(table: dict[str, Any], key: str, where: str) -> str:
    value = _text(table, key, where)
    unknown = {name for name in re.findall(r"\{(\w*)\}", value)} - _PLACEHOLDERS
    if unknown:
        raise _RuleError(
            f"{where}: {key} uses unknown placeholder {{{sorted(unknown)[0]}}} "
            f"(known: {', '.join('{' + p + '}' for p in sorted(_PLACEHOLDERS))})"
        )
    try:
        value.format_map(dict.fromkeys(_PLACEHOLDERS, ""))
    except (ValueError, IndexError) as exc:
        raise _RuleError(f"{where}: {key} is not a valid template ({exc}); write {{{{ and }}}} for braces") from None
    return value


def _keywords(table: dict[str, Any], key: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(k, str) and k.strip() for k in value):
        raise _RuleError(f"{where}: {key} must be a list of non-empty texts")
    if required and not value:
        raise _RuleError(f"{where}: {key} must not be empty")
    return tuple(normalise(k) for k in value)


def _number(table: dict[str, Any], key: str, where: str, default: float, *, low: float = 0, high: float = 1e6) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _RuleError(f"{where}: {key} must be a number between {low:g} and {high:g}")
    return float(value)


def _day(hours: dict[str, Any], day: str) -> tuple[tuple[time, time], ...]:
    value = hours.get(day, "")
    if not isinstance(value, str):
        raise _RuleError(f'[hours] {day} must be a text like "08:00-18:00"')
    ranges = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise _RuleError(f'[hours] {day}: {part!r} is not a range like "08:00-18:00"')
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if not (h1 < 24 and h2 <= 24 and m1 < 60 and m2 < 60):
            raise _RuleError(f"[hours] {day}: {part!r} is not a valid time range")
        start, end = time(h1, m1), (time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2))
        if end <= start:
            raise _RuleError(f"[hours] {day}: {part!r} ends before it starts")
        ranges.append((start, end))
    return tuple(ranges)
