// fedpersona's local web app: chat, feedback, profile, privacy and model pages over the
// device API (client/api/app.py) on 127.0.0.1.
//
// Rules this file keeps (the server's Content-Security-Policy enforces the first two):
// * no inline script or style, and no element.style: looks change through classes and the
//   hidden attribute only;
// * every piece of server or model data goes into the page as text (textContent, text nodes
//   and attribute values), never parsed as HTML (no HTML-setting property or call appears here);
// * the API token lives in sessionStorage (gone when the browser closes) and is sent only as an
//   Authorization header on same-origin fetches; never in a URL and never in a cookie
//   (credentials: "omit");
// * the chats live in the device's encrypted store (GET/PUT /v1/chats), never in the
//   browser's storage: the retention purge and `forget` reach them there.
"use strict";

const TOKEN_KEY = "fedpersona.token";
const CHATS_KEY = "fedpersona.chats"; // where earlier versions kept plain-text chats
const SAVE_DELAY_MS = 400; // chats are written to the store at most this often

// What earlier versions left in this browser's persistent storage goes at once.
localStorage.removeItem(TOKEN_KEY);
localStorage.removeItem(CHATS_KEY);
const OPTIONS_KEY = "fedpersona.options";
const PAGES = ["chat", "profile", "privacy", "model"];

const $ = (id) => document.getElementById(id);

/** A new element: attrs are set as attributes (a boolean true sets an empty attribute, false
 * or null skips it), children are nodes or strings (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

// ---- API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, type = null) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

/** The message of an error response: OpenAI's {"error": {...}} shape, FastAPI's {"detail"}
 * as a fallback, else the status line. */
function errorMessage(body, res) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error.message === "string") return body.error.message;
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d) && d.length) return d.map((x) => x.msg || JSON.stringify(x)).join("; ");
  }
  return `${res.status} ${res.statusText}`.trim();
}

async function readError(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: the status line says enough
  }
  return new ApiError(res.status, errorMessage(body, res), body?.error?.type ?? null);
}

/** fetch() a /v1 route with the bearer header; returns the Response when ok, else throws
 * ApiError. A 401 anywhere signs out; a 410 means the store was forgotten. */
async function api(path, { method = "GET", body, signal, token = state.token } = {}) {
  const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "omit",
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Cannot reach the device API. Is `fedpersona device serve` running?");
  }
  if (res.ok) return res;
  const err = await readError(res);
  if (res.status === 401 && token === state.token) signOut(`Signed out: ${err.message}`);
  if (res.status === 410) markErased();
  throw err;
}

const getJSON = async (path) => (await api(path)).json();
const sendJSON = async (method, path, body) => (await api(path, { method, body })).json();

// ---- state --------------------------------------------------------------------------------

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  models: [],
  store: { active: null, chats: [] },
  saving: null, // the timer of the next write of the chats to the store
  streaming: null, // AbortController of the answer being streamed
  erased: false,
  profile: null,
};

/** The chats the device's store keeps for this page. */
async function loadChats() {
  const saved = await getJSON("/v1/chats");
  if (saved && Array.isArray(saved.chats)) {
    // An answer still streaming when the page closed never finished.
    for (const m of saved.chats.flatMap((c) => c.messages || [])) {
      if (m.pending) {
        delete m.pending;
        m.error = "interrupted";
      }
    }
    return saved;
  }
  return { active: null, chats: [] };
}

// A page closed within SAVE_DELAY_MS of a change still writes it (a request that outlives
// the page).
window.addEventListener("pagehide", () => {
  if (!state.saving || !state.token) return;
  clearTimeout(state.saving);
  state.saving = null;
  fetch("/v1/chats", {
    method: "PUT",
    keepalive: true,
    credentials: "omit",
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
    body: JSON.stringify(state.store),
  });
});

/** Write the chats to the device's encrypted store, soon (one write for a burst of changes). */
function saveChats() {
  if (state.saving) clearTimeout(state.saving);
  state.saving = setTimeout(async () => {
    state.saving = null;
    if (!state.token || state.erased) return;
    try {
      await sendJSON("PUT", "/v1/chats", state.store);
    } catch (err) {
      if (err.status !== 401 && err.status !== 410) {
        banner(`Your chats could not be saved on the device: ${err.message}`);
      }
    }
  }, SAVE_DELAY_MS);
}

