// The console's pages: they call the JSON API as the signed-in browser (the session cookie, and
// the CSRF token in X-CSRF-Token for every change) and follow the session's event stream. Text is
// always set with textContent: nothing the daemon or a customer wrote is ever parsed as HTML.
// The session and messages pages show one session (the page's ?session=, else the default one)
// through its routes, /api/sessions/<id>/...; the sessions page lists and manages every number.
"use strict";

const ctx = JSON.parse(document.body.dataset.context);
const W = ctx.words;
const SID = ctx.sessionId;
const ON = (suffix = "", sessionId = SID) => `/api/sessions/${encodeURIComponent(sessionId)}${suffix}`;
const $ = (id) => document.getElementById(id);
const fmt = (key, values = {}) => (W[key] || key).replace(/\{(\w+)\}/g, (_, name) => values[name] ?? "");
const when = (iso) => (iso ? new Date(iso).toLocaleString(ctx.lang) : W.never);

async function api(method, path, body) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") options.headers["X-CSRF-Token"] = ctx.csrfToken;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = {};
  try {
    data = await response.json();
  } catch (_) {
    /* not JSON: the status says enough */
  }
  if (response.status === 401) window.location.assign("/");
  if (!response.ok) throw new Error(data.message || `HTTP ${response.status}`);
  return data;
}

function notify(text, ok = true) {
  const notice = $("notice");
  notice.textContent = text;
  notice.className = ok ? "notice ok" : "notice error";
  notice.hidden = false;
}

