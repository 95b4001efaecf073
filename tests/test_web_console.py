"""The web console in a real headless browser (Debian's Chromium driven by Playwright) against the
daemon's own assembly behind a real waitress server, with the fake WhatsApp: sign in, the QR, the
scan seen live, a pairing code, a roll-back, a hand-off released, and what must be refused.
Screenshots of every page land in the test's output (``tmp_path/screenshots``)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bot.connection import events
from bot.host import Host, HostTiming
from bot.messages.rules import Rules, load_rules
from bot.process.config import SHIPPED_REPLIES, Config
from bot.runtime import Runtime
from bot.wiring import build_services
from bot.session.state import State
from database import SqliteDatabase
from session_api import console_words, create_app
from session_api.console import sign_in_attempts
from session_api.console_auth import CSRF_HEADER
from session_api.server import ApiServer
from tests.fake_whatsapp import FakeWhatsApp, wait_until
from tests.runtime_helpers import FAST
from tests.synthetic import DEVICE_USER

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TOKEN = "console-test-token-0123456789abcdef"
PASSWORD = "senha-do-console-longa"
CUSTOMER = "5511912345678@s.whatsapp.net"
# As a root process on a machine with no way out: no sandbox, nothing fetched in the background.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Daemon:
    url: str
    runtime: Runtime
    db: SqliteDatabase
    network: FakeWhatsApp
    shots: Path
    clock: list[float]  # the sign-in limiter's: a test moves time on instead of waiting


def console_daemon_parts(
    whatsmeow_template: Path, tmp_path: Path
) -> tuple[Config, SqliteDatabase, FakeWhatsApp, Rules]:
    """What both kinds of daemon below are built from: the configuration, the database, WhatsApp, the rules."""
    config = Config.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "API_TOKEN": TOKEN,
            "CONSOLE_PASSWORD": PASSWORD,
            "BACKUP_INTERVAL_SECONDS": "3600",
        }
    )
    db = SqliteDatabase(tmp_path / "zapkeep.sqlite3")
    db.open()
    return (
        config,
        db,
        FakeWhatsApp(schema_template=whatsmeow_template),
        replace(load_rules(SHIPPED_REPLIES), typing_seconds=0),
    )


@pytest.fixture
def daemon(whatsmeow_template: Path, tmp_path: Path) -> Iterator[Daemon]:
    config, db, network, rules = console_daemon_parts(whatsmeow_template, tmp_path)
    services = build_services(config, db, network.factory, rules, timing=FAST)
    clock = [0.0]
    attempts = sign_in_attempts(clock=lambda: clock[0])  # the daemon's own budgets, on a clock the test moves
    app = create_app(services.runtime, db, outbox=services.outbox, sign_in_attempts=attempts)
    server = ApiServer(app, "127.0.0.1", 0)
    server.start()
    services.start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        yield Daemon(f"http://127.0.0.1:{server.port}", services.runtime, db, network, shots, clock)
    finally:
        server.stop()
        services.stop()
        db.close()


@pytest.fixture
def browser() -> Iterator:
    # Never a skip: these tests guard the console's promises, and a suite that skipped them passed.
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the web console's browser tests need it. Install Debian's chromium "
            "(apt-get install chromium; ./scripts/test.sh does so when run as root) or set CHROMIUM to its path.",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def sign_in(page, daemon: Daemon | HostedDaemon, password: str = PASSWORD) -> None:
    page.goto(daemon.url + "/")
    page.fill("#password", password)
    page.click("#sign-in")


def test_pair_by_qr_then_act_on_the_session_from_the_browser(daemon: Daemon, browser) -> None:
    context = browser.new_context(locale="pt-BR", viewport={"width": 390, "height": 844})  # a phone
    page = context.new_page()
    page.set_default_timeout(15_000)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))

    page.goto(daemon.url + "/")
    page.screenshot(path=daemon.shots / "1-sign-in.png", full_page=True)
    sign_in(page, daemon, password=TOKEN)  # with CONSOLE_PASSWORD set, the API token does not open the console
    assert page.inner_text("#sign-in-error") == "Senha incorreta."

    sign_in(page, daemon)
    page.wait_for_selector("#badge[data-state='qr']")
    page.wait_for_selector("#qr:not([hidden])")
    first_qr = page.get_attribute("#qr", "src")
    assert first_qr.startswith("data:image/png;base64,")
    assert page.inner_text("#badge") == "Aguardando leitura do QR"
    page.wait_for_selector("#qr-countdown:has-text('O código muda em')")  # counted down in the page
    daemon.network.current().rotate_qr()  # whatsmeow's next code replaces the one drawn, without a reload
    page.wait_for_function("src => document.getElementById('qr').src !== src", arg=first_qr)
    page.screenshot(path=daemon.shots / "2-pairing.png", full_page=True)

    page.click("#code-form summary")
    page.fill("#pair-phone", "+55 11 98765-4321")
    page.click("#pairing-code-form button")
    page.wait_for_selector("#pairing-code-box:not([hidden])")
    assert page.inner_text("#pairing-code") == "ABCD-EFGH"

    daemon.network.current().scan_qr()
    page.wait_for_selector("#badge[data-state='connected']")  # pushed by /api/events: no reload
    page.wait_for_selector("#paired-note:not([hidden])")
    assert page.inner_text("#phone") == f"+{DEVICE_USER}"
    assert f"+{DEVICE_USER}" in page.inner_text("#paired-note")
    assert page.inner_text("#badge") == "Conectado"
    page.wait_for_selector("#history tr[data-version='1']")  # the snapshot after pairing
    assert page.inner_text("#webhooks") == "Nenhum WEBHOOK_URL configurado."
    page.screenshot(path=daemon.shots / "3-connected.png", full_page=True)

    clients = len(daemon.network.clients)
    page.click("#history tr[data-version='1'] button")
    page.wait_for_selector("#notice.ok:has-text('Feito.')")
    assert dialogs[-1] == "Voltar a sessão para a versão 1? A conexão é reiniciada."
    assert len(daemon.network.clients) > clients  # stopped, rewritten from version 1, reconnected
    page.wait_for_selector("#badge[data-state='connected']")

    page.click("button[data-action='stop']")  # "Parar conexão": still paired, not connected
    page.wait_for_selector("#badge[data-state='disconnected']")
    assert page.inner_text("#badge") == "Conexão parada pelo operador"
    page.click("button[data-action='start']")
    page.wait_for_selector("#badge[data-state='connected']")

    # A customer asks for a person: the chat is paused; the operator gives it back to the bot.
    client = daemon.network.current()
    client.emit(
        events.IncomingMessage(
            "3EB0CONSOLE1", CUSTOMER, CUSTOMER, "Ana", "quero falar com um atendente", False, False, int(time.time())
        )
    )
    wait_until(lambda: any(c.pause_reason == "handoff" for c in _chats(daemon)), message="the hand-off")
    page.click("nav a[href='/console/messages']")
    item = page.wait_for_selector(f"#paused li[data-chat='{CUSTOMER}']")
    assert "Já chamei um atendente" in page.inner_text("#chats")  # the last message: the bot's hand-off reply
    page.screenshot(path=daemon.shots / "4-messages.png", full_page=True)
    item.query_selector("button").click()
    page.wait_for_selector(f"#paused li[data-chat='{CUSTOMER}']", state="detached")
    assert not any(c.paused_until for c in _chats(daemon) if c.chat_jid == CUSTOMER)

    page.click("#bot-toggle")  # the whole bot paused: replies stop, logging goes on
    page.wait_for_selector("#bot-toggle[data-paused='true']")
    assert daemon.db.replies_paused("default") is True
    context.close()


def _chats(daemon: Daemon) -> list:
    return daemon.db.list_chats("default")


def test_wrong_passwords_and_forged_requests_are_refused(daemon: Daemon, browser) -> None:
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    for attempt in range(5):  # a few wrong passwords, then this client waits
        sign_in(page, daemon, password=f"wrong-{attempt}")
        assert page.inner_text("#sign-in-error") == "Wrong password."
    sign_in(page, daemon, password="wrong-again")
    assert page.inner_text("#sign-in-error") == "Too many wrong attempts. Wait 10 s and try again."
    sign_in(page, daemon)  # over the budget no password is compared: guessing stays slow
    assert "Too many wrong attempts" in page.inner_text("#sign-in-error")

    daemon.clock[0] += 10  # one attempt comes back
    sign_in(page, daemon)
    page.wait_for_selector("#badge")
    page.screenshot(path=daemon.shots / "5-session-en.png", full_page=True)
    assert page.inner_text("nav a.active") == "Session"
    status = page.request.get(daemon.url + "/api/session/status")
    assert status.status == 200  # the cookie opens the API for reading
    forged = page.request.post(daemon.url + "/api/bot/pause", headers={CSRF_HEADER: "forged"})
    missing = page.request.post(daemon.url + "/api/bot/pause")
    assert (forged.status, missing.status) == (403, 403)
    assert "CSRF" in forged.json()["message"]
    assert daemon.db.replies_paused("default") is False
    csrf = page.get_attribute("form[action='/console/sign-out'] input[name='csrf_token']", "value")
    allowed = page.request.post(daemon.url + "/api/bot/pause", headers={CSRF_HEADER: csrf})
    assert allowed.status == 200 and daemon.db.replies_paused("default") is True
    forged_sign_out = page.request.post(daemon.url + "/console/sign-out", form={"csrf_token": "forged"})
    assert forged_sign_out.status == 403
    page.click("#sign-out")
    page.wait_for_selector("#password")
    assert page.request.get(daemon.url + "/api/session/status").status == 401  # signed out for real
    context.close()


def test_every_state_has_a_word_and_a_colour_in_both_languages() -> None:
    """The badge shows W["state_" + state] (else the raw English name) coloured by .state-<name>:
    every state the runtime has, and those the sessions list adds for a session this daemon does
    not run, and nothing else, is named in each language and coloured."""
    css = (Path(console_words.__file__).parent / "static" / "console.css").read_text()
    names = {state.value for state in State} | {"not_running", "running_elsewhere"}
    for lang, words in console_words.WORDS.items():
        named = {key.removeprefix("state_") for key in words if key.startswith("state_")}
        assert named == names, (lang, named ^ names)
        for state in names:
            word = words[f"state_{state}"]
            assert word.strip() and word != state, (lang, state)
    assert console_words.WORDS["pt-BR"]["state_disconnected"] != console_words.WORDS["en"]["state_disconnected"]
    assert set(re.findall(r"\.state-([a-z_]+)", css)) == names


# --- many numbers in one daemon (issue 25) ---------------------------------------------------------


@dataclass
class HostedDaemon:
    url: str
    host: Host
    db: SqliteDatabase
    network: FakeWhatsApp
    shots: Path


@pytest.fixture
def hosted(whatsmeow_template: Path, tmp_path: Path) -> Iterator[HostedDaemon]:
    """The daemon's assembly for many sessions: a Host, its API and console behind waitress."""
    config, db, network, rules = console_daemon_parts(whatsmeow_template, tmp_path)
    host = Host(
        config,
        db,
        network.factory,
        rules,
        host_timing=HostTiming(sync_seconds=0.2, command_wait_seconds=0.1),
        owner_id="console-host",
        timing=FAST,
    )
    server = ApiServer(create_app(host, db), "127.0.0.1", 0)
    server.start()
    host.start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        yield HostedDaemon(f"http://127.0.0.1:{server.port}", host, db, network, shots)
    finally:
        server.stop()
        host.stop()
        db.close()


