// The chat page: plain JavaScript, no build step.
//
// Each prompt is one POST /v1/chat/completions read as native NDJSON events
// (Accept: application/x-ndjson) with on_disconnect=continue, so a dropped
// connection does not end the run: the page reattaches with
// GET /v1/runs/{id}/events and Last-Event-ID: <run_id>:<last seq>, and the
// log replays exactly what was missed. An answer only takes frames that carry
// its own run_id and the next seq, so a stale frame from another run can
// never land in it and a replayed frame is never shown twice.
//
// Each answer's state is mirrored in data-* attributes (data-run-id,
// data-status, data-seq, data-ignored, data-verified) for people debugging
// the page and for the browser tests.

"use strict";

const STORAGE = { key: "tss.apiKey", session: "tss.session", sessions: "tss.sessions" };
const NDJSON = "application/x-ndjson";
const SESSION_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const KNOWN_SESSIONS_KEPT = 20;
// Waits between reattach attempts after the first (immediate) one fails;
// bounded, so a server that is gone ends the answer as failed.
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 3000, 3000, 3000, 3000];
const ENDED = new Set(["completed", "superseded", "stopped", "cancelled", "interrupted", "failed"]);

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"),
  session: $("session-id"),
  known: $("known-sessions"),
  newSession: $("new-session"),
  alert: $("alert"),
  conversations: $("conversations"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  announcer: $("announcer"),
};

// --- talking to the API ----------------------------------------------------

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function apiFailure(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "The request failed.";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not our JSON error body (a proxy's page, say): keep the status line.
  }
  return new ApiFailure(response.status, code, message);
}

function authHeaders() {
  return { Authorization: `Bearer ${ui.key.value.trim()}` };
}

function showAlert(text) {
  ui.alert.textContent = text;
  ui.alert.hidden = false;
}

function clearAlert() {
  ui.alert.hidden = true;
  ui.alert.textContent = "";
  ui.key.removeAttribute("aria-invalid");
}

function keyRefused(failure) {
  showAlert(
    `The server refused the API key (${failure.status} ${failure.code}): ${failure.message} ` +
      "Enter a valid key in the API key field.",
  );
  ui.key.setAttribute("aria-invalid", "true");
}

function announce(text) {
  ui.announcer.textContent = text;
}