function activeChat() {
  return state.store.chats.find((c) => c.id === state.store.active) || null;
}

function loadOptions() {
  try {
    return JSON.parse(localStorage.getItem(OPTIONS_KEY)) || {};
  } catch {
    return {};
  }
}

// ---- sign-in ------------------------------------------------------------------------------

function signOut(message = "") {
  state.token = null;
  state.store = { active: null, chats: [] };
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.streaming) state.streaming.abort();
  show($("nav"), false);
  for (const p of PAGES) show($(`page-${p}`), false);
  show($("page-login"), true);
  $("login-error").textContent = message;
  $("token").value = "";
  $("token").focus();
}

/** Check ``token`` against GET /v1/models; on success keep it and enter the app. */
async function signIn(token) {
  const res = await api("/v1/models", { token });
  const models = (await res.json()).data || [];
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  setModels(models);
  state.store = await loadChats();
  $("login-error").textContent = "";
  show($("page-login"), false);
  show($("nav"), true);
  route({ focus: true });
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  const error = $("login-error");
  if (!token) {
    error.textContent = "Enter the API token.";
    return;
  }
  error.textContent = "Checking…";
  try {
    await signIn(token);
  } catch (err) {
    error.textContent =
      err.status === 401 ? "That token was not accepted. Check it and try again." : err.message;
    $("token").focus();
  }
});

// Logging out leaves nothing in this browser: the chats stay in the device's encrypted store.
$("logout").addEventListener("click", () => {
  signOut("Signed out. Your chats stay on the device, encrypted.");
});

function banner(text) {
  $("banner").textContent = text;
  show($("banner"), true);
}

function markErased() {
  state.erased = true;
  banner("This device's store was erased. Run `fedpersona device init` to start again.");
}

// ---- navigation ---------------------------------------------------------------------------

function currentPage() {
  const name = location.hash.slice(1);
  return PAGES.includes(name) ? name : null;
}

const loaders = { chat: loadChat, profile: loadProfile, privacy: loadPrivacy, model: loadModel };

/** Show the page the hash names (else the last one, else chat). Focus moves to the new page
 * (its first field for chat, its heading otherwise) when it was in the nav or ``focus``. */
function route({ focus = false } = {}) {
  if (!state.token) return;
  const page = currentPage() || state.page || "chat";
  const changed = page !== state.page;
  state.page = page;
  for (const p of PAGES) show($(`page-${p}`), p === page);
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  loaders[page]();
  // Keyboard and screen reader users land on the page they chose, not back at the top.
  if (focus || (changed && document.activeElement?.closest("#nav"))) {
    $(page === "chat" ? "prompt" : `${page}-title`).focus();
  }
}

window.addEventListener("hashchange", () => route());

// ---- chat ---------------------------------------------------------------------------------

function setModels(models) {
  state.models = models;
  const select = $("model-select");
  const keep = select.value || loadOptions().model || "fedpersona";
  select.replaceChildren(
    ...models.map((m) =>
      el("option", { value: m.id }, m.id === "fedpersona" ? "fedpersona (device decides)" : m.id),
    ),
  );
  select.value = models.some((m) => m.id === keep) ? keep : "fedpersona";
}

function loadChat() {
  const opts = loadOptions();
  if (opts.max_tokens) $("max-tokens").value = opts.max_tokens;
  if (opts.temperature) $("temperature").value = opts.temperature;
  if (!activeChat()) newChat();
  renderChat();
}

function newChat() {
  const chat = {
    id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
    title: "New chat",
    created: Date.now(),
    messages: [],
  };
  state.store.chats.unshift(chat);
  state.store.active = chat.id;
  saveChats();
  return chat;
}

$("new-chat").addEventListener("click", () => {
  const current = activeChat();
  if (!current || current.messages.length) newChat();
  renderChat();
  $("prompt").focus();
});

function renderChatList() {
  $("chat-list").replaceChildren(
    ...state.store.chats.map((chat) => {
      const button = el(
        "button",
        {
          type: "button",
          class: "chat-link",
          "aria-current": chat.id === state.store.active ? "true" : null,
        },
        chat.title,
      );
      button.addEventListener("click", () => {
        if (state.streaming) return;
        state.store.active = chat.id;
        saveChats();
        renderChat();
      });
      return el("li", {}, button);
    }),
  );
}

