"""The shipped rules, table-driven, at fixed clocks in São Paulo."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.messages.rules import ChatContext, decide, load_rules, normalise
from bot.process.config import SHIPPED_REPLIES
from bot.process.errors import ConfigError

RULES = load_rules(SHIPPED_REPLIES)
SP = RULES.timezone
MONDAY_10H = datetime(2026, 11, 23, 10, 0, tzinfo=SP)  # open
MONDAY_22H = datetime(2026, 11, 23, 22, 0, tzinfo=SP)  # closed
SUNDAY_10H = datetime(2026, 11, 22, 10, 0, tzinfo=SP)  # closed all day
SATURDAY_12H = datetime(2026, 11, 21, 12, 59, tzinfo=SP)  # open until 13h
RECENT = ChatContext(last_incoming_at=MONDAY_10H - timedelta(minutes=5), paused_until=None)
NEW = ChatContext(last_incoming_at=None, paused_until=None)


@pytest.mark.parametrize(
    ("text", "chat", "now", "reason", "contains"),
    [
        ("oi", NEW, MONDAY_10H, "greeting", "Olá, Ana! 👋 Bem-vindo(a) à Padaria Pão de Cada Dia"),
        (
            "bom dia",
            ChatContext(MONDAY_10H - timedelta(hours=13), None),
            MONDAY_10H,
            "greeting",
            "1. Horário de funcionamento",
        ),
        ("oi", NEW, MONDAY_22H, "after_hours", "No momento estamos fechados"),
        ("oi", NEW, SUNDAY_10H, "after_hours", "seg a sex 7h-19h, sáb 7h-13h"),
        ("oi", NEW, SATURDAY_12H, "greeting", "Bem-vindo(a)"),
        ("1", RECENT, MONDAY_10H, "menu_item", "🕐 Nosso horário: seg a sex 7h-19h, sáb 7h-13h."),
        ("2", RECENT, MONDAY_10H, "menu_item", "Rua das Flores, 123"),
        (" 3. ", RECENT, MONDAY_10H, "menu_item", "Croissant: R$ 7,50"),
        ("4)", RECENT, MONDAY_10H, "menu_item", "o dia e o horário de retirada"),
        ("5", RECENT, MONDAY_10H, "handoff", "Já chamei um atendente"),
        ("6", RECENT, MONDAY_10H, "fallback", "não entendi"),
        ("MENU", RECENT, MONDAY_10H, "menu", "5. Falar com um atendente"),
        ("Opcoes", RECENT, MONDAY_10H, "menu", "Digite o número"),
        ("Qual o PREÇO do bolo?", RECENT, MONDAY_10H, "rule:precos", "Bolos: a partir de R$ 45,00"),
        ("qual o preco", RECENT, MONDAY_10H, "rule:precos", "Pão francês"),
        ("Aceita CARTAO?", RECENT, MONDAY_10H, "rule:pagamento", "Aceitamos Pix"),
        ("pixel", RECENT, MONDAY_10H, "fallback", "não entendi"),  # whole words only
        ("Cadê o meu pedido???", RECENT, MONDAY_10H, "rule:pedido-em-andamento", "Vou verificar o seu pedido"),
        ("onde esta minha encomenda", RECENT, MONDAY_10H, "rule:pedido-em-andamento", "Vou verificar"),
        ("Muito obrigada!", RECENT, MONDAY_10H, "rule:agradecimento", "Por nada, Ana!"),
        ("quero falar com um HUMANO", RECENT, MONDAY_10H, "handoff", "Já chamei um atendente"),
        ("Falar com alguem", RECENT, MONDAY_10H, "handoff", "atendente"),
        ("xyz", RECENT, MONDAY_10H, "fallback", "Desculpe, Ana, não entendi"),
        ("xyz", ChatContext(MONDAY_22H - timedelta(minutes=5), None), MONDAY_22H, "after_hours", "estamos fechados"),
        ("2", ChatContext(MONDAY_22H - timedelta(minutes=5), None), MONDAY_22H, "menu_item", "Rua das Flores"),
        ("horário", RECENT, MONDAY_10H, "rule:horario", "seg a sex 7h-19h"),
        ("Vocês abrem domingo?", RECENT, MONDAY_10H, "rule:horario", "sáb 7h-13h"),
        ("qual o endereço?", RECENT, MONDAY_10H, "rule:endereco", "Rua das Flores, 123"),
        ("vcs fazem delivery", RECENT, MONDAY_10H, "rule:endereco", "raio de 5 km"),
        ("cadê minha entrega?", RECENT, MONDAY_10H, "rule:pedido-em-andamento", "Vou verificar"),
    ],
)
def test_shipped_rules(text: str, chat: ChatContext, now: datetime, reason: str, contains: str) -> None:
    decision = decide(RULES, text, "Ana", chat, now.astimezone(UTC))
    assert decision.reason == reason
    assert contains in decision.reply


def test_handoff_pauses_the_chat_until_it_expires() -> None:
    decision = decide(RULES, "atendente", "Ana", RECENT, MONDAY_10H)
    assert decision.pause_until == MONDAY_10H + timedelta(minutes=60)
    paused = ChatContext(MONDAY_10H, decision.pause_until)
    during = decide(RULES, "oi??", "Ana", paused, MONDAY_10H + timedelta(minutes=59))
    assert during.reply is None and during.reason == "paused"
    after = decide(RULES, "1", "Ana", paused, MONDAY_10H + timedelta(minutes=61))
    assert after.reason == "menu_item" and after.reply


def test_a_missing_push_name_reads_naturally() -> None:
    assert decide(RULES, "oi", "  ", NEW, MONDAY_10H).reply.startswith("Olá, cliente!")


def test_normalise_ignores_case_and_accents() -> None:
    assert normalise("  PREÇO Ação Pão ") == normalise("preco acao pao") == "preco acao pao"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('business = "Padaria', "business = 3 #"), "business must be a non-empty text"),
        (
            lambda t: t.replace('regex = "(cad', 'regex = "((cad'),
            "[[rules]] #4 ('pedido-em-andamento'): regex does not compile",
        ),
        (lambda t: t.replace('timezone = "America/Sao_Paulo"', 'timezone = "Mars/Olympus"'), "not a known time zone"),
        (
            lambda t: t.replace('saturday = "07:00-13:00"', 'saturday = "7-13"'),
            "[hours] saturday: '7-13' is not a range",
        ),
        (lambda t: t.replace("Por nada, {name}!", "Por nada, {nome}!"), "unknown placeholder {nome}"),
        (lambda t: t.replace("[fallback]", "[fallback_typo]"), "missing table [fallback]"),
        (lambda t: t.replace('handoff = ["audio"', 'handoff = [["audio"]'), "[media] handoff must be a list of"),
        (lambda t: t.replace('ignore = ["sticker"]', 'ignore = ["stickers"]'), "[media] ignore must be a list of"),
        (
            lambda t: t.replace('keywords = ["obrigado", "obrigada", "valeu", "agradeço"]', 'keywords = "obrigado"'),
            "[[rules]] #3 ('agradecimento'): keywords must be a list",
        ),
        (lambda t: t.replace("pause_minutes = 60", 'pause_minutes = "sessenta"'), "pause_minutes must be a number"),
        (lambda t: t + "\n[broken\n", "line"),
    ],
)
def test_a_bad_rules_file_is_refused_naming_the_rule_or_line(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "rules.toml"
    original = SHIPPED_REPLIES.read_text(encoding="utf-8")
    changed = edit(original)
    assert changed != original
    path.write_text(changed, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_rules(path)
    assert str(error.value).startswith("BOT_REPLIES: ") and message in str(error.value)


def test_after_hours_a_chat_gets_the_long_block_once_then_a_short_line() -> None:
    chat, replies = NEW, []
    for n, text in enumerate(["oi", "alguém aí?", "preciso de um bolo", "???"]):
        now = MONDAY_22H + timedelta(minutes=n)
        decision = decide(RULES, text, "Ana", chat, now)
        replies.append(decision.reply or "")
        chat = ChatContext(now, None, decision.reason, now)
    assert len(replies[0].splitlines()) >= 8 and "No momento estamos fechados" in replies[0]
    assert all(len(reply.splitlines()) == 1 and "fechados agora" in reply for reply in replies[1:])
    later = MONDAY_22H + timedelta(hours=2)  # long after: the whole block again
    assert decide(RULES, "oi?", "Ana", ChatContext(later, None, "after_hours", MONDAY_22H), later).reply == replies[0]


@pytest.mark.parametrize(
    ("kind", "contains", "hands_off"),
    [
        ("audio", "Recebi seu áudio", True),
        ("image", "Recebi sua imagem", True),
        ("document", "Recebi seu documento", True),
        ("location", "localização", True),
        ("poll", "só consigo ler texto", False),
        ("other", "só consigo ler texto", False),
    ],
)
def test_what_is_not_text_gets_its_own_reply(kind: str, contains: str, hands_off: bool) -> None:
    decision = decide(RULES, "", "Ana", RECENT, MONDAY_10H, kind)
    assert decision.reason == f"media:{kind}" and contains in (decision.reply or "")
    assert (decision.pause_until is not None) is hands_off
    assert "não entendi" not in (decision.reply or "")


def test_a_photo_with_a_caption_is_answered_as_text_and_stickers_are_ignored() -> None:
    assert decide(RULES, "quanto custa esse bolo?", "Ana", RECENT, MONDAY_10H, "image").reason == "rule:precos"
    assert RULES.ignores("sticker") and not RULES.ignores("audio")


def test_a_rules_file_from_before_media_replies_still_loads_and_answers_media_with_its_fallback(tmp_path: Path) -> None:
    text = SHIPPED_REPLIES.read_text(encoding="utf-8")
    start, end = text.index("[media]"), text.index("[repeat]")
    path = tmp_path / "old.toml"
    path.write_text(text[:start] + text[end:], encoding="utf-8")
    old = load_rules(path)
    assert decide(old, "", "Ana", RECENT, MONDAY_10H, "audio").reason == "fallback"
