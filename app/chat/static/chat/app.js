// Parley web client: one WebSocket to /ws/ multiplexing every room of the user.
//
// Protocol (see app/chat/consumers.py and app/chat/schema/client_frames.json):
//   client -> server: join, leave, send, typing, read, history, resume, ping
//   server -> client: hello, joined, left, message, ack, error, typing, presence, read, history,
//                     resumed, reload, reconnect, pong
// Messages are kept per room by seq (so duplicates from replays collapse); `lastSeq` is the highest
// seq seen per room and is what `resume` sends after a reconnect. Sends stay in `pending` (also in
// localStorage) until their `ack` and are re-sent with the same client_msg_id after reconnecting.
// All user content goes through textContent: never innerHTML.

const app = document.getElementById("app");
const $ = (id) => document.getElementById(id);
const el = {
  connState: $("conn-state"),
  connText: $("conn-text"),
  status: $("status"),
  menuToggle: $("menu-toggle"),
  sidebar: $("sidebar"),
  roomList: $("room-list"),
  roomListEmpty: $("room-list-empty"),
  dmList: $("dm-list"),
  publicList: $("public-list"),
  publicListEmpty: $("public-list-empty"),
  refreshRooms: $("refresh-rooms"),
  dmForm: $("dm-form"),
  dmUser: $("dm-user"),
  createForm: $("create-room-form"),
  createName: $("create-room-name"),
  createPrivate: $("create-room-private"),
  roomTitle: $("room-title"),
  presence: $("presence"),
  inviteForm: $("invite-form"),
  inviteUser: $("invite-user"),
  messages: $("messages"),
  loadOlder: $("load-older"),
  emptyRoom: $("empty-room"),
  messageList: $("message-list"),
  readReceipt: $("read-receipt"),
  typing: $("typing"),
  composer: $("composer"),
  input: $("composer-input"),
  sendButton: $("send-button"),
};

const me = { id: Number(app.dataset.userId), username: app.dataset.username };
const HISTORY_PAGE = 50;
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 5000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const PING_EVERY_MS = 20000;
const SILENCE_LIMIT_MS = 50000;
const RESEND_AFTER_MS = 15000;
const PENDING_KEY = `parley:pending:${me.id}`;

/** @type {Map<number, any>} rooms the user is a member of, by id */
const rooms = new Map();
/** @type {Map<number, any>} public groups the user could join */
const publicRooms = new Map();
/** @type {Map<string, any>} unacked sends by client_msg_id */
const pending = new Map();
/** @type {Map<number, string>} user id -> username, learned from frames */
const usernames = new Map([[me.id, me.username]]);
/** @type {Map<string, any>} outstanding requests by ref (history, join) */
const requests = new Map();

let selectedId = null;
let lastTypingSent = 0;
let refCounter = 0;

// --- small helpers ------------------------------------------------------------------------------