async function act(work) {
  $("notice").hidden = true; // what an earlier action said is not this one's result
  try {
    const message = await work();
    notify(message || W.done);
  } catch (error) {
    notify(fmt("failed", { reason: error.message }), false);
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function button(label, onClick, className) {
  const b = document.createElement("button");
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function emptyRow(body, columns) {
  if (body.children.length) return;
  const row = document.createElement("tr");
  const td = cell(row, W.empty, "muted");
  td.colSpan = columns;
  body.appendChild(row);
}

function duration(seconds) {
  const s = Math.floor(seconds || 0);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return (d ? `${d}d ` : "") + `${h}h ${String(m).padStart(2, "0")}m`;
}

function badge(element, state) {
  element.textContent = W[`state_${state}`] || state;
  element.className = `badge state-${state}`;
  element.dataset.state = state;
}

function follow(onStatus) {
  const live = $("live");
  const source = new EventSource(ON("/events"));
  source.addEventListener("status", (event) => {
    live.className = "live on";
    live.title = W.live;
    onStatus(JSON.parse(event.data));
  });
  source.onerror = () => {
    live.className = "live";
    live.title = W.offline;
    if (source.readyState === EventSource.CLOSED) {
      // Refused (e.g. 503: every stream slot taken): EventSource gives up for good; we do not.
      setTimeout(() => follow(onStatus), 5000);
    }
  };
}

// --- the session page -------------------------------------------------------------------------

function sessionPage() {
  let previousState = null;
  let qrId = null;
  let qrExpiresAt = null;
  let historyVersion = undefined;

  $("session-id").textContent = SID;

  function render(s) {
    badge($("badge"), s.state);
    $("phone").textContent = s.phone ? `+${s.phone}` : "—";
    $("push-name").textContent = s.push_name || "—";
    $("device").textContent = s.jid || "—";
    $("uptime").textContent = duration(s.uptime_seconds);
    $("reconnects").textContent = s.reconnect_count === undefined ? "—" : String(s.reconnect_count);
    $("last-error").textContent = s.last_error || s.boot_error || W.none;
    // The readiness sentence is the API's (English): the badge and the last error say it in every language.
    $("readiness").textContent = ctx.lang === "en" && s.readiness ? s.readiness.reason || "" : "";
    const lease = s.lease;
    let owner = W.lease_none;
    if (s.owns_session) owner = W.lease_this;
    else if (lease && lease.held) owner = `${fmt("lease_other", { owner: lease.owner_id })} — ${W.standby}`;
    $("lease").textContent = s.owner_id ? `${owner} (${s.owner_id})` : owner;
    const stored = s.last_mirrored_at || s.last_backup_at;
    const lag = stored ? Math.max(0, (Date.now() - new Date(stored).getTime()) / 1000) : null;
    $("last-backup").textContent = stored
      ? `${when(stored)} (${W.lag} ${duration(lag)}, ${s.mirror_pending_changes} ${W.pending})`
      : W.never;

    const pairing = s.state === "qr";
    $("pairing").hidden = !pairing;
    qrExpiresAt = s.qr_expires_at ? new Date(s.qr_expires_at) : null;
    if (pairing && s.qr_id && s.qr_id !== qrId) {
      qrId = s.qr_id;
      api("GET", ON("/qr"))
        .then((data) => {
          const img = $("qr");
          img.src = data.image;
          img.dataset.qrId = qrId;
          img.hidden = false;
          $("qr-waiting").hidden = true;
        })
        .catch(() => {});
    }
    if (!s.qr_id) {
      qrId = null;
      $("qr").hidden = true;
      $("qr-waiting").hidden = false;
    }
    if (s.pairing_code) {
      $("pairing-code").textContent = s.pairing_code;
      $("pairing-code-box").hidden = false;
      $("code-form").open = true; // a session created with a number to pair: its code, not the QR, is the way
    }
    if (previousState === "qr" && s.state === "connected") {
      const note = $("paired-note");
      note.textContent = fmt("paired", { phone: s.phone ? `+${s.phone}` : s.jid });
      note.hidden = false;
    }
    previousState = s.state;
    if (s.last_backup_version !== historyVersion) {
      historyVersion = s.last_backup_version;
      loadHistory();
    }
  }

  setInterval(() => {
    const countdown = $("qr-countdown");
    if (!qrExpiresAt || $("pairing").hidden) {
      countdown.textContent = "";
      return;
    }
    const seconds = Math.max(0, Math.round((qrExpiresAt.getTime() - Date.now()) / 1000));
    countdown.textContent = fmt("qr_expires", { seconds });
  }, 500);

  async function loadHistory() {
    const data = await api("GET", ON());
    const body = $("history");
    body.replaceChildren();
    for (const entry of data.session.history || []) {
      const row = document.createElement("tr");
      row.dataset.version = entry.version;
      cell(row, String(entry.version));
      cell(row, when(entry.taken_at));
      cell(row, `${Math.round(entry.size_bytes / 1024)} KB`);
      cell(row, entry.checksum.replace("sha256:", "").slice(0, 12), "mono");
      const actions = cell(row, "");
      actions.appendChild(
        button(W.rollback, () => {
          if (!window.confirm(fmt("confirm_rollback", { version: entry.version }))) return;
          act(async () => {
            await api("POST", ON("/restore"), { version: entry.version });
          });
        }),
      );
      body.appendChild(row);
    }
    emptyRow(body, 5);
  }

  const simple = {
    backup: () => api("POST", ON("/backup"), {}),
    reconnect: () => api("POST", ON("/reconnect"), {}),
    stop: () => api("POST", ON("/stop"), {}),
    start: () => api("POST", ON("/start"), {}),
    logout: () => api("POST", ON("/logout"), {}),
  };
  for (const element of document.querySelectorAll("[data-action]")) {
    const action = element.dataset.action;
    element.addEventListener("click", () => {
      if (action === "export") return act(download);
      if (action === "logout" && !window.confirm(W.confirm_logout)) return;
      act(async () => {
        await simple[action]();
      });
    });
  }

  async function download() {
    const data = await api("GET", ON("/restore"));
    const blob = new Blob([JSON.stringify(data.session_data)], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `zapkeep-${SID}-v${data.version}.json`;
    link.click();
    URL.revokeObjectURL(link.href);
  }

  $("import-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (!file || !window.confirm(W.confirm_import)) return;
    act(async () => {
      const text = await file.text();
      await api("POST", ON("/backup"), { session_data: text });
    });
  });

  $("pairing-code-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(async () => {
      const data = await api("POST", ON("/pairing-code"), { phone: $("pair-phone").value });
      $("pairing-code").textContent = data.pairing_code;
      $("pairing-code-box").hidden = false;
      return `${W.code_is} ${data.pairing_code}`;
    });
  });

  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(async () => {
      await api("POST", ON("/send"), { to: $("send-to").value, message: $("send-text").value });
    });
  });

  async function loadWebhooks() {
    const data = await api("GET", ON("/webhooks"));
    const body = $("webhooks");
    body.replaceChildren();
    for (const endpoint of data.endpoints) {
      const row = document.createElement("tr");
      cell(row, endpoint.url, "mono");
      cell(row, String(endpoint.delivered));
      cell(row, String(endpoint.pending));
      const failing = endpoint.failing_since !== null;
      cell(
        row,
        failing ? fmt("failing", { since: when(endpoint.failing_since), error: endpoint.last_error }) : W.healthy,
        failing ? "error" : "",
      );
      body.appendChild(row);
    }
    if (!body.children.length) {
      const row = document.createElement("tr");
      cell(row, W.no_webhooks, "muted").colSpan = 4;
      body.appendChild(row);
    }
  }

  api("GET", ON()).then((data) => render(data.session));
  loadWebhooks().catch(() => {});
  setInterval(() => loadWebhooks().catch(() => {}), 5000);
  follow(render);
}

