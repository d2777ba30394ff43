/*
 * tank.js: the browser client of Tank for Python, served by `tank serve` at /tank.js.
 *
 * One dependency-free ES module, a drop-in superset of tank-websocket.js 2.0.3:
 *
 *     import TankWebSocket from "/tank.js";              // or: import { SocketClient } from "/tank.js";
 *     const twsc = new TankWebSocket.SocketClient("ws://127.0.0.1:8080/ws?user_id=alice", {
 *         heartbeat: true, heartbeatInterval: 5000, heartbeatTimeout: 15000,
 *     });
 *     twsc.subTopic("news", (data) => console.log("news:", data));
 *     twsc.onHeartbeat(() => console.log("the server is alive"));
 *     twsc.onHeartbeatTimeout((silentFor) => console.log(`nothing for ${silentFor} ms`));
 *
 * Everything 2.0.3 has is here with the same name and meaning (PROTOCOL.md, "What the JS client
 * (2.0.3) does"): topic messages are recognised exactly as 2.0.3 does, topic callbacks run before
 * the onMessage handlers, every text (the Hello, the server's `heartbeat`, relays) reaches onMessage.
 * What differs, on purpose (docs/browser.md):
 *   - one callback per topic (a second subTopic of a held topic replaces the callback and sends
 *     nothing), one `sub:` per held topic on every open, and a socket that was given up never
 *     delivers anything again: each message reaches each callback once, however many reconnects;
 *   - reconnect with exponential backoff and full jitter: attempt n waits a random time in
 *     [0, min(reconnectMaxDelay, interval * 2^(n-1))], interval = 500 ms by default and set by
 *     setReConnectInterval(ms); never 2.0.3's fixed one-second tick;
 *   - heartbeat (on by default): `{"type":"heartbeat"}` every heartbeatInterval (the server counts
 *     it as life and never relays it); when nothing at all has arrived for heartbeatTimeout, the
 *     onHeartbeatTimeout handlers run, the socket is given up (onClose gets code 1006, reason
 *     "heartbeat timeout") and the client reconnects;
 *   - send() while disconnected queues (up to sendQueueLimit messages), flushed in order after the
 *     next open's `sub:` frames; it returns true when written or queued, false when refused;
 *   - a callback that throws is logged and the others still run; logging is off unless debug;
 *   - recovery (option recover, on by default): with a server that keeps a history the client
 *     offers the subprotocol tank.recovery.v1, remembers each topic's place and subscribes from
 *     there on every reconnect, so what was published meanwhile arrives once, in order;
 *     onRecover(topic, complete) says whether that was all of it (docs/browser.md).
 */

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/** The server's text heartbeat (PROTOCOL.md). */
const SERVER_HEARTBEAT = "heartbeat";
/** The recovery extension's subprotocol (docs/explanation/protocol.md, "Recovery"). */
const RECOVERY = "tank.recovery.v1";
const RECOVERED_PREFIX = '{"type":"recovered"';
/** Our heartbeat: proof of life for the server, never relayed. */
const CLIENT_HEARTBEAT = '{"type":"heartbeat"}';
/** The code our own close() of a socket we give up carries (the server only logs it). */
const GIVE_UP_CODE = 4000;

const HELLO_PREFIX = "Hello, ";
const HELLO_SUFFIX = "! Welcome to WebSocket server.";

const DEFAULTS = Object.freeze({
  heartbeat: true,
  heartbeatInterval: 5000,
  heartbeatTimeout: 15000,
  reconnectInterval: 500,
  reconnectMaxDelay: 30000,
  connectTimeout: 10000,
  sendQueueLimit: 1000,
  debug: false,
  recover: true,
  WebSocket: null,
});

const now = typeof performance !== "undefined" && typeof performance.now === "function"
  ? () => performance.now()
  : () => Date.now();

function positiveNumber(options, name) {
  const value = options[name];
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`tank.js: option ${name} must be a number > 0, got ${String(value)}`);
  }
}