function randomId() {
  if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // available outside secure contexts too
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function nextRef(kind) {
  refCounter += 1;
  return `${kind}-${refCounter}`;
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return "";
}

function make(tag, { cls, text, attrs } = {}) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function nameOf(userId) {
  return usernames.get(userId) || `user #${userId}`;
}

// Names come from any frame that mentions a user (joined.online, presence, typing, read,
// messages, DM peers) and are cached across page loads.
const NAMES_KEY = `parley:names:${me.id}`;
let namesLearned = false;
try {
  for (const [id, name] of JSON.parse(localStorage.getItem(NAMES_KEY) || "[]")) {
    if (!usernames.has(id)) usernames.set(id, name);
  }
} catch { /* ignore corrupt storage */ }

function learnUser(user) {
  if (!user || typeof user.id !== "number" || !user.username || usernames.get(user.id) === user.username) return;
  usernames.set(user.id, user.username);
  namesLearned = true;
}

function saveNames() {
  try { localStorage.setItem(NAMES_KEY, JSON.stringify([...usernames].slice(-2000))); } catch { /* ignore */ }
}

let statusTimer = null;
function showStatus(text, kind = "info") {
  el.status.textContent = text;
  el.status.dataset.kind = kind;
  el.status.hidden = false;
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => { el.status.hidden = true; el.status.textContent = ""; }, 8000);
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const today = new Date();
  if (date.toDateString() === today.toDateString()) return time;
  return `${date.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

// --- HTTP API -------------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && method !== "HEAD") headers["X-CSRFToken"] = cookie("csrftoken");
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { /* not JSON */ }
  if (response.status === 401) {
    window.location.assign("/login/?next=/");
    throw new Error("please log in again");
  }
  if (!response.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

// --- room state -------------------------------------------------------------------------------------

function upsertRoom(data) {
  let room = rooms.get(data.id);
  if (!room) {
    room = {
      id: data.id, name: data.name, kind: data.kind, private: !!data.private, peer: null,
      lastSeq: data.last_seq || 0, lastReadSeq: data.last_read_seq || 0, unread: 0,
      messages: new Map(), elements: new Map(), loaded: false, loading: false, hasMore: false,
      online: new Set(), typing: new Map(), readers: new Map(), attached: false, joinedOnce: false,
    };
    room.unread = typeof data.unread === "number" ? data.unread : Math.max(0, room.lastSeq - room.lastReadSeq);
    rooms.set(room.id, room);
  } else {
    room.name = data.name;
    room.kind = data.kind;
    room.private = !!data.private;
    if (typeof data.last_read_seq === "number" && data.last_read_seq > room.lastReadSeq) {
      room.lastReadSeq = data.last_read_seq;
      room.unread = Math.max(0, Math.min(room.unread, room.lastSeq - room.lastReadSeq));
    }
  }
  if (data.peer) { room.peer = data.peer; learnUser(data.peer); }
  publicRooms.delete(room.id);
  return room;
}

async function loadRooms() {
  const data = await api("GET", "/api/rooms");
  const seen = new Set();
  for (const item of data.rooms) { upsertRoom(item); seen.add(item.id); }
  publicRooms.clear();
  for (const item of data.public) if (!rooms.has(item.id)) publicRooms.set(item.id, item);
  // Rooms created or joined elsewhere are attached now (the protocol has no "room added" frame).
  if (socketReady()) for (const id of seen) if (!rooms.get(id).attached) attachRoom(rooms.get(id));
  renderRoomLists();
}

function newestSeq(room) {
  let newest = 0;
  for (const seq of room.messages.keys()) if (seq > newest) newest = seq;
  return newest;
}

function oldestSeq(room) {
  let oldest = Infinity;
  for (const seq of room.messages.keys()) if (seq < oldest) oldest = seq;
  return oldest === Infinity ? null : oldest;
}

// --- pending sends (kept across reconnects and page reloads) ------------------------------------

function savePending() {
  try {
    const items = [...pending.values()].map(({ clientMsgId, room, body, createdAt }) => ({
      clientMsgId, room, body, createdAt,
    }));
    localStorage.setItem(PENDING_KEY, JSON.stringify(items));
  } catch { /* storage full or disabled: in-memory still works */ }
}

function restorePending() {
  try {
    const items = JSON.parse(localStorage.getItem(PENDING_KEY) || "[]");
    for (const item of items) {
      pending.set(item.clientMsgId, { ...item, state: "queued", sentAt: 0, seq: null, error: null });
    }
  } catch { /* ignore corrupt storage */ }
}

// --- the WebSocket ------------------------------------------------------------------------------

const conn = {
  ws: null,
  state: "connecting",
  attempt: 0,
  timer: null,
  serverDelay: null,
  everOnline: false,
  lastFrameAt: 0,
  queue: [],
  tokens: 40,
  rate: 20,
  burst: 40,
  refillAt: performance.now(),
  pumpTimer: null,
  limits: { max_body_bytes: 4096, resume_max: 500 },
};

function setConnState(state, text) {
  conn.state = state;
  el.connState.dataset.state = state;
  el.connText.textContent = text;
  updateComposer();
}

function socketReady() {
  return conn.ws !== null && conn.ws.readyState === WebSocket.OPEN && conn.state === "online";
}

function connect() {
  clearTimeout(conn.timer);
  conn.timer = null;
  if (conn.ws) return;
  setConnState(conn.everOnline ? "reconnecting" : "connecting", conn.everOnline ? "Reconnecting…" : "Connecting…");
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = new WebSocket(`${scheme}//${window.location.host}/ws/`);
  } catch (error) {
    scheduleReconnect();
    return;
  }
  conn.ws = ws;
  conn.serverDelay = null;
  ws.addEventListener("message", (event) => {
    if (conn.ws !== ws) return;
    conn.lastFrameAt = performance.now();
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    try { handleFrame(frame); } catch (error) { console.error("frame handling failed", frame, error); }
  });
  ws.addEventListener("close", (event) => {
    if (conn.ws !== ws) return;
    socketGone(event.code);
  });
}

function socketGone(code) {
  conn.ws = null;
  conn.queue = [];
  clearTimeout(conn.pumpTimer);
  for (const room of rooms.values()) {
    room.attached = false;
    room.loading = false;
    room.typing.clear();
    room.online.clear();
  }
  for (const item of pending.values()) if (item.state === "sent") item.state = "queued";
  requests.clear();
  renderHeader();
  renderTyping();
  refreshPendingLabels();
  renderLoadOlder();
  if (code === 4001) {
    setConnState("offline", "Signed out");
    showStatus("Your session has ended: please log in again.", "error");
    setTimeout(() => window.location.assign("/login/?next=/"), 1500);
    return;
  }
  scheduleReconnect();
}

function scheduleReconnect() {
  // Exponential backoff with jitter: a random delay in [base/2, base]; `attempt` resets on hello.
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** conn.attempt);
  let delay = base / 2 + Math.random() * (base / 2);
  if (conn.serverDelay !== null) {
    // A draining server said when to come back (close 4012). If the last attempt already ended
    // like this (no hello in between), keep backing off too, so a draining pod is not hammered.
    delay = conn.attempt === 0 ? conn.serverDelay : Math.max(conn.serverDelay, delay);
    conn.serverDelay = null;
  }
  conn.attempt += 1;
  setConnState("reconnecting", `Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`);
  clearTimeout(conn.timer);
  conn.timer = setTimeout(connect, delay);
}