function renderChat() {
  renderChatList();
  const chat = activeChat();
  const list = $("messages");
  list.setAttribute("aria-busy", "true"); // one announcement after the rebuild, not many
  list.replaceChildren(...chat.messages.map((m) => renderMessage(chat, m)));
  list.setAttribute("aria-busy", "false");
  show($("empty-chat"), chat.messages.length === 0);
}

function renderMessage(chat, msg) {
  const user = msg.role === "user";
  const item = el("li", { class: `msg ${msg.role}${msg.error ? " failed" : ""}` });
  item.append(el("p", { class: "who" }, user ? "You" : "Assistant"));
  const text = el("p", { class: "text" }, msg.content);
  item.append(text);
  if (!user) {
    item.append(el("p", { class: "meta" }));
    updateMeta(item, msg);
    if (msg.interaction_id) item.append(feedbackControls(chat, msg, item));
  }
  return item;
}

function updateMeta(item, msg) {
  const meta = item.querySelector(".meta");
  const parts = [];
  if (msg.error) parts.push(`Error: ${msg.error}`);
  if (msg.model) parts.push(msg.model);
  if (msg.variant) parts.push(`answered by the ${msg.variant} model`);
  if (msg.usage) parts.push(`${msg.usage.completion_tokens} tokens`);
  if (msg.finish_reason === "length") parts.push("cut at the token limit");
  if (msg.edited) parts.push("edited by you");
  meta.replaceChildren(parts.join(" · "));
  if (msg.why) meta.append(el("span", { class: "why" }, `Why: ${msg.why}`));
}

/** The conversation the API sees: every finished turn of this chat, roles and text only. A
 * question whose answer failed or was stopped is left out with it: the model never answered. */
function history(chat) {
  const turns = chat.messages;
  return turns
    .filter((m, i) => {
      if (m.error || m.pending || !m.content) return false;
      const next = turns[i + 1];
      return !(m.role === "user" && next?.role === "assistant" && next.error);
    })
    .map((m) => ({ role: m.role, content: m.content }));
}

function chatTitle(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 40 ? `${line.slice(0, 39)}…` : line;
}

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => state.streaming?.abort());

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.streaming) return;
  const maxTokens = Math.min(1024, Math.max(1, parseInt($("max-tokens").value, 10) || 64));
  const temperature = Math.min(2, Math.max(0.01, parseFloat($("temperature").value) || 0.8));
  const model = $("model-select").value || "fedpersona";
  localStorage.setItem(OPTIONS_KEY, JSON.stringify({ model, max_tokens: maxTokens, temperature }));
  $("chat-error").textContent = "";

  const chat = activeChat() || newChat();
  if (!chat.messages.length) chat.title = chatTitle(prompt);
  const question = { role: "user", content: prompt, ts: Date.now() };
  chat.messages.push(question);
  const body = {
    model,
    messages: history(chat),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: maxTokens,
    temperature,
  };
  const answer = { role: "assistant", content: "", pending: true, ts: Date.now() };
  chat.messages.push(answer);
  $("prompt").value = "";
  saveChats();
  renderChatList();
  // Append, not rebuild: the live region then announces only the new turn. The answer is
  // busy while it streams, so screen readers read it once, whole.
  const item = renderMessage(chat, answer);
  item.classList.add("streaming");
  item.setAttribute("aria-busy", "true");
  $("messages").append(renderMessage(chat, question), item);
  show($("empty-chat"), false);

  const controller = new AbortController();
  state.streaming = controller;
  setBusy(true);
  try {
    await streamAnswer(body, answer, item, controller.signal);
  } catch (err) {
    answer.error = err.name === "AbortError" ? "stopped" : err.message;
    if (err.name !== "AbortError") $("chat-error").textContent = err.message;
  } finally {
    delete answer.pending;
    state.streaming = null;
    setBusy(false);
    saveChats();
    if (state.token && item.isConnected) {
      item.replaceWith(renderMessage(chat, answer));
      $("prompt").focus();
    } else if (state.token && activeChat() === chat) {
      renderChat(); // the list was rebuilt meanwhile (another page, a new chat)
    }
  }
});

function setBusy(busy) {
  $("send").disabled = busy;
  show($("stop"), busy);
}

/** POST the chat with stream=true and fill ``answer`` (and its list ``item``) as chunks come.
 * The body is read with a reader: EventSource cannot send an Authorization header. */