function validate(options) {
  if (options === null || typeof options !== "object") {
    throw new TypeError("tank.js: options must be an object");
  }
  for (const name of Object.keys(options)) {
    if (!Object.prototype.hasOwnProperty.call(DEFAULTS, name)) {
      throw new TypeError(`tank.js: unknown option ${name}`);
    }
  }
  const merged = { ...DEFAULTS, ...options };
  merged.heartbeat = Boolean(merged.heartbeat);
  merged.debug = Boolean(merged.debug);
  merged.recover = Boolean(merged.recover);
  for (const name of ["heartbeatInterval", "heartbeatTimeout", "reconnectInterval",
    "reconnectMaxDelay", "connectTimeout"]) {
    positiveNumber(merged, name);
  }
  if (merged.heartbeatTimeout <= merged.heartbeatInterval) {
    throw new RangeError("tank.js: heartbeatTimeout must be greater than heartbeatInterval");
  }
  if (merged.reconnectMaxDelay < merged.reconnectInterval) {
    throw new RangeError("tank.js: reconnectMaxDelay must be at least reconnectInterval");
  }
  if (!Number.isInteger(merged.sendQueueLimit) || merged.sendQueueLimit < 0) {
    throw new RangeError("tank.js: option sendQueueLimit must be an integer >= 0");
  }
  if (merged.WebSocket !== null && typeof merged.WebSocket !== "function") {
    throw new TypeError("tank.js: option WebSocket must be a WebSocket constructor");
  }
  return Object.freeze(merged);
}

function closeEvent(target, code, reason) {
  const init = { code, reason, wasClean: false };
  if (typeof CloseEvent === "function") {
    const event = new CloseEvent("close", init);
    return event;
  }
  return { type: "close", target, ...init };
}

function emptyEvents() {
  return {
    open: new Set(),
    message: new Set(),
    error: new Set(),
    close: new Set(),
    heartbeat: new Set(),
    heartbeatTimeout: new Set(),
    reconnect: new Set(),
    recover: new Set(),
  };
}

export class SocketClient {
  /**
   * Create a client and start connecting at once.
   * @param url {string} WebSocket URL, e.g. ws://127.0.0.1:8080/ws?user_id=alice
   * @param options {{heartbeat?: boolean, heartbeatInterval?: number, heartbeatTimeout?: number,
   *   reconnectInterval?: number, reconnectMaxDelay?: number, connectTimeout?: number,
   *   sendQueueLimit?: number, debug?: boolean, WebSocket?: Function}} times in milliseconds
   */
  constructor(url, options = {}) {
    this.options = validate(options);
    /** @type {WebSocket|null} the current (or last) socket, as in 2.0.3 */
    this.ws = null;
    this.events = emptyEvents();
    this.debug = this.options.debug;
    this.lastReConnTime = Date.now();
    /** base of the backoff, in ms (setReConnectInterval) */
    this.interval = this.options.reconnectInterval;
    this.url = url;
    this.useReConn = true;
    /** @type {{topic: any, callback: Function|null}[]} held topics, one entry each */
    this.topics = [];
    /** the id named by the server's latest Hello frame, or null before the first */
    this.userId = null;

    this._socket = null; // the socket whose events we act on; null when none is live
    this._closed = false; // close() was called: closed for good
    this._everOpened = false;
    this._attempt = 0; // attempts since the last open
    this._queue = [];
    this._lastSeen = 0;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._heartbeatTimer = null;
    this._watchdogTimer = null;
    this._recovering = false; // the live socket agreed the recovery extension
    this._positions = new Map(); // topic -> {epoch, offset}: its place in the server's history

    this._connect(true);
  }

  // ------------------------------------------------------------------ connection

  _log(...args) {
    if (this.debug) console.log("tank.js:", ...args);
  }