function reconnectNow() {
  if (conn.ws === null && conn.timer !== null) connect();
}

function dropSocket() {
  const ws = conn.ws;
  if (!ws) return;
  conn.ws = null;
  try { ws.close(4000, "client timeout"); } catch { /* already closing */ }
  socketGone(1006);
}

// Outgoing frames pass a token bucket matching the server's limits (hello.limits), so a burst
// (many joins after a reconnect) is paced instead of answered with `rate_limited`.
function sendFrame(frame) {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
  conn.queue.push(JSON.stringify(frame));
  pump();
  return true;
}

function pump() {
  clearTimeout(conn.pumpTimer);
  const now = performance.now();
  conn.tokens = Math.min(conn.burst, conn.tokens + ((now - conn.refillAt) / 1000) * conn.rate);
  conn.refillAt = now;
  while (conn.queue.length && conn.tokens >= 1 && conn.ws && conn.ws.readyState === WebSocket.OPEN) {
    conn.ws.send(conn.queue.shift());
    conn.tokens -= 1;
  }
  if (conn.queue.length) conn.pumpTimer = setTimeout(pump, Math.ceil(1000 / conn.rate));
}

setInterval(() => {
  if (!socketReady()) return;
  if (performance.now() - conn.lastFrameAt > SILENCE_LIMIT_MS) {
    dropSocket(); // a half-open connection: nothing (not even pong) arrived for too long
    return;
  }
  sendFrame({ type: "ping", ref: nextRef("ping") });
}, PING_EVERY_MS);

setInterval(() => {
  // An unacked send on a live socket is retried (same client_msg_id: the server dedupes).
  if (!socketReady()) return;
  const now = Date.now();
  for (const item of pending.values()) {
    if (item.state === "sent" && now - item.sentAt > RESEND_AFTER_MS) transmit(item);
  }
}, 5000);

window.addEventListener("online", reconnectNow);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") { reconnectNow(); maybeSendRead(); }
});

// --- frames from the server -----------------------------------------------------------------------