async function streamAnswer(body, answer, item, signal) {
  const res = await api("/v1/chat/completions", { method: "POST", body, signal });
  const text = item.querySelector(".text");
  if (!(res.headers.get("content-type") || "").includes("text/event-stream")) {
    // A server that answered without streaming: take the whole completion at once.
    const done = await res.json();
    answer.content = done.choices?.[0]?.message?.content ?? "";
    finish(answer, done, done.choices?.[0]?.finish_reason);
    text.textContent = answer.content;
    return;
  }
  for await (const data of sseEvents(res.body, signal)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(200, errorMessage(chunk, res), chunk.error.type);
    if (chunk.usage) answer.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    if (choice.delta?.content) {
      answer.content += choice.delta.content;
      text.textContent = answer.content;
    }
    if (choice.finish_reason) {
      finish(answer, chunk, choice.finish_reason);
      updateMeta(item, answer);
    }
  }
  if (!answer.interaction_id && !answer.content) throw new Error("the answer came back empty");
}

function finish(answer, chunk, reason) {
  const fp = chunk.fedpersona || {};
  answer.model = chunk.model;
  answer.finish_reason = reason;
  answer.interaction_id = fp.interaction_id;
  answer.variant = fp.variant;
  answer.why = fp.why;
  answer.retrieved = fp.retrieved;
  if (chunk.usage) answer.usage = chunk.usage;
}

/** The data of each server-sent event in ``stream``: events end at a blank line; the data is
 * the event's "data:" lines joined by newlines. */
async function* sseEvents(stream, signal) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      if (signal?.aborted) throw new DOMException("stopped", "AbortError");
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

// ---- feedback -----------------------------------------------------------------------------

function feedbackControls(chat, msg, item) {
  const bar = el("div", {
    class: "feedback",
    role: "group",
    "aria-label": "Feedback on this answer",
  });
  const status = el("span", { class: "status", role: "status" }, msg.feedbackStatus || "");
  const thumb = (kind, label) =>
    el("button", {
      type: "button",
      class: `thumb ${kind}`,
      "aria-label": label,
      "aria-pressed": String(msg.rated === kind),
      title: label,
    });
  const up = thumb("up", "Good answer");
  const down = thumb("down", "Bad answer");
  const prefer = el("button", { type: "button", "aria-expanded": "false" }, "I prefer…");
  const edit = el("button", { type: "button" }, "Edit");
  const buttons = [up, down, prefer, edit];

  async function send(body, after) {
    buttons.forEach((b) => (b.disabled = true));
    status.textContent = "Sending…";
    try {
      const result = await sendJSON("POST", "/v1/feedback", {
        interaction_id: msg.interaction_id,
        ...body,
      });
      after?.();
      msg.feedbackStatus = result.adapted
        ? `learned (${Math.round(result.adapt_ms ?? 0)} ms)`
        : "noted";
      if (result.drift) msg.feedbackStatus += " · your preferences seem to have changed";
      saveChats();
      status.textContent = msg.feedbackStatus;
      return true;
    } catch (err) {
      status.textContent = `Not sent: ${err.message}`;
      return false;
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  }

  up.addEventListener("click", () =>
    send({ rating: 5 }, () => {
      msg.rated = "up";
      up.setAttribute("aria-pressed", "true");
      down.setAttribute("aria-pressed", "false");
    }),
  );
  down.addEventListener("click", () =>
    send({ rating: 1, reject: true }, () => {
      msg.rated = "down";
      down.setAttribute("aria-pressed", "true");
      up.setAttribute("aria-pressed", "false");
    }),
  );

  prefer.addEventListener("click", () => {
    const open = item.querySelector(".prefer-form");
    if (open) {
      open.remove();
      prefer.setAttribute("aria-expanded", "false");
      prefer.focus();
      return;
    }
    const id = `prefer-${msg.interaction_id}`;
    const area = el("textarea", { id, rows: 3, required: true });
    const form = el(
      "form",
      { class: "prefer-form inline-form" },
      el("label", { for: id }, "The answer you would prefer"),
      area,
      el(
        "div",
        { class: "row" },
        el("button", { type: "submit" }, "Send preferred answer"),
        cancelButton(),
      ),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = area.value.trim();
      if (!text) return area.focus();
      if (await send({ preferred: text })) {
        form.remove();
        prefer.setAttribute("aria-expanded", "false");
        prefer.focus();
      }
    });
    form.querySelector(".cancel").addEventListener("click", () => prefer.click());
    prefer.setAttribute("aria-expanded", "true");
    item.append(form);
    area.focus();
  });

  edit.addEventListener("click", () => {
    if (item.querySelector(".edit-form")) return;
    const text = item.querySelector(".text");
    const id = `edit-${msg.interaction_id}`;
    // A textarea takes the answer's place (its value is plain text, nothing is parsed as HTML).
    const area = el("textarea", { id, rows: 4, required: true });
    area.value = msg.content;
    const form = el(
      "form",
      { class: "edit-form inline-form" },
      el("label", { for: id }, "Edit the answer"),
      area,
      el("div", { class: "row" }, el("button", { type: "submit" }, "Save edit"), cancelButton()),
    );
    const close = () => {
      form.replaceWith(text);
      edit.focus();
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const edited = area.value.trim();
      if (!edited) return area.focus();
      if (edited === msg.content) return close();
      if (
        await send({ edit: edited }, () => {
          msg.content = edited;
          msg.edited = true;
        })
      ) {
        text.textContent = edited;
        updateMeta(item, msg);
        close();
      }
    });
    form.querySelector(".cancel").addEventListener("click", close);
    text.replaceWith(form);
    area.focus();
  });

  bar.append(...buttons, status);
  return bar;
}