function pause(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// --- how a run ended, in words ---------------------------------------------

const CANCELLED = {
  superseded: ["superseded", "cancelled — superseded by a newer prompt"],
  client_stop: ["stopped", "cancelled — stopped"],
  client_disconnect: ["cancelled", "cancelled — the client went away"],
};
const INTERRUPTED = {
  shutdown: "interrupted — the server is shutting down",
  deadline: "interrupted — the run hit its deadline",
};

// [status, label] for a terminal frame (or a run record shaped like one).
function describeEnd(frame) {
  switch (frame.type) {
    case "run.completed":
      return ["completed", "completed"];
    case "run.cancelled":
      return CANCELLED[frame.reason] || ["cancelled", `cancelled — ${frame.reason}`];
    case "run.interrupted":
      return ["interrupted", INTERRUPTED[frame.reason] || `interrupted — ${frame.reason}`];
    case "run.failed":
      return ["failed", `failed — ${frame.error ? frame.error.message : "the run failed"}`];
    default:
      return null;
  }
}

// --- one answer --------------------------------------------------------------

class Answer {
  constructor(conversation, prompt) {
    this.conversation = conversation;
    this.prompt = prompt;
    this.runId = null;
    this.lastSeq = -1;
    this.text = "";
    this.status = "";
    this.ended = false;
    this.stopRequested = false;
    this.ignored = 0;

    if (prompt !== null) {
      const user = document.createElement("li");
      user.className = "message user";
      const text = document.createElement("p");
      text.className = "text";
      text.textContent = prompt;
      user.append(text);
      conversation.list.append(user);
    }
    this.element = document.createElement("li");
    this.element.className = "message assistant";
    this.textElement = document.createElement("p");
    this.textElement.className = "text";
    this.statusElement = document.createElement("p");
    this.statusElement.className = "status";
    this.element.append(this.textElement, this.statusElement);
    conversation.list.append(this.element);
  }

  bind(runId) {
    this.runId = runId;
    this.element.dataset.runId = runId;
  }

  setStatus(status, label) {
    this.status = status;
    this.element.dataset.status = status;
    this.statusElement.dataset.status = status;
    this.statusElement.textContent = label;
    this.element.setAttribute("aria-busy", String(!ENDED.has(status)));
    refreshButtons();
  }

  end(status, label) {
    this.ended = true;
    this.setStatus(status, label);
    if (!this.text) {
      this.textElement.classList.add("empty");
      this.textElement.textContent = "(no text)";
    }
    if (this.conversation.visible) announce(`Answer ${label}.`);
  }

  // Applies one frame. Returns "new" when it moved the answer on, "gap" when
  // frames are missing (the caller reattaches from lastSeq), else "skipped".
  receive(frame) {
    if (frame.run_id !== this.runId) {
      // Another run's frame (a stale one from a superseded run): never ours.
      this.ignored += 1;
      this.element.dataset.ignored = String(this.ignored);
      return "skipped";
    }
    if (frame.seq <= this.lastSeq) return "skipped"; // a replay we already have
    if (frame.seq !== this.lastSeq + 1) return "gap";
    this.lastSeq = frame.seq;
    this.element.dataset.seq = String(frame.seq);
    switch (frame.type) {
      case "run.started":
        this.setStatus("streaming", "streaming");
        break;
      case "run.delta":
        if (this.status !== "streaming" && this.status !== "stopping") {
          this.setStatus("streaming", "streaming");
        }
        this.text += frame.text;
        this.textElement.append(frame.text);
        break;
      case "run.message":
        // The run's full text: the deltas we showed must add up to it.
        this.element.dataset.verified = String(frame.text === this.text);
        break;
      default: {
        const ending = describeEnd(frame);
        if (ending) this.end(...ending);
      }
    }
    return "new";
  }

  // An answer known only from its record (loading an existing session).
  showRecord(record) {
    this.text = record.text || "";
    this.textElement.textContent = this.text;
    const ending = describeEnd({
      type: `run.${record.status}`,
      reason: record.cancel_reason,
      error: record.error,
    });
    this.end(...(ending || [record.status, record.status]));
  }
}

// --- following a run: read, and reattach when the connection drops -------------

// Reads NDJSON frames into the answer until the stream ends, breaks, or the
// answer ends. True when at least one new frame arrived.
async function readFrames(answer, response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let progressed = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line) continue; // a heartbeat
        const outcome = answer.receive(JSON.parse(line));
        if (outcome === "gap") return progressed;
        if (outcome === "new") progressed = true;
        if (answer.ended) return progressed;
      }
    }
  } catch {
    // The connection broke (or a frame was not JSON): the caller reattaches.
  } finally {
    reader.cancel().catch(() => {});
  }
  return progressed;
}

// The run's events after the last seq the answer has; null when this attempt
// failed but another may work. Ends the answer when no attempt can work.
async function reattach(answer) {
  const headers = { ...authHeaders(), Accept: NDJSON };
  if (answer.lastSeq >= 0) headers["Last-Event-ID"] = `${answer.runId}:${answer.lastSeq}`;
  let response;
  try {
    response = await fetch(`/v1/runs/${encodeURIComponent(answer.runId)}/events`, {
      headers,
      cache: "no-store",
    });
  } catch {
    return null;
  }
  if (response.ok) {
    if (answer.status === "reconnecting") answer.setStatus("streaming", "streaming");
    return response;
  }
  const failure = await apiFailure(response);
  if (response.status === 401) {
    keyRefused(failure);
    answer.end("failed", "failed — the API key was refused");
  } else if (response.status < 500 && response.status !== 429) {
    answer.end("failed", `failed — ${failure.message}`);
  }
  return null;
}