const handlers = {
  hello(frame) {
    learnUser(frame.user);
    const limits = frame.limits || {};
    conn.limits = { ...conn.limits, ...limits };
    conn.rate = limits.rate_per_second || conn.rate;
    conn.burst = limits.rate_burst || conn.burst;
    conn.tokens = conn.burst;
    conn.attempt = 0;
    const wasOnline = conn.everOnline;
    conn.everOnline = true;
    setConnState("online", "Online");
    attachAll();
    flushPending();
    if (wasOnline) loadRooms().catch((error) => showStatus(`Could not refresh rooms: ${error.message}`, "error"));
  },

  joined(frame) {
    const request = requests.get(frame.ref);
    requests.delete(frame.ref);
    const info = frame.info || {};
    const known = rooms.has(frame.room);
    const room = upsertRoom({ ...info, id: frame.room });
    if (!known) {
      // A public room we just joined: start at its current end (history loads on demand).
      room.lastSeq = info.last_seq || 0;
      room.unread = Math.max(0, room.lastSeq - room.lastReadSeq);
    }
    room.attached = true;
    room.joinedOnce = true;
    for (const user of frame.online || []) learnUser(user);
    room.online = new Set((frame.online || []).map((user) => user.id));
    // A crowded room lists some of its users and counts them all (and has no live presence):
    // keep its count; elsewhere the list is whole and presence frames keep it current.
    const listed = (frame.online || []).length;
    room.onlineCount = (frame.online_count || 0) > listed ? frame.online_count : 0;
    renderRoomLists();
    if (request && request.select) selectRoom(room.id);
    else if (room.id === selectedId) renderHeader();
  },

  left(frame) {
    const room = rooms.get(frame.room);
    if (room) room.attached = false;
  },

  message(frame) {
    addMessage(frame, true);
  },

  ack(frame) {
    const item = pending.get(frame.client_msg_id);
    if (!item) return;
    pending.delete(frame.client_msg_id);
    savePending();
    const room = rooms.get(frame.room ?? item.room);
    if (room && typeof frame.seq === "number" && !room.messages.has(frame.seq)) {
      // The ack beat the message frame (or the frame was missed): show it from what we sent.
      addMessage({
        type: "message", room: room.id, seq: frame.seq, sender: { ...me }, body: item.body, kind: "text",
        sent_at: new Date().toISOString(), client_msg_id: item.clientMsgId,
      }, true);
    }
    removePendingElement(item.clientMsgId);
    if (room) {
      const element = room.elements.get(frame.seq);
      if (element) markDelivered(element);
    }
  },

  error(frame) {
    const item = frame.ref ? pending.get(frame.ref) : null;
    if (item) {
      if (["rate_limited", "busy", "unavailable", "internal"].includes(frame.code)) {
        item.state = "queued"; // transient: retry shortly with the same client_msg_id
        setTimeout(() => flushPending(), 2000 + Math.random() * 2000);
      } else if (frame.code === "not_joined") {
        const room = rooms.get(item.room);
        item.state = "queued";
        if (room) { room.attached = false; attachRoom(room); flushPending(); }
      } else {
        item.state = "failed";
        item.error = frame.message;
        renderPendingElement(item);
      }
    }
    const request = frame.ref ? requests.get(frame.ref) : null;
    if (request) {
      requests.delete(frame.ref);
      const room = rooms.get(request.room);
      if (room) room.loading = false;
      if (request.kind === "history" && room && room.id === selectedId) renderSelected();
    }
    if (frame.code === "not_joined" && !item && typeof frame.room === "number" && rooms.has(frame.room)) {
      attachRoom(rooms.get(frame.room));
    }
    if (frame.code === "rate_limited" && !item) return; // paced client-side; a stray one is harmless
    showStatus(frame.message || `error: ${frame.code}`, "error");
  },

  typing(frame) {
    learnUser(frame.user);
    const room = rooms.get(frame.room);
    if (!room || !frame.user || frame.user.id === me.id) return;
    room.typing.set(frame.user.id, Date.now() + TYPING_SHOWN_MS);
    if (room.id === selectedId) renderTyping();
    setTimeout(() => { if (room.id === selectedId) renderTyping(); }, TYPING_SHOWN_MS + 50);
  },

  presence(frame) {
    // One frame lists every user whose status changed in the server's batching window.
    const users = Array.isArray(frame.users) ? frame.users : [];
    users.forEach(learnUser);
    const room = rooms.get(frame.room);
    if (!room || !users.length) return;
    for (const user of users) {
      if (frame.status === "online") room.online.add(user.id);
      else { room.online.delete(user.id); room.typing.delete(user.id); }
    }
    if (room.id === selectedId) { renderHeader(); renderTyping(); }
  },

  read(frame) {
    learnUser(frame.user);
    const room = rooms.get(frame.room);
    if (!room || !frame.user) return;
    if (frame.user.id === me.id) {
      // Read in another tab or device.
      if (frame.seq > room.lastReadSeq) room.lastReadSeq = frame.seq;
      room.unread = Math.max(0, Math.min(room.unread, room.lastSeq - room.lastReadSeq));
      renderRoomLists();
      return;
    }
    room.readers.set(frame.user.id, Math.max(frame.seq, room.readers.get(frame.user.id) || 0));
    if (room.id === selectedId) renderReceipt();
  },

  history(frame) {
    const request = requests.get(frame.ref);
    requests.delete(frame.ref);
    const room = rooms.get(frame.room);
    if (!room) return;
    const older = !!(request && request.older);
    const scroller = el.messages;
    const before = scroller.scrollHeight - scroller.scrollTop;
    for (const message of frame.messages || []) storeMessage(room, message);
    room.hasMore = !!frame.has_more;
    room.loaded = true;
    room.loading = false;
    if (room.id === selectedId) {
      renderSelected();
      if (older) scroller.scrollTop = scroller.scrollHeight - before; // keep the reader's place
      else scrollToBottom();
      maybeSendRead();
    }
  },

  resumed(frame) {
    const room = rooms.get(frame.room);
    if (room && frame.last_seq > room.lastSeq) room.lastSeq = frame.last_seq;
  },

  reload(frame) {
    // Too far behind for a replay: drop what we have and load the newest page again.
    const room = rooms.get(frame.room);
    if (!room) return;
    room.messages.clear();
    room.elements.clear();
    room.loaded = false;
    room.loading = false;
    room.hasMore = false;
    room.lastSeq = frame.last_seq;
    room.unread = Math.max(0, room.lastSeq - room.lastReadSeq);
    renderRoomLists();
    if (room.id === selectedId) { renderSelected(); requestHistory(room, false); }
  },

  reconnect(frame) {
    // The server is draining: it closes with 4012 next; come back after delay_ms.
    conn.serverDelay = Math.max(0, Number(frame.delay_ms) || 0);
    setConnState("reconnecting", "Server restarting…");
  },

  pong() { /* lastFrameAt is updated for every frame */ },
};

function handleFrame(frame) {
  const handler = handlers[frame.type];
  if (handler) handler(frame);
  if (namesLearned) {
    namesLearned = false;
    saveNames();
    renderHeader(); // an "N others" in the online line may now have a name
  }
}

// --- attaching rooms, history, sends -------------------------------------------------------------

function attachAll() {
  // After a reconnect, `resume` replays what was missed in every room we had seen (from lastSeq);
  // a `join` per room then refreshes membership info and the online list.
  const all = [...rooms.values()];
  const limit = 500; // schema: maxProperties of resume.rooms
  for (let i = 0; i < all.length; i += limit) {
    const chunk = {};
    for (const room of all.slice(i, i + limit)) chunk[String(room.id)] = room.lastSeq;
    if (Object.keys(chunk).length) sendFrame({ type: "resume", rooms: chunk, ref: nextRef("resume") });
  }
  for (const room of all) {
    room.attached = true;
    const ref = nextRef("join");
    requests.set(ref, { kind: "join", room: room.id });
    sendFrame({ type: "join", room: room.id, ref });
  }
  const selected = rooms.get(selectedId);
  if (selected && !selected.loaded) requestHistory(selected, false);
}