function cancelButton() {
  return el("button", { type: "button", class: "quiet cancel" }, "Cancel");
}

// ---- profile ------------------------------------------------------------------------------

const FIELD_LABELS = {
  assistant: "Assistant",
  style: "Style",
  tone: "Tone",
  formality: "Formality",
  complexity: "Complexity",
  length: "Answer length",
  humor: "Humor",
  format: "Format",
};

async function loadProfile() {
  // The form stays disabled until the profile is in: a late load would overwrite typing.
  $("profile-fieldset").disabled = true;
  $("profile-status").textContent = "";
  try {
    renderProfile(await getJSON("/v1/profile"));
    $("profile-fieldset").disabled = false;
  } catch (err) {
    $("profile-status").textContent = err.message;
  }
}

function renderProfile(profile) {
  state.profile = profile;
  $("profile-description").textContent = profile.description || "";
  const options = profile.options || {};
  const keys = Object.keys(options).length ? Object.keys(options) : Object.keys(FIELD_LABELS);
  $("profile-fields").replaceChildren(
    ...keys
      .filter((key) => key !== "domains")
      .map((key) => {
        const id = `profile-${key}`;
        const values = options[key] || [profile[key]];
        const select = el(
          "select",
          { id, name: key },
          values.map((v) => el("option", { value: v }, v)),
        );
        select.value = profile[key];
        return el(
          "div",
          { class: "field" },
          el("label", { for: id }, FIELD_LABELS[key] || key),
          select,
        );
      }),
  );
  $("domains").value = (profile.domains || []).join(", ");
}

$("profile-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const before = state.profile || {};
  const changes = {};
  for (const select of $("profile-fields").querySelectorAll("select")) {
    if (select.value !== before[select.name]) changes[select.name] = select.value;
  }
  const domains = $("domains")
    .value.split(",")
    .map((d) => d.trim())
    .filter(Boolean);
  if (JSON.stringify(domains) !== JSON.stringify(before.domains || [])) changes.domains = domains;
  const status = $("profile-status");
  if (!Object.keys(changes).length) {
    status.textContent = "Nothing changed.";
    return;
  }
  status.textContent = "Saving…";
  try {
    renderProfile(await sendJSON("PUT", "/v1/profile", changes));
    status.textContent = "Saved.";
  } catch (err) {
    status.textContent = `Not saved: ${err.message}`;
  }
});

// ---- privacy ------------------------------------------------------------------------------

const fmt = (x, digits = 3) => (typeof x === "number" ? Number(x.toFixed(digits)).toString() : "—");
const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "never");

function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function loadPrivacy() {
  $("privacy-error").textContent = "";
  if (state.erased) return showErased();
  try {
    renderPrivacy(await getJSON("/v1/privacy"));
  } catch (err) {
    if (err.status === 410) return showErased();
    $("privacy-error").textContent = err.message;
  }
}

/** A round's noise: σ, sampling rate q and steps, per ledger (user_…/record_… fields) or
 * unprefixed. */