async function follow(answer, response) {
  let failures = 0;
  while (!answer.ended) {
    if (response) {
      if (await readFrames(answer, response)) failures = 0;
      response = null;
      if (answer.ended) return;
      answer.setStatus("reconnecting", "connection lost — reconnecting");
    }
    response = await reattach(answer);
    if (response || answer.ended) continue;
    if (failures === RECONNECT_DELAYS_MS.length) {
      answer.end("failed", "failed — lost the connection and could not reconnect");
      return;
    }
    answer.setStatus("reconnecting", `connection lost — reconnecting (attempt ${failures + 2})`);
    await pause(RECONNECT_DELAYS_MS[failures]);
    failures += 1;
  }
}

// --- conversations (one per session) ----------------------------------------------

class Conversation {
  constructor(sessionId) {
    this.sessionId = sessionId;
    this.answers = [];
    this.list = document.createElement("ol");
    this.list.className = "messages";
    this.list.setAttribute("role", "log");
    this.list.setAttribute("aria-live", "polite");
    this.list.setAttribute("aria-label", `Session ${sessionId}`);
    this.list.dataset.session = sessionId;
    this.list.hidden = true;
    ui.conversations.append(this.list);
  }

  get visible() {
    return !this.list.hidden;
  }

  get current() {
    return this.answers.length ? this.answers[this.answers.length - 1] : null;
  }

  add(prompt) {
    const answer = new Answer(this, prompt);
    this.answers.push(answer);
    return answer;
  }

  // The messages for a new prompt: the completed turns so far, then it.
  messagesFor(prompt) {
    const messages = [];
    for (const answer of this.answers) {
      if (answer.status !== "completed") continue;
      if (answer.prompt !== null) messages.push({ role: "user", content: answer.prompt });
      messages.push({ role: "assistant", content: answer.text });
    }
    messages.push({ role: "user", content: prompt });
    return messages;
  }
}

const conversations = new Map();
let shown = null;

function knownSessions() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE.sessions) || "[]");
    return Array.isArray(stored) ? stored.filter((id) => SESSION_ID.test(id)) : [];
  } catch {
    return [];
  }
}

function rememberSession(sessionId) {
  const sessions = [sessionId, ...knownSessions().filter((id) => id !== sessionId)];
  localStorage.setItem(STORAGE.sessions, JSON.stringify(sessions.slice(0, KNOWN_SESSIONS_KEPT)));
  renderKnownSessions();
}

function renderKnownSessions() {
  ui.known.replaceChildren(
    ...knownSessions().map((id) => {
      const option = document.createElement("option");
      option.value = id;
      return option;
    }),
  );
}

function randomSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return "s-" + Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function showSession(sessionId) {
  let conversation = conversations.get(sessionId);
  const isNew = conversation === undefined;
  if (isNew) {
    conversation = new Conversation(sessionId);
    conversations.set(sessionId, conversation);
  }
  if (shown) shown.list.hidden = true;
  conversation.list.hidden = false;
  shown = conversation;
  ui.session.value = sessionId;
  ui.session.removeAttribute("aria-invalid");
  localStorage.setItem(STORAGE.session, sessionId);
  refreshButtons();
  if (isNew) loadSession(conversation);
}

// An existing session: its recent answers from the server (newest first
// there), and the live one followed. Prompts are not stored server-side.
async function loadSession(conversation) {
  if (!ui.key.value.trim()) return;
  let response;
  try {
    response = await fetch(`/v1/sessions/${encodeURIComponent(conversation.sessionId)}`, {
      headers: authHeaders(),
      cache: "no-store",
    });
  } catch {
    showAlert("Could not reach the server.");
    return;
  }
  if (response.status === 404) return; // nothing has run in it yet
  if (!response.ok) {
    const failure = await apiFailure(response);
    if (response.status === 401) keyRefused(failure);
    else showAlert(`Could not load session ${conversation.sessionId}: ${failure.message}`);
    return;
  }
  const session = await response.json();
  for (const record of [...session.recent_runs].reverse()) {
    const answer = conversation.add(null);
    answer.bind(record.id);
    if (record.status === "running") {
      answer.setStatus("streaming", "streaming");
      follow(answer, null);
    } else {
      answer.showRecord(record);
    }
  }
}