function attachRoom(room) {
  if (!socketReady() || room.attached) return;
  room.attached = true;
  sendFrame({ type: "resume", rooms: { [String(room.id)]: room.lastSeq }, ref: nextRef("resume") });
  const ref = nextRef("join");
  requests.set(ref, { kind: "join", room: room.id });
  sendFrame({ type: "join", room: room.id, ref });
}

function joinPublic(roomId) {
  if (!socketReady()) { showStatus("Not connected: try again when online.", "error"); return; }
  const ref = nextRef("join");
  requests.set(ref, { kind: "join", room: roomId, select: true });
  sendFrame({ type: "join", room: roomId, ref });
}

function requestHistory(room, older) {
  if (!socketReady() || room.loading) return;
  const frame = { type: "history", room: room.id, limit: HISTORY_PAGE, ref: nextRef("history") };
  if (older) {
    const oldest = oldestSeq(room);
    if (oldest === null || oldest <= 1) { room.hasMore = false; return; }
    frame.before_seq = oldest;
  }
  room.loading = true;
  requests.set(frame.ref, { kind: "history", room: room.id, older });
  sendFrame(frame);
  if (room.id === selectedId) renderLoadOlder();
}

function transmit(item) {
  const room = rooms.get(item.room);
  if (!room || !room.attached || !socketReady()) return;
  if (sendFrame({ type: "send", room: item.room, body: item.body, client_msg_id: item.clientMsgId })) {
    item.state = "sent";
    item.sentAt = Date.now();
    if (findPendingElement(item.clientMsgId)) renderPendingElement(item);
  }
}

function refreshPendingLabels() {
  for (const item of pending.values()) if (findPendingElement(item.clientMsgId)) renderPendingElement(item);
}

function flushPending() {
  for (const item of [...pending.values()].sort((a, b) => a.createdAt - b.createdAt)) {
    if (item.state === "queued") transmit(item);
  }
}

function sendMessage(body) {
  const room = rooms.get(selectedId);
  if (!room) return;
  const size = new TextEncoder().encode(body).length;
  if (size > conn.limits.max_body_bytes) {
    showStatus(`Message too long (${size} bytes, at most ${conn.limits.max_body_bytes}).`, "error");
    return false;
  }
  const item = {
    clientMsgId: randomId(), room: room.id, body, createdAt: Date.now(), state: "queued", sentAt: 0, seq: null,
    error: null,
  };
  pending.set(item.clientMsgId, item);
  savePending();
  renderPendingElement(item);
  scrollToBottom();
  transmit(item);
  return true;
}

/** Keep a message of a room (deduped by seq); false when the seq was already known. */
function storeMessage(room, frame) {
  if (typeof frame.seq !== "number" || room.messages.has(frame.seq)) return false;
  learnUser(frame.sender);
  room.messages.set(frame.seq, frame);
  const item = frame.client_msg_id ? pending.get(frame.client_msg_id) : null;
  if (item && frame.sender && frame.sender.id === me.id) item.seq = frame.seq; // stored, ack on its way
  return true;
}

function addMessage(frame, live) {
  const room = rooms.get(frame.room);
  if (!room) return;
  const isNew = frame.seq > room.lastSeq;
  // Dedupe: resume replays, duplicate publishes and history pages overlap.
  if (!storeMessage(room, frame)) return;
  if (isNew) room.lastSeq = frame.seq;
  const fromMe = frame.sender && frame.sender.id === me.id;
  if (frame.sender) room.typing.delete(frame.sender.id);
  const viewing = room.id === selectedId && document.visibilityState === "visible" && nearBottom();
  if (live && isNew && !fromMe && frame.seq > room.lastReadSeq && !viewing) {
    room.unread += 1;
    renderRoomLists();
  }
  if (room.id !== selectedId) return;
  const stick = nearBottom() || fromMe;
  insertMessageElement(room, frame);
  if (frame.client_msg_id && pending.has(frame.client_msg_id) && fromMe) removePendingElement(frame.client_msg_id);
  el.emptyRoom.hidden = true;
  if (live) {
    renderTyping();
    renderReceipt();
    if (stick) scrollToBottom();
    maybeSendRead();
  }
}

let readTimer = null;
function maybeSendRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const room = rooms.get(selectedId);
    if (!room || document.visibilityState !== "visible" || !nearBottom() || !socketReady()) return;
    const newest = newestSeq(room);
    if (newest > room.lastReadSeq) {
      room.lastReadSeq = newest;
      sendFrame({ type: "read", room: room.id, seq: newest });
    }
    if (room.unread) { room.unread = 0; renderRoomLists(); }
  }, 300);
}

// --- rendering ------------------------------------------------------------------------------------

function roomLabel(room) {
  if (room.kind === "bot") return `${room.name} (bot)`;
  return room.kind === "group" ? `# ${room.name}` : room.name;
}