function noise(r) {
  const one = (prefix) => {
    const sigma = r[`${prefix}noise_multiplier`];
    if (typeof sigma !== "number") return null;
    const steps = r[`${prefix}steps`];
    return (
      `σ ${fmt(sigma)} · q ${fmt(r[`${prefix}sample_rate`], 4)}` +
      (typeof steps === "number" ? ` · ${steps} step${steps === 1 ? "" : "s"}` : "")
    );
  };
  const parts = [
    ["", ""],
    ["user: ", "user_"],
    ["record: ", "record_"],
  ]
    .map(([label, prefix]) => (one(prefix) ? label + one(prefix) : null))
    .filter(Boolean);
  return parts.length ? parts.join("; ") : "—";
}

function renderPrivacy(p) {
  const b = p.budget || {};
  const cap = b.epsilon_cap;
  const ledger = (name, eps, what) =>
    el(
      "div",
      { class: "ledger" },
      el(
        "p",
        {},
        el("strong", {}, name),
        ` ε = ${fmt(eps)} of ${fmt(cap)} `,
        el("span", { class: "muted" }, what),
      ),
      el("meter", {
        min: 0,
        max: cap || 1,
        value: Math.min(eps || 0, cap || 1),
        "aria-label": `${name} ε spent of the cap`,
        high: (cap || 1) * 0.8,
        optimum: 0,
      }),
    );
  $("budget").replaceChildren(
    ledger("User-level", b.user_epsilon, "(what the federation can learn about you)"),
    ledger("Record-level", b.record_epsilon, "(about any one of your examples)"),
    el(
      "p",
      {},
      `δ = ${b.delta} · accountant: ${b.accountant} · rounds charged: ${b.rounds_charged ?? 0}` +
        ` · rounds declined: ${b.rounds_declined ?? 0}`,
    ),
  );
  $("budget-assumes").textContent = b.assumes ? `Assumes: ${b.assumes}` : "";

  const rounds = p.rounds || [];
  const head = ["Run", "Round", "Time", "Joined", "Reason", "What was sent", "Noise"];
  $("rounds").replaceChildren(
    rounds.length
      ? el(
          "table",
          {},
          el("caption", {}, "Rounds this device joined or declined"),
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              head.map((h) => el("th", { scope: "col" }, h)),
            ),
          ),
          el(
            "tbody",
            {},
            rounds.map((r) =>
              el(
                "tr",
                { class: r.joined ? "joined" : "declined" },
                el("td", {}, r.run || "—"),
                el("td", {}, r.round ?? ""),
                el("td", {}, when(r.time)),
                el("td", {}, r.joined ? "joined" : "declined"),
                el("td", {}, r.reason || "—"),
                el("td", {}, r.sent || "nothing"),
                el("td", {}, noise(r)),
              ),
            ),
          ),
        )
      : el("p", { class: "muted" }, "No federated rounds yet: nothing has left this device."),
  );
  renderFederation(p.federation || {});
  $("leaves").replaceChildren(...(p.leaves || []).map((x) => el("li", {}, x)));
  $("never-leaves").replaceChildren(...(p.never_leaves || []).map((x) => el("li", {}, x)));
  const s = p.stored || {};
  facts($("stored"), [
    ["Interactions", s.interactions ?? "—"],
    ["Feedback", s.feedback ?? "—"],
    ["Training examples", s.examples ?? "—"],
    [
      "Encrypted store",
      typeof s.store_bytes === "number" ? `${(s.store_bytes / 1024).toFixed(1)} KiB` : "—",
    ],
    ["Retention", `${p.retention_days} days`],
    ["Last purge", when(p.last_purge)],
  ]);
}