// --- the controls ----------------------------------------------------------------

function refreshButtons() {
  const current = shown && shown.current;
  ui.stop.disabled = !current || current.ended;
}

async function send(promptText) {
  const prompt = promptText.trim();
  if (!prompt) return;
  if (!ui.key.value.trim()) {
    showAlert("Enter an API key first.");
    ui.key.setAttribute("aria-invalid", "true");
    ui.key.focus();
    return;
  }
  const conversation = shown;
  const messages = conversation.messagesFor(prompt);
  const answer = conversation.add(prompt);
  answer.setStatus("sending", "sending");
  ui.prompt.value = "";
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {
        ...authHeaders(),
        "Content-Type": "application/json",
        Accept: NDJSON,
        "X-Session-Id": conversation.sessionId,
      },
      // A new prompt supersedes a live run of the session (the default
      // on_conflict); leaving does not end the run, so the page can reattach.
      body: JSON.stringify({ messages, on_disconnect: "continue" }),
    });
  } catch {
    answer.end("failed", "failed — the server could not be reached");
    return;
  }
  if (!response.ok) {
    const failure = await apiFailure(response);
    if (response.status === 401) {
      keyRefused(failure);
      answer.end("failed", "failed — the API key was refused");
    } else {
      answer.end("failed", `failed — ${failure.message}`);
    }
    return;
  }
  clearAlert();
  answer.bind(response.headers.get("X-Run-Id"));
  rememberSession(conversation.sessionId);
  if (answer.stopRequested) stop(answer);
  await follow(answer, response);
}

async function stop(answer) {
  if (!answer || answer.ended) return;
  answer.stopRequested = true;
  if (!answer.runId) return; // send() stops it as soon as the run id is known
  answer.setStatus("stopping", "stopping");
  let response;
  try {
    response = await fetch(`/v1/runs/${encodeURIComponent(answer.runId)}/cancel`, {
      method: "POST",
      headers: authHeaders(),
    });
  } catch {
    showAlert("Stop failed: the server could not be reached.");
    return;
  }
  // The run's terminal event arrives on the answer's own stream.
  if (!response.ok) {
    const failure = await apiFailure(response);
    if (response.status === 401) keyRefused(failure);
    else showAlert(`Stop failed: ${failure.message}`);
  }
}

function selectTypedSession() {
  const sessionId = ui.session.value.trim();
  if (!SESSION_ID.test(sessionId)) {
    ui.session.setAttribute("aria-invalid", "true");
    showAlert("A session id is 1-128 characters of A-Z a-z 0-9 . _ : -");
    return;
  }
  clearAlert();
  showSession(sessionId);
}

ui.key.value = localStorage.getItem(STORAGE.key) || "";
ui.key.addEventListener("input", () => {
  localStorage.setItem(STORAGE.key, ui.key.value.trim());
  clearAlert();
});
ui.session.addEventListener("change", selectTypedSession);
ui.newSession.addEventListener("click", () => {
  showSession(randomSessionId());
  ui.prompt.focus();
});
document.getElementById("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  selectTypedSession();
});
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send(ui.prompt.value);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(ui.prompt.value);
  }
});
ui.stop.addEventListener("click", () => stop(shown && shown.current));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stop(shown && shown.current);
});

renderKnownSessions();
const storedSession = localStorage.getItem(STORAGE.session);
showSession(storedSession && SESSION_ID.test(storedSession) ? storedSession : randomSessionId());
ui.prompt.focus();