function renderRoomLists() {
  const groups = [...rooms.values()].filter((r) => r.kind === "group").sort((a, b) => a.name.localeCompare(b.name));
  const direct = [...rooms.values()].filter((r) => r.kind !== "group").sort((a, b) => a.name.localeCompare(b.name));
  el.roomList.replaceChildren(...groups.map(roomItem));
  el.dmList.replaceChildren(...direct.map(roomItem));
  el.roomListEmpty.hidden = groups.length > 0;
  const joinable = [...publicRooms.values()].sort((a, b) => a.name.localeCompare(b.name));
  el.publicList.replaceChildren(...joinable.map(publicItem));
  el.publicListEmpty.hidden = joinable.length > 0;
  const totalUnread = [...rooms.values()].reduce((sum, r) => sum + (r.id === selectedId ? 0 : r.unread), 0);
  document.title = totalUnread ? `(${totalUnread}) Parley` : "Parley";
}

function roomItem(room) {
  const li = make("li", { attrs: { "data-testid": "room-item", "data-room-id": room.id, "data-room-name": room.name } });
  const button = make("button", { cls: "room-button", attrs: { type: "button" } });
  if (room.id === selectedId) button.setAttribute("aria-current", "true");
  const name = make("span", { cls: "room-name", text: roomLabel(room) });
  button.append(name);
  if (room.private && room.kind === "group") button.append(make("span", { cls: "tag", text: "private" }));
  if (room.unread > 0 && room.id !== selectedId) {
    button.append(make("span", {
      cls: "badge", text: room.unread > 99 ? "99+" : String(room.unread),
      attrs: { "data-testid": "unread-badge", "aria-label": `${room.unread} unread` },
    }));
  }
  button.addEventListener("click", () => selectRoom(room.id));
  li.append(button);
  return li;
}

function publicItem(room) {
  const li = make("li", { cls: "public-item", attrs: { "data-testid": "public-room", "data-room-id": room.id, "data-room-name": room.name } });
  li.append(make("span", { cls: "room-name", text: `# ${room.name}` }));
  const button = make("button", { cls: "small", text: "Join", attrs: { type: "button", "data-testid": "join-room", "aria-label": `Join ${room.name}` } });
  button.addEventListener("click", () => joinPublic(room.id));
  li.append(button);
  return li;
}

function selectRoom(id) {
  const room = rooms.get(id);
  if (!room) return;
  if (selectedId !== id) {
    selectedId = id;
    if (window.location.hash !== `#room-${id}`) history.replaceState(null, "", `#room-${id}`);
  }
  closeSidebar();
  renderRoomLists();
  renderSelected();
  scrollToBottom();
  if (!room.loaded) requestHistory(room, false);
  maybeSendRead();
  el.input.focus({ preventScroll: true });
}

function renderHeader() {
  const room = rooms.get(selectedId);
  if (!room) {
    el.roomTitle.textContent = "Pick a room";
    el.presence.textContent = "";
    el.inviteForm.hidden = true;
    return;
  }
  el.roomTitle.textContent = roomLabel(room);
  const others = [...room.online].filter((id) => id !== me.id);
  const named = others.filter((id) => usernames.has(id)).map(nameOf).sort();
  const counted = Math.max(others.length, (room.onlineCount || 0) - (room.online.has(me.id) ? 1 : 0));
  const unnamed = counted - named.length;
  if (unnamed) named.push(`${unnamed} ${unnamed === 1 ? "other" : "others"}`);
  if (!socketReady()) el.presence.textContent = "";
  else if (named.length) el.presence.textContent = `Online: ${named.join(named.length === 2 && unnamed ? " and " : ", ")}`;
  else el.presence.textContent = room.kind === "group" ? "Only you are here right now" : "";
  el.inviteForm.hidden = room.kind !== "group";
  el.input.placeholder = `Message ${roomLabel(room)}`;
}

function renderSelected() {
  renderHeader();
  const room = rooms.get(selectedId);
  // A full re-render (room switch, history page) must not be read out as a flood of new messages.
  el.messageList.setAttribute("aria-live", "off");
  requestAnimationFrame(() => el.messageList.setAttribute("aria-live", "polite"));
  el.messageList.replaceChildren();
  if (room) {
    room.elements.clear();
    for (const seq of [...room.messages.keys()].sort((a, b) => a - b)) {
      const element = messageElement(room.messages.get(seq));
      room.elements.set(seq, element);
      el.messageList.append(element);
    }
    for (const item of pending.values()) {
      if (item.room === room.id && !(item.seq !== null && room.messages.has(item.seq))) {
        el.messageList.append(pendingElement(item));
      }
    }
    const shown = el.messageList.children.length > 0;
    if (!room.loaded && !shown) {
      el.emptyRoom.textContent = socketReady() ? "Loading messages…" : "Waiting for the connection…";
    } else {
      el.emptyRoom.textContent = shown ? "" : "No messages yet: say hello!";
    }
    el.emptyRoom.hidden = shown;
    el.messages.dataset.loaded = String(room.loaded);
  } else {
    el.emptyRoom.hidden = false;
    el.emptyRoom.textContent = "Pick a room on the left, or start a chat.";
  }
  renderLoadOlder();
  renderTyping();
  renderReceipt();
  updateComposer();
}