/** The federation facts (`device status`'s) and the pause switch. */
function renderFederation(f) {
  let service = f.joined
    ? `${f.address}: ${f.running ? "running" : "not running"}`
    : "not joined (fedpersona device join ADDRESS --ca CA_CERT)";
  if (f.joined && f.running && f.connected !== null && f.connected !== undefined) {
    service += f.connected
      ? ", connected"
      : `, not connected (${f.server_error || "no recent check"})`;
  }
  const last = (f.sent || []).at(-1);
  const left = last
    ? `round ${last.round}: ${last.sent.bytes} bytes in ${(last.sent.tensors || []).length} ` +
      `tensors${last.sent.masked ? ", masked by SecAgg+" : ", in the clear"}`
    : "nothing yet";
  facts($("federation"), [
    ["Service", service],
    ["Taking part", f.paused_since ? `paused since ${when(f.paused_since)}` : "yes"],
    ["Rounds", `${f.rounds_joined ?? 0} joined, ${f.rounds_declined ?? 0} declined`],
    ["Last round", when(f.last_round_time)],
    ["User ε", `${fmt(f.user_epsilon)} of ${fmt(f.epsilon_cap)}`],
    ["Last sent", left],
  ]);
  const button = $("federation-switch");
  button.textContent = f.paused_since ? "Resume" : "Pause";
  button.setAttribute("aria-pressed", f.paused_since ? "true" : "false");
  button.dataset.paused = f.paused_since ? "true" : "false";
}

$("federation-switch").addEventListener("click", async () => {
  const button = $("federation-switch");
  const status = $("federation-status");
  const pause = button.dataset.paused !== "true";
  button.disabled = true;
  try {
    renderFederation(await sendJSON("PUT", "/v1/federation", { paused: pause }));
    status.textContent = pause
      ? "Paused: this device declines every round, charging nothing."
      : "Resumed: this device takes part in rounds again.";
  } catch (err) {
    status.textContent = `Not changed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
});

$("export").addEventListener("click", async () => {
  const status = $("export-status");
  status.textContent = "Exporting…";
  try {
    const blob = await (await api("/v1/export")).blob();
    const url = URL.createObjectURL(new Blob([blob], { type: "application/json" }));
    const link = el("a", { href: url, download: "fedpersona-export.json", hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    status.textContent = "Downloaded fedpersona-export.json.";
  } catch (err) {
    status.textContent = `Export failed: ${err.message}`;
  }
});

$("forget-confirm").addEventListener("input", (event) => {
  $("forget").disabled = event.target.value.trim().toLowerCase() !== "forget";
});

$("forget-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if ($("forget").disabled) return;
  $("forget-error").textContent = "";
  try {
    const result = await sendJSON("POST", "/v1/forget", { confirm: "forget" });
    // The chats were in the erased store: this page's copy goes too.
    state.store = { active: null, chats: [] };
    markErased();
    showErased(result.erased || []);
  } catch (err) {
    if (err.status === 410) showErased();
    else $("forget-error").textContent = err.message;
  }
});

function showErased(files = null) {
  show($("privacy-body"), false);
  show($("privacy-erased"), true);
  if (files) $("erased-files").replaceChildren(...files.map((f) => el("li", {}, `erased ${f}`)));
  $("privacy-title").focus();
}

// ---- model --------------------------------------------------------------------------------

async function loadModel() {
  $("model-error").textContent = "";
  try {
    renderModel(await getJSON("/v1/status"));
  } catch (err) {
    $("model-error").textContent = err.message;
  }
  facts(
    $("model-list"),
    state.models.map((m) => [m.id, m.fedpersona?.description || m.owned_by || ""]),
  );
}

function renderModel(s) {
  const names = {
    personal: "your personal model",
    global: "the federation's global model",
    experts: "a mix of expert adapters",
  };
  $("model-active").textContent = `Answering now: ${names[s.active_model] || s.active_model}`;
  $("model-why").textContent = s.why || "";
  const adapter = s.personal_adapter || {};
  facts($("model-facts"), [
    ["Gate evidence", s.gate || "—"],
    ["Experts installed", s.experts?.length ? s.experts.join(", ") : "none"],
    ["Interactions", s.interactions ?? "—"],
    ["Feedback given", s.feedback ?? "—"],
    [
      "Personal adapter",
      adapter.present
        ? `${(adapter.bytes / 1024).toFixed(1)} KiB, ${adapter.rounds_trained ?? 0} rounds trained`
        : "not trained yet",
    ],
    ["Base model", s.model || "—"],
    ["Strategy", s.strategy || "—"],
  ]);
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  if (!state.token) return signOut();
  try {
    await signIn(state.token);
  } catch (err) {
    if (err.status === 410) {
      // A forgotten store: stay signed in so the erased notice shows.
      show($("page-login"), false);
      show($("nav"), true);
      markErased();
      route();
    } else if (err.status !== 401) {
      // Not a sign-in problem (the API is down or failing): keep the token, say what broke.
      banner(`${err.message} Reload the page to try again.`);
    }
  }
}

start();