// --- the messages page ------------------------------------------------------------------------

function messagesPage() {
  async function loadBot() {
    const data = await api("GET", ON("/bot"));
    $("bot-state").textContent = data.replies_paused ? W.bot_off : W.bot_on;
    const toggle = $("bot-toggle");
    toggle.textContent = data.replies_paused ? W.resume_bot : W.pause_bot;
    toggle.dataset.paused = String(data.replies_paused);
  }

  $("bot-toggle").addEventListener("click", () => {
    const paused = $("bot-toggle").dataset.paused === "true";
    act(async () => {
      await api("POST", ON(`/bot/${paused ? "resume" : "pause"}`));
      await loadBot();
    });
  });

  async function loadChats() {
    const data = await api("GET", ON("/chats"));
    const body = $("chats");
    const paused = $("paused");
    body.replaceChildren();
    paused.replaceChildren();
    for (const chat of data.chats) {
      const row = document.createElement("tr");
      cell(row, chat.chat);
      cell(row, chat.last_message.text);
      cell(row, String(chat.unanswered));
      cell(row, "").appendChild(button(W.open_chat, () => openChat(chat.chat)));
      body.appendChild(row);
      if (chat.paused) {
        const item = document.createElement("li");
        item.dataset.chat = chat.chat;
        const label = document.createElement("span");
        label.textContent = `${chat.chat} — ${fmt("paused_until", { until: when(chat.paused_until) })} `;
        item.appendChild(label);
        item.appendChild(
          button(W.release, () =>
            act(async () => {
              await api("POST", ON(`/chats/${encodeURIComponent(chat.chat)}/release`));
              await loadChats();
            }),
          ),
        );
        paused.appendChild(item);
      }
    }
    emptyRow(body, 4);
    if (!paused.children.length) {
      const item = document.createElement("li");
      item.className = "muted";
      item.textContent = W.no_paused;
      paused.appendChild(item);
    }
  }

  async function openChat(jid) {
    const data = await api("GET", ON(`/chats/${encodeURIComponent(jid)}/messages`));
    $("chat-title").textContent = jid;
    const list = $("chat-list");
    list.replaceChildren();
    for (const message of data.messages) {
      const item = document.createElement("li");
      item.className = message.direction === "in" ? "in" : "out";
      item.textContent = `${when(message.created_at)} · ${message.direction === "in" ? W.incoming : W.outgoing} · ${message.text}`;
      list.appendChild(item);
    }
    $("chat-messages").hidden = false;
  }

  async function loadOutbox() {
    const data = await api("GET", ON("/outbox"));
    const body = $("outbox");
    body.replaceChildren();
    for (const message of data.messages) {
      const row = document.createElement("tr");
      cell(row, message.chat);
      cell(row, message.text);
      cell(row, message.status, `status-${message.status}`);
      cell(row, message.last_error || "");
      body.appendChild(row);
    }
    emptyRow(body, 4);
  }

  const refresh = () => Promise.all([loadBot(), loadChats(), loadOutbox()]).catch((error) => notify(error.message, false));
  refresh();
  setInterval(refresh, 5000);
  $("live").hidden = true; // this page polls: it takes none of the daemon's few event streams
}