function renderLoadOlder() {
  const room = rooms.get(selectedId);
  el.loadOlder.hidden = !(room && room.loaded && room.hasMore);
  el.loadOlder.disabled = !!(room && room.loading);
  el.loadOlder.textContent = room && room.loading ? "Loading…" : "Load older messages";
}

function messageElement(message) {
  const fromMe = message.sender && message.sender.id === me.id;
  const li = make("li", {
    cls: `message${fromMe ? " mine" : ""}${message.kind && message.kind !== "text" ? ` kind-${message.kind}` : ""}`,
    attrs: { "data-testid": "message", "data-seq": message.seq },
  });
  if (message.client_msg_id) li.dataset.clientMsgId = message.client_msg_id;
  const meta = make("div", { cls: "meta" });
  meta.append(make("span", {
    cls: "sender", text: message.sender ? message.sender.username : "system", attrs: { "data-testid": "message-sender" },
  }));
  const time = make("time", { text: formatTime(message.sent_at), attrs: { datetime: message.sent_at || "" } });
  if (message.sent_at) time.title = new Date(message.sent_at).toLocaleString();
  meta.append(time);
  li.append(meta, make("p", { cls: "body", text: message.body, attrs: { "data-testid": "message-body" } }));
  if (fromMe && message.client_msg_id && pending.has(message.client_msg_id)) markPending(li);
  return li;
}

function markPending(li) {
  li.dataset.pending = "true";
  li.classList.add("pending");
  if (!li.querySelector(".pending-marker")) {
    li.querySelector(".meta").append(make("span", {
      cls: "pending-marker", text: "sending…", attrs: { "data-testid": "pending-marker" },
    }));
  }
}

function markDelivered(li) {
  delete li.dataset.pending;
  li.classList.remove("pending");
  const marker = li.querySelector(".pending-marker");
  if (marker) marker.remove();
}

function insertMessageElement(room, message) {
  const element = messageElement(message);
  room.elements.set(message.seq, element);
  // Insert before the first rendered message with a higher seq, else before pending sends.
  let next = null;
  for (const [seq, other] of room.elements) {
    if (seq > message.seq && other.isConnected && (next === null || seq < Number(next.dataset.seq))) next = other;
  }
  if (!next) next = el.messageList.querySelector("li[data-local]");
  el.messageList.insertBefore(element, next);
}

function pendingElement(item) {
  const li = make("li", {
    cls: "message mine pending",
    attrs: { "data-testid": "message", "data-local": "true", "data-pending": "true", "data-client-msg-id": item.clientMsgId },
  });
  const meta = make("div", { cls: "meta" });
  meta.append(make("span", { cls: "sender", text: me.username, attrs: { "data-testid": "message-sender" } }));
  if (item.state === "failed") {
    li.classList.add("failed");
    meta.append(make("span", { cls: "pending-marker failed", text: `not sent: ${item.error || "error"}`, attrs: { "data-testid": "pending-marker" } }));
    const retry = make("button", { cls: "small", text: "Retry", attrs: { type: "button", "data-testid": "retry-send" } });
    retry.addEventListener("click", () => { item.state = "queued"; item.error = null; renderPendingElement(item); transmit(item); });
    const discard = make("button", { cls: "small secondary", text: "Discard", attrs: { type: "button" } });
    discard.addEventListener("click", () => { pending.delete(item.clientMsgId); savePending(); removePendingElement(item.clientMsgId); });
    meta.append(retry, discard);
  } else {
    meta.append(make("span", {
      cls: "pending-marker", text: socketReady() ? "sending…" : "waiting for connection…", attrs: { "data-testid": "pending-marker" },
    }));
  }
  li.append(meta, make("p", { cls: "body", text: item.body, attrs: { "data-testid": "message-body" } }));
  return li;
}

function findPendingElement(clientMsgId) {
  for (const li of el.messageList.querySelectorAll("li[data-local]")) {
    if (li.dataset.clientMsgId === clientMsgId) return li;
  }
  return null;
}

function renderPendingElement(item) {
  if (item.room !== selectedId) return;
  const fresh = pendingElement(item);
  const old = findPendingElement(item.clientMsgId);
  if (old) old.replaceWith(fresh);
  else el.messageList.append(fresh);
  el.emptyRoom.hidden = true;
}

function removePendingElement(clientMsgId) {
  const old = findPendingElement(clientMsgId);
  if (old) old.remove();
}

function renderTyping() {
  const room = rooms.get(selectedId);
  if (!room) { el.typing.textContent = ""; return; }
  const now = Date.now();
  const names = [];
  for (const [userId, until] of room.typing) {
    if (until > now) names.push(nameOf(userId));
    else room.typing.delete(userId);
  }
  if (!names.length) el.typing.textContent = "";
  else if (names.length === 1) el.typing.textContent = `${names[0]} is typing…`;
  else if (names.length <= 3) el.typing.textContent = `${names.join(", ")} are typing…`;
  else el.typing.textContent = "Several people are typing…";
}