def hosted_state(daemon: HostedDaemon, session_id: str) -> State | None:
    services = daemon.host.services(session_id)
    return None if services is None else services.runtime.state


def scan(daemon: HostedDaemon, session_id: str) -> None:
    wait_until(lambda: hosted_state(daemon, session_id) is State.QR, message=f"{session_id} shows a QR")
    daemon.network.current(session_id=session_id).scan_qr()
    wait_until(lambda: hosted_state(daemon, session_id) is State.CONNECTED, message=f"{session_id} connected")


def test_the_sessions_page_lists_creates_and_removes_numbers(hosted: HostedDaemon, browser) -> None:
    hosted.host.create_session("vendas")
    scan(hosted, "vendas")  # vendas is connected; default waits for its QR scan
    context = browser.new_context(locale="pt-BR")
    page = context.new_page()
    page.set_default_timeout(15_000)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    sign_in(page, hosted)
    page.wait_for_selector("#badge")

    page.click("nav a[href='/console/sessions']")
    page.wait_for_selector("tr[data-session='default'] .badge[data-state='qr']")
    page.wait_for_selector("tr[data-session='vendas'] .badge[data-state='connected']")
    assert page.inner_text("tr[data-session='default'] .badge") == "Aguardando leitura do QR"
    assert page.inner_text("tr[data-session='vendas'] .badge") == "Conectado"
    assert page.inner_text("tr[data-session='vendas'] .phone") == f"+{DEVICE_USER}"
    assert "console-host" in page.inner_text("tr[data-session='vendas'] .owner")
    assert page.inner_text("tr[data-session='default'] .saved") == "nunca"  # never stored: not paired yet
    assert page.inner_text("tr[data-session='vendas'] .saved") != "nunca"
    # The instances that share the sessions: this one, with what it owns.
    page.wait_for_selector("tr[data-instance='console-host']")
    assert page.inner_text("tr[data-instance='console-host'] .sessions") == "2: default, vendas"
    page.screenshot(path=hosted.shots / "6-sessions.png", full_page=True)

    # "Novo número": created, started, and its own page shows its QR live, then the scan.
    page.fill("#new-session-id", "suporte")
    page.click("#new-session-form button")
    page.wait_for_url("**/?session=suporte")
    assert page.inner_text("#session-id") == "suporte"
    page.wait_for_selector("#badge[data-state='qr']")
    image = page.wait_for_selector("#qr:not([hidden])")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    runtime = hosted.host.services("suporte").runtime
    assert image.get_attribute("data-qr-id") == hashlib.sha256(runtime.qr_code().encode()).hexdigest()[:16]
    page.screenshot(path=hosted.shots / "7-new-number.png", full_page=True)
    hosted.network.current(session_id="suporte").scan_qr()
    page.wait_for_selector("#badge[data-state='connected']")  # suporte's own event stream
    assert hosted_state(hosted, "default") is State.QR  # the page acted on suporte alone

    # Its messages page is its own: a customer of suporte shows there, not on default's.
    client = hosted.network.current(session_id="suporte")
    client.emit(events.IncomingMessage("3EB0SUPORTE1", CUSTOMER, CUSTOMER, "Ana", "oi", False, False, int(time.time())))
    wait_until(lambda: hosted.db.list_chats("suporte"), message="suporte's chat logged")
    page.click("nav a[href='/console/messages?session=suporte']")
    page.wait_for_selector(f"#chats td:has-text('{CUSTOMER}')")
    assert hosted.db.list_chats("default") == []

    # Remove, after a confirmation: gone from the list, the daemon and the database.
    page.click("nav a[href='/console/sessions']")
    page.wait_for_selector("tr[data-session='suporte']")
    page.click("tr[data-session='suporte'] button.danger")
    page.wait_for_selector("tr[data-session='suporte']", state="detached")
    page.wait_for_selector("#notice.ok:has-text('Sessão suporte removida.')")
    assert dialogs[-1].startswith("Remover a sessão suporte?")
    assert hosted.host.hosted() == ["default", "vendas"] and "suporte" not in hosted.db.session_ids()
    assert page.locator("tr[data-session]").count() == 2

    # A number to pair by code instead: its page shows the code WhatsApp gave for it.
    page.fill("#new-session-id", "loja")
    page.fill("#new-pair-phone", "+55 11 98765-4321")
    page.click("#new-session-form button")
    page.wait_for_url("**/?session=loja")
    page.wait_for_selector("#pairing-code-box:not([hidden])")
    assert page.inner_text("#pairing-code") == "ABCD-EFGH"
    assert hosted.db.registered_session("loja").pair_phone == "5511987654321"
    page.screenshot(path=hosted.shots / "8-pairing-code.png", full_page=True)
    context.close()


def test_a_session_page_names_its_session_in_the_address_and_refuses_a_bad_one(hosted: HostedDaemon, browser) -> None:
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    sign_in(page, hosted)
    page.wait_for_selector("#badge")
    assert page.inner_text("#session-id") == "default"
    refused = page.goto(hosted.url + "/?session=../etc")
    assert refused is not None and refused.status == 400
    assert hosted.host.hosted() == ["default"]

    context.close()

    # The default session removed: the console still signs in and lists what is left.
    hosted.host.create_session("vendas")
    assert hosted.host.delete_session("default")
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    sign_in(page, hosted)
    page.goto(hosted.url + "/console/sessions")
    page.wait_for_selector("tr[data-session='vendas'] .badge")
    assert page.locator("tr[data-session]").count() == 1
    context.close()
