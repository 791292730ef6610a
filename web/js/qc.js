/**
 * Live QC client (`/ws/events?token=…`), protocol as in server/qc_events.py:
 *
 *   server → {"type":"snapshot","seq":1,"markers":[MARKER…],"taps":{STREAM:{state,detail}}}
 *            first message on every connection: the markers open now;
 *            {"type":"marker.open"|"marker.update"|"marker.close", seq, ...MARKER}
 *            {"type":"marker.stored", seq, stream, live_id, id}  (the row id, once stored)
 *            {"type":"marker.flag", seq, ...MARKER with false_positive, verified_by}
 *            {"type":"note", seq, id, stream, marker_id, at, text, author}
 *            {"type":"meters", seq, stream, momentary, short_term, peaks_dbfs}  (subscribed streams)
 *            {"type":"tap", seq, stream, state, detail}; {"type":"ping"}; {"type":"error", code, detail}
 *   client → {"type":"subscribe","streams":[…]}; {"type":"pong"} for each ping.
 *   MARKER = {id, live_id, stream, kind, subtype, severity, confidence, start, end,
 *             wall_start, wall_end, metadata}
 *
 * The socket (reconnects, heartbeats, meter subscriptions) is events.js's
 * EventsSocket, shared with the captions; QcClient keeps the open markers
 * (each connection's snapshot replaces them) and hands on what the control
 * room shows.
 */

export class QcClient {
  /**
   * @param {object} o
   * @param {(msg: object) => void} o.onEvent  every marker/note/flag/tap message and the snapshot
   * @param {(stream: string, meters: object) => void} o.onMeters
   */
  constructor({ onEvent, onMeters }) {
    this.onEvent = onEvent;
    this.onMeters = onMeters;
    this.open = new Map(); // "stream/kind/subtype" → marker
  }

  /** Open markers of one stream. */
  openOf(stream) {
    return [...this.open.values()].filter((m) => m.stream === stream);
  }

  /** One /ws/events message (EventsSocket's onMessage). */
  handle(msg) {
    const key = (m) => `${m.stream}/${m.kind}/${m.subtype}`;
    switch (msg.type) {
      case "snapshot":
        this.open = new Map((msg.markers || []).map((m) => [key(m), m]));
        this.onEvent(msg);
        break;
      case "marker.open":
      case "marker.update":
        this.open.set(key(msg), msg);
        this.onEvent(msg);
        break;
      case "marker.close":
        this.open.delete(key(msg));
        this.onEvent(msg);
        break;
      case "marker.stored":
        for (const m of this.open.values()) if (m.live_id === msg.live_id) m.id = msg.id;
        this.onEvent(msg);
        break;
      case "meters":
        this.onMeters(msg.stream, msg);
        break;
      case "marker.flag":
      case "note":
      case "tap":
        this.onEvent(msg);
        break;
      default:
        break;
    }
  }
}

/** dBFS / LUFS → 0..1 along a meter's scale (−60 … 0). */
export function meterFraction(db) {
  if (typeof db !== "number") return 0;
  return Math.max(0, Math.min(1, (db + 60) / 60));
}