  _connect(first = false) {
    const Ctor = this.options.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      ws = this.options.recover ? new Ctor(this.url, [RECOVERY]) : new Ctor(this.url);
    } catch (error) {
      if (first) throw error; // a bad URL: the constructor throws, as 2.0.3's does
      this._log("cannot connect", error);
      this._scheduleReconnect();
      return;
    }
    this.ws = ws;
    this._socket = ws;
    ws.addEventListener("open", (event) => {
      if (this._socket === ws) this._opened(ws, event);
    });
    ws.addEventListener("message", (event) => {
      if (this._socket === ws) this._received(event);
    });
    ws.addEventListener("error", (event) => {
      if (this._socket === ws) this._emit("error", event);
    });
    ws.addEventListener("close", (event) => {
      if (this._socket === ws) this._ended(event);
    });
    this._connectTimer = setTimeout(() => {
      this._connectTimer = null;
      if (this._socket === ws && ws.readyState === CONNECTING) {
        this._giveUp(ws, "connect timeout");
      }
    }, this.options.connectTimeout);
  }

  _opened(ws, event) {
    this._clearTimer("_connectTimer");
    this.lastReConnTime = Date.now();
    const reconnected = this._everOpened;
    const attempts = this._attempt;
    this._everOpened = true;
    this._attempt = 0;
    this._lastSeen = now();
    this._recovering = ws.protocol === RECOVERY;
    for (const entry of this.topics) this._write(ws, this._subscribeText(entry.topic));
    while (this._queue.length > 0 && this._socket === ws && ws.readyState === OPEN) {
      this._write(ws, this._queue.shift());
    }
    if (this.options.heartbeat) {
      this._heartbeatTimer = setInterval(() => {
        if (this._socket === ws && ws.readyState === OPEN) this._write(ws, CLIENT_HEARTBEAT);
      }, this.options.heartbeatInterval);
      this._armWatchdog(ws);
    }
    this._log("open", this.url);
    this._emit("open", event);
    if (reconnected && this._socket === ws) this._emit("reconnect", attempts);
  }

  /** `sub:topic`, or with the recovery extension `recover:` from the topic's place. */
  _subscribeText(topic) {
    if (!this._recovering) return `sub:${topic}`;
    const at = this._positions.get(topic);
    const command = at ? { topic, epoch: at.epoch, offset: at.offset } : { topic };
    return `recover:${JSON.stringify(command)}`;
  }

  /** A `recovered` message: note the topic's place, tell onRecover; never an app message. */
  _recovered(text) {
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      return;
    }
    if (!parsed || typeof parsed.epoch !== "string" || !Number.isInteger(parsed.offset)) return;
    this._positions.set(parsed.topic, { epoch: parsed.epoch, offset: parsed.offset });
    this._emit("recover", parsed.topic, parsed.complete === true);
  }

  _received(event) {
    this._lastSeen = now();
    const data = event.data;
    if (this._recovering && typeof data === "string" && data.startsWith(RECOVERED_PREFIX)) {
      this._recovered(data);
      return;
    }
    if (typeof data === "string") {
      if (data === SERVER_HEARTBEAT) {
        this._emit("heartbeat", event);
      } else if (data.startsWith(HELLO_PREFIX) && data.endsWith(HELLO_SUFFIX)) {
        this.userId = data.slice(HELLO_PREFIX.length, data.length - HELLO_SUFFIX.length);
      }
      this._dispatchTopic(data);
    }
    // 2.0.3: every message, the welcome and the text heartbeats included, reaches onMessage.
    this._emit("message", event);
  }

  /** Topic recognition exactly as tank-websocket.js 2.0.3 does it (PROTOCOL.md). */
  _dispatchTopic(text) {
    if (text.indexOf("topic") <= 0) return; // absent, or at index 0: not a topic message
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      if (this.debug) console.error("tank.js: not JSON", error);
      return;
    }
    if (!parsed || !parsed.topic) return;
    if (this._recovering && typeof parsed.epoch === "string" && Number.isInteger(parsed.offset)) {
      this._positions.set(parsed.topic, { epoch: parsed.epoch, offset: parsed.offset });
    }
    const entry = this.topics.find((t) => t.topic === parsed.topic);
    if (entry && typeof entry.callback === "function") {
      this._call(entry.callback, parsed.data);
    }
  }

  _ended(event) {
    this._socket = null;
    this._stopTimers();
    this._log("close", event.code, event.reason);
    this._emit("close", event);
    this._scheduleReconnect();
  }

  /** Stop listening to `ws` (nothing it delivers counts any more), close it, report 1006. */
  _giveUp(ws, reason) {
    this._socket = null;
    this._stopTimers();
    try {
      ws.close(GIVE_UP_CODE, reason);
    } catch (error) {
      this._log("close failed", error);
    }
    this._log("gave up the connection:", reason);
    this._emit("close", closeEvent(ws, 1006, reason));
    this._scheduleReconnect();
  }

  _armWatchdog(ws) {
    this._clearTimer("_watchdogTimer");
    const left = this._lastSeen + this.options.heartbeatTimeout - now();
    this._watchdogTimer = setTimeout(() => {
      this._watchdogTimer = null;
      if (this._socket !== ws) return;
      const silentFor = now() - this._lastSeen;
      if (silentFor >= this.options.heartbeatTimeout) {
        this._emit("heartbeatTimeout", silentFor);
        if (this._socket === ws) this._giveUp(ws, "heartbeat timeout");
      } else {
        this._armWatchdog(ws);
      }
    }, Math.max(0, left));
  }

  _scheduleReconnect() {
    if (this._closed || !this.useReConn || this._socket !== null || this._reconnectTimer !== null) {
      return;
    }
    this._attempt += 1;
    const bound = Math.min(this.options.reconnectMaxDelay,
      this.interval * 2 ** Math.min(this._attempt - 1, 52));
    const delay = Math.random() * bound; // full jitter
    this._log(`reconnect attempt ${this._attempt} in ${Math.round(delay)} ms`);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closed && this.useReConn && this._socket === null) this._connect();
    }, delay);
  }

  _clearTimer(name) {
    if (this[name] !== null) {
      clearTimeout(this[name]);
      clearInterval(this[name]);
      this[name] = null;
    }
  }

  _stopTimers() {
    this._clearTimer("_connectTimer");
    this._clearTimer("_heartbeatTimer");
    this._clearTimer("_watchdogTimer");
  }

  _write(ws, data) {
    try {
      ws.send(data);
      return true;
    } catch (error) {
      this._log("send failed", error);
      return false;
    }
  }

  _live() {
    const ws = this._socket;
    return ws !== null && ws.readyState === OPEN ? ws : null;
  }

  _call(func, ...args) {
    try {
      func(...args);
    } catch (error) {
      console.error("tank.js: a callback threw", error);
    }
  }

  _emit(kind, ...args) {
    for (const func of Array.from(this.events[kind])) this._call(func, ...args);
  }

  // ------------------------------------------------------------------ 2.0.3 API

  /** @return {WebSocket|null} the current socket (null after close()) */
  getOriginInstance() {
    return this.ws;
  }

  /** @param debug {boolean} log to the console */
  setDebug(debug) {
    this.debug = Boolean(debug);
  }

  /**
   * As in 2.0.3: disableReConnect(true) stops reconnecting, disableReConnect(false) (and, 2.0.3's
   * default argument, disableReConnect()) turns it back on, reconnecting at once when closed.
   * @param disable {boolean}
   */
  disableReConnect(disable = false) {
    this.useReConn = !disable;
    if (disable) {
      this._clearTimer("_reconnectTimer");
    } else {
      this._scheduleReconnect();
    }
  }

  /** @param interval {number} ms: the backoff's base (first retry within it); default 500 */
  setReConnectInterval(interval) {
    if (typeof interval === "number" && Number.isFinite(interval) && interval > 0) {
      this.interval = interval;
    } else {
      console.warn("tank.js: setReConnectInterval needs a number of ms > 0, got", interval);
    }
  }

  /**
   * Send a text (or binary) message: written now when open, else queued for the next open.
   * @param data {string|ArrayBufferLike|Blob|ArrayBufferView}
   * @return {boolean} true when written or queued
   */
  send(data) {
    if (this._closed) {
      this._log("send after close() ignored");
      return false;
    }
    const ws = this._live();
    if (ws !== null) return this._write(ws, data);
    if (this._queue.length >= this.options.sendQueueLimit) {
      console.warn(`tank.js: not connected and ${this._queue.length} messages are queued`
        + " (sendQueueLimit): message refused");
      return false;
    }
    this._queue.push(data);
    return true;
  }

  /**
   * Close for good: `unsub:` per held topic, a Close frame (no status code unless given), no
   * reconnect, every handler forgotten (as 2.0.3). Idempotent.
   */
  close(code, reason) {
    if (this._closed) return;
    this.destroyTopics();
    this.useReConn = false;
    this._closed = true;
    this._stopTimers();
    this._clearTimer("_reconnectTimer");
    this._queue = [];
    const ws = this.ws;
    this._socket = null;
    if (ws !== null && ws.readyState !== CLOSING && ws.readyState !== CLOSED) {
      try {
        if (code === undefined) ws.close();
        else ws.close(code, reason);
      } catch (error) {
        console.warn("tank.js: close failed", error);
      }
    }
    this.ws = null;
    this.events = emptyEvents();
  }

  /** Same as close(). */
  disconnect() {
    this.close();
  }

  isClose() {
    return this.ws === null || this.ws.readyState === CLOSED;
  }

  isConnecting() {
    return this.ws !== null && this.ws.readyState === CONNECTING;
  }

  isOpen() {
    return this.ws !== null && this.ws.readyState === OPEN;
  }

  isClosing() {
    return this.ws !== null && this.ws.readyState === CLOSING;
  }

  /** @param func {(event: Event) => void} after each open, once its `sub:` frames are written */
  onOpen(func) {
    if (typeof func === "function") this.events.open.add(func);
  }

  /** @param func {(event: MessageEvent) => void} every message, after its topic callback */
  onMessage(func) {
    if (typeof func === "function") this.events.message.add(func);
  }

  /** @param func {(event: Event) => void} */
  onError(func) {
    if (typeof func === "function") this.events.error.add(func);
  }

  /** @param func {(event: CloseEvent) => void} each time a connection or an attempt ends */
  onClose(func) {
    if (typeof func === "function") this.events.close.add(func);
  }

  offCloseEvent() {
    this.events.close.clear();
  }

  offErrorEvent() {
    this.events.error.clear();
  }

  offMessageEvent() {
    this.events.message.clear();
  }

  offOpenEvent() {
    this.events.open.clear();
  }

  /**
   * Hold `topic`: `sub:topic` now when open, and once on every later open. Holding it already:
   * a function `callback` replaces the previous one, nothing is sent.
   * @param topic {string}
   * @param callback {(data: any) => void} called with the message's `data`
   */
  subTopic(topic, callback) {
    if (this._closed) {
      this._log("subTopic after close() ignored");
      return;
    }
    const held = this.topics.find((t) => t.topic === topic);
    if (held) {
      if (typeof callback === "function") held.callback = callback;
      return;
    }
    this.topics.push({ topic, callback: typeof callback === "function" ? callback : null });
    const ws = this._live();
    if (ws !== null) this._write(ws, this._subscribeText(topic));
  }

  /** Stop holding `topic`; `unsub:topic` when open (even when not held, as 2.0.3). */
  unsubTopic(topic) {
    this.topics = this.topics.filter((t) => t.topic !== topic);
    this._positions.delete(topic);
    const ws = this._live();
    if (ws !== null) this._write(ws, `unsub:${topic}`);
  }

  /** Stop holding every topic: `unsub:` for each when open. */
  destroyTopics() {
    const ws = this._live();
    if (ws !== null) {
      for (const entry of this.topics) this._write(ws, `unsub:${entry.topic}`);
    }
    this.topics = [];
  }

  // ------------------------------------------------------------------ additions

  /** @param func {(event: MessageEvent) => void} each text `heartbeat` from the server */
  onHeartbeat(func) {
    if (typeof func === "function") this.events.heartbeat.add(func);
  }

  /**
   * @param func {(silentFor: number) => void} nothing arrived for heartbeatTimeout ms: called with
   * the silence in ms, then the socket is given up (onClose: 1006 "heartbeat timeout") and the
   * client reconnects
   */
  onHeartbeatTimeout(func) {
    if (typeof func === "function") this.events.heartbeatTimeout.add(func);
  }

  /** @param func {(attempts: number) => void} a connection other than the first opened */
  onReconnect(func) {
    if (typeof func === "function") this.events.reconnect.add(func);
  }

  /**
   * @param func {(topic: any, complete: boolean) => void} with a server that keeps a history:
   * a subscription learned its place, or after a reconnect the server replayed what the topic
   * missed (complete) or could not (reload that topic's state)
   */
  onRecover(func) {
    if (typeof func === "function") this.events.recover.add(func);
  }

  offRecoverEvent() {
    this.events.recover.clear();
  }

  offHeartbeatEvent() {
    this.events.heartbeat.clear();
  }

  offHeartbeatTimeoutEvent() {
    this.events.heartbeatTimeout.clear();
  }

  offReconnectEvent() {
    this.events.reconnect.clear();
  }
}

let singleton = null;

/**
 * 2.0.3's single-instance helper: the first call creates the client, later ones return it.
 * @param url {string}
 * @param options {object}
 * @return {SocketClient}
 */
export function useSocketClient(url = "", options = undefined) {
  if (!url && singleton === null) {
    throw new Error("must param at `url`");
  }
  if (singleton === null) singleton = new SocketClient(url, options);
  return singleton;
}

export default { SocketClient, useSocketClient };
