'use strict';
/*
 * A replay of the tank-websocket.js 2.0.3 client (its `SocketClient`), over Node's `ws` package.
 *
 * tank-websocket.js is not published on the npm registry, so this file reproduces, from the
 * behaviour described in PROTOCOL.md ("What the JS client (2.0.3) does with what it receives"),
 * everything a server can observe from that client:
 *   - topic classification: a text message whose FIRST "topic" substring is at index 0 or absent
 *     is not a topic message; otherwise JSON.parse (a failure is logged and ignored), and when the
 *     parsed value has a truthy `topic`, every stored entry whose topic === it gets its callback
 *     called with `data`, whatever its JSON type; the raw event then goes to every onMessage handler;
 *   - `sub:T` for every stored entry on every successful open; subTopic() sends `sub:T` at once
 *     (and its dedupe is broken, so an entry is added each time);
 *   - a fixed 1 s polling tick that opens a new socket, same URL, after any close it did not ask for;
 *   - close(): `unsub:T` per stored entry, then a Close frame with no status code, no reconnect.
 *   - nothing at all for heartbeat (the text `heartbeat` reaches onMessage; ws answers Pings).
 *
 * Harness (not part of the client's behaviour): usage `node tank_client_replay.js URL`; commands
 * arrive as JSON lines on stdin ({"cmd":"sub","topic":T} | unsub | send {"data":D} | close | exit)
 * and every observable event is written as one JSON line on stdout, with `t` = ms since start.
 * The client's own console logging goes to stderr.
 */

const WebSocket = require('ws');
const readline = require('readline');

const started = Date.now();
function emit(event) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...event }) + '\n');
}
function log(...args) {
  process.stderr.write(args.map((a) => (typeof a === 'string' ? a : String(a))).join(' ') + '\n');
}

class SocketClient {
  constructor(url) {
    this.ws = null;
    this.events = { open: new Set(), message: new Set(), error: new Set(), close: new Set() };
    this.debug = true;
    this.lastReConnTime = Date.now();
    this.interval = 1000;
    this.url = url;
    this.useReConn = true;
    this.topics = [];

    this.ws = this._newSocket();
    this.checkConn();
    this._defineEvents();

    // The client's own handlers come first: topic callbacks run before the application's
    // onMessage handlers, and the stored subscriptions are sent on every open.
    this.onOpen((event) => {
      if (this.debug) log('socket open');
      this._sendSubscribeToServer();
    });
    this.onClose((event) => {
      if (this.debug) log('socket close', event.code);
    });
    this.onMessage((event) => {
      if (this.debug) log('socket receive', event.data);
      this._subscribeOnMessageReceive(event);
    });
    this.onError((event) => {
      if (this.debug) log('socket exception', event.message || '');
    });
  }

  _newSocket() {
    emit({ ev: 'connecting' });
    return new WebSocket(this.url);
  }

  _sendSubscribeToServer() {
    this.topics.forEach((entry) => this.send(`sub:${entry.topic}`));
  }

  _subscribeOnMessageReceive(event) {
    const at = event.data.indexOf('topic');
    if (at <= 0) {
      return; // absent, or at index 0: not a topic message
    }
    let parsed;
    try {
      parsed = JSON.parse(event.data);
    } catch (e) {
      log('error', e.message);
      emit({ ev: 'parse-error', data: event.data });
      return;
    }
    if (parsed && parsed.topic) {
      this.topics.forEach((entry) => {
        if (entry.topic === parsed.topic) entry.callback(parsed.data);
      });
    }
  }

  checkConn() {
    setTimeout(() => {
      if (this.useReConn && this.ws && this.ws.readyState > 1
          && Date.now() - this.lastReConnTime > this.interval) {
        log('reconnect socket', this.url);
        this.ws = this._newSocket();
        this._defineEvents();
      }
      if (this.ws) this.checkConn();
    }, 1000);
  }

  _defineEvents() {
    const ws = this.ws;
    ws.addEventListener('message', (event) => this._emit('message', event));
    ws.addEventListener('open', (event) => {
      this.lastReConnTime = Date.now();
      this._emit('open', event);
    });
    ws.addEventListener('close', (event) => this._emit('close', event));
    ws.addEventListener('error', (event) => this._emit('error', event));
  }

  _emit(kind, event) {
    this.events[kind].forEach((func) => func(event));
  }

  send(data) {
    try {
      this.ws.send(data);
    } catch (e) {
      log(e.message);
    }
  }

  close() {
    this.destroyTopics();
    this.useReConn = false;
    this.ws.close();
    this.ws = null;
    this.events = { open: new Set(), message: new Set(), error: new Set(), close: new Set() };
  }

  onOpen(func) { if (typeof func === 'function') this.events.open.add(func); }
  onMessage(func) { if (typeof func === 'function') this.events.message.add(func); }
  onError(func) { if (typeof func === 'function') this.events.error.add(func); }
  onClose(func) { if (typeof func === 'function') this.events.close.add(func); }

  subTopic(topic, callback) {
    // 2.0.3 compares a string with stored entry objects, so this is always true.
    if (!this.topics.includes(topic)) {
      this.topics.push({ topic, callback });
      this.send(`sub:${topic}`);
    }
  }

  unsubTopic(topic) {
    if (!this.topics.includes(topic)) {
      this.topics = this.topics.filter((entry) => entry.topic !== topic);
      this.send(`unsub:${topic}`);
    }
  }

  destroyTopics() {
    this.topics.forEach((entry) => this.send(`unsub:${entry.topic}`));
    this.topics = [];
  }
}

// ------------------------------------------------------------------------------ harness

const url = process.argv[2];
if (!url) {
  log('usage: node tank_client_replay.js ws://127.0.0.1:PORT/ws?user_id=ID');
  process.exit(2);
}

const client = new SocketClient(url);
const originalSend = client.send.bind(client);
client.send = (data) => {
  emit({ ev: 'sent', data: String(data), readyState: client.ws ? client.ws.readyState : -1 });
  originalSend(data);
};
client.onOpen(() => emit({ ev: 'open' }));
client.onMessage((event) => emit({ ev: 'message', data: event.data }));
client.onClose((event) => emit({ ev: 'close', code: event.code, reason: event.reason }));
client.onError((event) => emit({ ev: 'error', message: event.message || '' }));

const input = readline.createInterface({ input: process.stdin });
input.on('line', (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  switch (command.cmd) {
    case 'sub':
      client.subTopic(command.topic, (data) => emit({ ev: 'topic', topic: command.topic, data }));
      break;
    case 'unsub':
      client.unsubTopic(command.topic);
      break;
    case 'send':
      client.send(command.data);
      break;
    case 'close': {
      const ws = client.ws;
      ws.addEventListener('close', (event) => emit({ ev: 'closed-by-app', code: event.code }));
      client.close();
      break;
    }
    case 'exit':
      process.exit(0);
      break;
    default:
      log('unknown command', line);
  }
});
input.on('close', () => process.exit(0));
emit({ ev: 'ready' });
