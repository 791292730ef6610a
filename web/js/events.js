/**
 * One `/ws/events?token=…` socket (server/qc_events.py) for a page: QC
 * markers, meters, notes and captions all arrive on it, so the control room
 * opens one socket, not one per feature. What to do with each message is the
 * listeners' business (qc.js QcClient.handle, captions.js CaptionClient.handle).
 *
 * The server pings every second (JSON `ping`, answered with `pong`): nothing
 * heard for 5 s → the socket is dropped and a new one opened (backoff
 * 0.25 … 5 s, reset by the snapshot every connection starts with).
 * `subscribe(streams)` asks for those streams' meters and is sent again on
 * every new socket.
 */

const BACKOFF_MS = [250, 500, 1000, 2000, 5000];
const SILENCE_MS = 5000;

export class EventsSocket {
  /**
   * @param {object} o
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {(msg: object) => void} o.onMessage  every message but ping
   * @param {(status: string) => void} [o.onStatus]  "connecting" | "live" | "lost"
   */
  constructor({ auth, onMessage, onStatus }) {
    this.auth = auth;
    this.onMessage = onMessage;
    this.onStatus = onStatus || (() => {});
    this.streams = [];
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this.lastHeard = 0;
    this._reconnectTimer = null;
    this._watchdog = null;
  }

  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    this._connect();
    this._watchdog = setInterval(() => this._checkSilence(), 1000);
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._watchdog);
    this._close(1000, "bye");
  }

  /** Meters for these streams (the tiles on screen). */
  subscribe(streams) {
    const sorted = [...streams].sort();
    if (sorted.join("\n") === this.streams.join("\n")) return;
    this.streams = sorted;
    this.send({ type: "subscribe", streams: sorted });
  }

  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  _close(code, reason) {
    const ws = this.ws;
    this.ws = null;
    if (!ws) return false;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
    return true;
  }

  _checkSilence() {
    if (!this.ws || performance.now() - this.lastHeard < SILENCE_MS) return;
    this._close(4001, "silent");
    this.onStatus("lost");
    this._scheduleReconnect();
  }

  async _connect() {
    if (this.stopped) return;
    let token;
    try {
      token = await this.auth.token();
    } catch {
      this._scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/ws/events?${new URLSearchParams({ token })}`);
    this.ws = ws;
    this.lastHeard = performance.now();
    this.onStatus("connecting");
    ws.onopen = () => {
      if (this.streams.length) ws.send(JSON.stringify({ type: "subscribe", streams: this.streams }));
    };
    ws.onmessage = (ev) => this._message(ws, ev.data);
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onStatus("lost");
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    if (this.stopped) return;
    clearTimeout(this._reconnectTimer);
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _message(ws, data) {
    if (this.ws !== ws) return;
    this.lastHeard = performance.now();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "ping") {
      this.send({ type: "pong" });
      return;
    }
    if (msg.type === "snapshot") {
      this.attempt = 0;
      this.onStatus("live");
    }
    this.onMessage(msg);
  }
}