function renderReceipt() {
  const room = rooms.get(selectedId);
  const newest = room ? newestSeq(room) : 0;
  const readers = room && newest ? [...room.readers].filter(([id, seq]) => id !== me.id && seq >= newest).map(([id]) => nameOf(id)) : [];
  el.readReceipt.hidden = readers.length === 0;
  el.readReceipt.textContent = readers.length ? `Seen by ${readers.sort().join(", ")}` : "";
}

function updateComposer() {
  const room = rooms.get(selectedId);
  el.input.disabled = !room; // typing offline is fine: sends wait in `pending`
  el.sendButton.disabled = !room;
}

function nearBottom() {
  const s = el.messages;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function closeSidebar() {
  app.classList.remove("sidebar-open");
  el.menuToggle.setAttribute("aria-expanded", "false");
}

// --- user actions ---------------------------------------------------------------------------------

el.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const body = el.input.value.trim();
  if (!body || !rooms.has(selectedId)) return;
  if (sendMessage(body) !== false) {
    el.input.value = "";
    lastTypingSent = 0;
    autosize();
  }
});

el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    el.composer.requestSubmit();
  }
});

function autosize() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight, 160)}px`;
}

el.input.addEventListener("input", () => {
  autosize();
  const room = rooms.get(selectedId);
  const now = Date.now();
  if (room && room.attached && el.input.value.trim() && now - lastTypingSent >= TYPING_EVERY_MS && socketReady()) {
    lastTypingSent = now;
    sendFrame({ type: "typing", room: room.id });
  }
});

el.loadOlder.addEventListener("click", () => {
  const room = rooms.get(selectedId);
  if (room) requestHistory(room, true);
});

el.messages.addEventListener("scroll", () => { if (nearBottom()) maybeSendRead(); }, { passive: true });

el.menuToggle.addEventListener("click", () => {
  const open = app.classList.toggle("sidebar-open");
  el.menuToggle.setAttribute("aria-expanded", String(open));
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && app.classList.contains("sidebar-open")) { closeSidebar(); el.menuToggle.focus(); }
});

el.refreshRooms.addEventListener("click", () => {
  loadRooms().then(() => showStatus("Room list refreshed.")).catch((error) => showStatus(error.message, "error"));
});

function busy(form, on) {
  for (const control of form.querySelectorAll("button, input")) control.disabled = on;
}

el.createForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = el.createName.value.trim();
  if (!name) return;
  busy(el.createForm, true);
  try {
    const data = await api("POST", "/api/rooms", { name, kind: "group", private: el.createPrivate.checked });
    const room = upsertRoom({ ...data, last_read_seq: 0, unread: 0 });
    el.createName.value = "";
    el.createPrivate.checked = false;
    attachRoom(room);
    renderRoomLists();
    selectRoom(room.id);
    showStatus(`Created ${data.name}.`);
  } catch (error) {
    showStatus(`Could not create the room: ${error.message}`, "error");
  } finally {
    busy(el.createForm, false);
  }
});

el.dmForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = el.dmUser.value.trim();
  if (!user) return;
  busy(el.dmForm, true);
  try {
    const data = await api("POST", "/api/dms", { user });
    const known = rooms.has(data.id);
    const room = upsertRoom({ ...data, last_read_seq: 0 });
    if (!known) room.unread = 0; // history loads when it is shown
    el.dmUser.value = "";
    attachRoom(room);
    renderRoomLists();
    selectRoom(room.id);
  } catch (error) {
    showStatus(`Could not open a chat with ${user}: ${error.message}`, "error");
  } finally {
    busy(el.dmForm, false);
  }
});

el.inviteForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = el.inviteUser.value.trim();
  const room = rooms.get(selectedId);
  if (!user || !room) return;
  busy(el.inviteForm, true);
  try {
    await api("POST", `/api/rooms/${room.id}/members`, { user });
    el.inviteUser.value = "";
    showStatus(`Invited ${user} to ${room.name}.`);
  } catch (error) {
    showStatus(`Could not invite ${user}: ${error.message}`, "error");
  } finally {
    busy(el.inviteForm, false);
  }
});

window.addEventListener("hashchange", () => {
  const match = /^#room-(\d+)$/.exec(window.location.hash);
  if (match && rooms.has(Number(match[1]))) selectRoom(Number(match[1]));
});

// Other people's new DMs and invitations have no push frame: look for them now and then.
setInterval(() => {
  if (document.visibilityState === "visible" && socketReady()) loadRooms().catch(() => {});
}, 30000);

// --- start ------------------------------------------------------------------------------------------

async function start() {
  restorePending();
  renderSelected();
  for (let attempt = 0; ; attempt += 1) {
    try {
      await loadRooms();
      break;
    } catch (error) {
      showStatus(`Could not load rooms: ${error.message}`, "error");
      await new Promise((resolve) => setTimeout(resolve, Math.min(10000, 500 * 2 ** attempt)));
    }
  }
  const match = /^#room-(\d+)$/.exec(window.location.hash);
  const wanted = match ? Number(match[1]) : null;
  if (wanted && rooms.has(wanted)) selectRoom(wanted);
  else renderSelected();
  connect();
}

start();