// --- the sessions page ------------------------------------------------------------------------

function sessionsPage() {
  const pageOf = (sessionId) => `/?session=${encodeURIComponent(sessionId)}`;

  async function loadSessions() {
    const data = await api("GET", "/api/sessions");
    const body = $("sessions");
    body.replaceChildren();
    for (const s of data.sessions) {
      const row = document.createElement("tr");
      row.dataset.session = s.session_id;
      const name = document.createElement("a");
      name.href = pageOf(s.session_id);
      name.textContent = s.session_id;
      cell(row, "").appendChild(name);
      const state = document.createElement("span");
      badge(state, s.state);
      cell(row, "").appendChild(state);
      cell(row, s.phone ? `+${s.phone}` : "—", "phone");
      cell(row, s.owner ? (s.hosted_here ? `${W.lease_this} (${s.owner})` : s.owner) : W.lease_none, "owner");
      cell(row, when(s.last_mirrored_at), "saved");
      cell(row, "").appendChild(
        button(
          W.remove,
          () => {
            if (!window.confirm(fmt("confirm_remove", { session: s.session_id }))) return;
            act(async () => {
              await api("DELETE", ON("", s.session_id));
              await loadSessions();
              return fmt("removed", { session: s.session_id });
            });
          },
          "danger",
        ),
      );
      body.appendChild(row);
    }
    if (!body.children.length) {
      const row = document.createElement("tr");
      cell(row, W.no_sessions, "muted").colSpan = 6;
      body.appendChild(row);
    }
  }

  async function loadInstances() {
    const data = await api("GET", "/api/instances");
    const body = $("instances");
    body.replaceChildren();
    for (const i of data.instances) {
      const row = document.createElement("tr");
      row.dataset.instance = i.instance_id;
      cell(row, i.this_instance ? `${i.instance_id} (${W.this_instance})` : i.instance_id);
      cell(row, fmt("seconds_ago", { seconds: Math.round(i.heartbeat_age_seconds) }));
      cell(row, `${i.sessions_owned}: ${i.sessions.join(", ") || "—"}`, "sessions");
      body.appendChild(row);
    }
  }

  // "Novo número": created and started, then its page, where its QR (or pairing code) shows live.
  $("new-session-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const sessionId = $("new-session-id").value.trim();
    const phone = $("new-pair-phone").value.trim();
    act(async () => {
      await api("POST", "/api/sessions", phone ? { session_id: sessionId, pair_phone: phone } : { session_id: sessionId });
      window.location.assign(pageOf(sessionId));
    });
  });

  const refresh = () =>
    Promise.all([loadSessions(), loadInstances()]).catch((error) => notify(fmt("failed", { reason: error.message }), false));
  refresh();
  setInterval(refresh, 3000);
  $("live").hidden = true; // this page polls: it takes none of the daemon's few event streams
}

if (document.body.dataset.page === "session") sessionPage();
if (document.body.dataset.page === "messages") messagesPage();
if (document.body.dataset.page === "sessions") sessionsPage();
