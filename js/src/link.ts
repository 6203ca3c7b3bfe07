/**
 * The reliable link to one peer (PROTOCOL.md section 5): sequencing, cumulative acks of what
 * the application took, a send window, go-back-N retransmission, NACKs, fragmentation and
 * reassembly. A pure state machine: inputs carry the current time (ms), outputs are encoded
 * frames to send and messages to hand to the application.
 */
import { type Body, type Frame, type Msg, type WirePayload, encodeFrame } from "./codec.js";

/** Payload bytes per fragment. */
export const FRAGMENT_SIZE = 16384;
/** First retransmission timeout (ms). */
export const RTO_MIN = 200;
/** Largest retransmission timeout (ms). */
export const RTO_MAX = 2000;
/** Longest a taken frame waits for its acknowledgement (ms). */
export const ACK_DELAY = 5;
/** The shortest first retransmission timeout after a transport change (ms). */
export const SWITCH_RTO_MIN = 20;
/** The first retransmission timeout after a transport change when no round trip was measured (ms). */
export const SWITCH_RTO_UNMEASURED = 40;

export interface LinkOptions {
  /** Frames in flight beyond the last acknowledgement (default 256). */
  window?: number;
  /** Largest reassembled payload accepted, in bytes (default 64 MiB). */
  maxMessageSize?: number;
}

/** What the link hands to its owner. */
export type Delivery =
  | Extract<Msg, { type: "event" | "reply" | "replyError" | "stream" }>
  | { type: "pong"; nonce: bigint };

interface Partial {
  head: Extract<Msg, { type: "event" | "reply" }>;
  chunks: Uint8Array[];
  size: number;
  tooLarge: boolean;
}

function concat(chunks: Uint8Array[], size: number): Uint8Array {
  if (chunks.length === 1) return chunks[0]!;
  const out = new Uint8Array(size);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

export class Link {
  readonly window: number;
  readonly maxMessageSize: number;

  // Send side.
  private nextSeq = 1;
  private acked = 0;
  private sentUpto = 0;
  /** Encoded Data frames `acked+1 ..< nextSeq`, from index `head`. */
  private unacked: Uint8Array[] = [];
  private head = 0;
  private rto = RTO_MIN;
  private rtoAt: number | null = null;
  /** Highest seq sent so far (resends are not timed). */
  private highestSent = 0;
  /** The one frame being timed: its seq and when it went out. */
  private rttProbe: { seq: number; at: number } | null = null;
  /** Smoothed round trip (ms), from a frame to its acknowledgement. */
  private srtt: number | null = null;
  /** Unsequenced frames waiting for the next poll (pongs, pings). */
  private control: Uint8Array[] = [];

  // Receive side.
  private expected = 1;
  private consumed = 0;
  private ackSent = 0;
  private ackAt: number | null = null;
  private ackNow = false;
  private nack = false;
  private nackFor = 0;
  private partial: Partial | null = null;

  constructor(
    /** The peer's id: the `to` of every frame this link sends. */
    public peer: string,
    opts: LinkOptions = {},
  ) {
    this.window = opts.window ?? 256;
    this.maxMessageSize = opts.maxMessageSize ?? 64 * 1024 * 1024;
  }

  /** Frames queued and not yet acknowledged by the peer. */
  get backlog(): number {
    return this.nextSeq - 1 - this.acked;
  }

  /** Highest seq the peer acknowledged. */
  get ackedSeq(): number {
    return this.acked;
  }

  private frame(body: Body): Uint8Array {
    const f: Frame = { to: this.peer, from: "", body };
    return encodeFrame(f);
  }

  private pushData(msg: Msg, more: boolean): number {
    const seq = this.nextSeq++;
    this.unacked.push(this.frame({ kind: "data", seq, more, msg }));
    return seq;
  }

  /**
   * Queues a reliable message; events and replies over 16 KiB are fragmented. Returns the
   * seq of its first frame.
   */
  send(msg: Msg): number {
    if ((msg.type === "event" || msg.type === "reply") && msg.payload.data.length > FRAGMENT_SIZE) {
      const data = msg.payload.data;
      const head: Msg = { ...msg, payload: { binary: msg.payload.binary, data: data.subarray(0, FRAGMENT_SIZE) } };
      const first = this.pushData(head, true);
      for (let off = FRAGMENT_SIZE; off < data.length; off += FRAGMENT_SIZE) {
        const end = Math.min(off + FRAGMENT_SIZE, data.length);
        this.pushData({ type: "continuation", data: data.subarray(off, end) }, end < data.length);
      }
      return first;
    }
    return this.pushData(msg, false);
  }

  /** Queues an unsequenced Ping (or Pong) frame. */
  ping(nonce: bigint, pong = false): void {
    this.control.push(this.frame({ kind: "ping", nonce, pong }));
  }

  /** Handles a frame from the peer; returns the messages to hand to the application. */
  handle(body: Body, now: number): Delivery[] {
    switch (body.kind) {
      case "linkAck":
        this.onAck(body.upto, body.nack, now);
        return [];
      case "ping":
        if (body.pong) return [{ type: "pong", nonce: body.nonce }];
        this.ping(body.nonce, true);
        return [];
      case "volatile":
        return body.msg.type === "event" && body.msg.payload.data.length <= this.maxMessageSize ? [body.msg] : [];
      case "data":
        return this.onData(body.seq, body.more, body.msg, now);
    }
  }

  private onAck(upto: number, nack: boolean, now: number): void {
    if (upto > this.acked && upto < this.nextSeq) {
      const n = upto - this.acked;
      this.head += n;
      if (this.head > 1024 && this.head * 2 > this.unacked.length) {
        this.unacked = this.unacked.slice(this.head);
        this.head = 0;
      }
      this.acked = upto;
      if (this.rttProbe && upto >= this.rttProbe.seq) {
        const sample = Math.max(0, now - this.rttProbe.at);
        this.srtt = this.srtt === null ? sample : (this.srtt * 7 + sample) / 8;
        this.rttProbe = null;
      }
      if (this.sentUpto < upto) this.sentUpto = upto;
      this.rto = RTO_MIN;
      this.rtoAt = this.sentUpto > this.acked ? now + this.rto : null;
    }
    if (nack && upto >= this.acked && this.sentUpto > upto) {
      this.sentUpto = upto;
      this.rttProbe = null;
    }
  }

  private onData(seq: number, more: boolean, msg: Msg, now: number): Delivery[] {
    if (seq < this.expected) {
      this.ackNow = true;
      return [];
    }
    if (seq > this.expected) {
      if (this.nackFor !== this.expected) {
        this.nackFor = this.expected;
        this.nack = true;
      }
      return [];
    }
    this.expected++;
    const out = this.reassemble(more, msg);
    // Everything is taken at once: the driver hands it to the application synchronously.
    this.consumed = seq;
    if (this.consumed - this.ackSent >= Math.max(1, this.window >> 2)) this.ackNow = true;
    else if (this.ackAt === null) this.ackAt = now + ACK_DELAY;
    return out;
  }

  private reassemble(more: boolean, msg: Msg): Delivery[] {
    switch (msg.type) {
      case "event":
      case "reply": {
        this.partial = null;
        const size = msg.payload.data.length;
        if (!more) return size > this.maxMessageSize ? this.tooLarge(msg) : [msg];
        this.partial = { head: msg, chunks: [msg.payload.data], size, tooLarge: size > this.maxMessageSize };
        return [];
      }
      case "continuation": {
        const p = this.partial;
        if (!p) return [];
        p.size += msg.data.length;
        if (p.size > this.maxMessageSize) p.tooLarge = true;
        if (!p.tooLarge) p.chunks.push(msg.data);
        if (more) return [];
        this.partial = null;
        if (p.tooLarge) return this.tooLarge(p.head);
        const payload: WirePayload = { binary: p.head.payload.binary, data: concat(p.chunks, p.size) };
        return [{ ...p.head, payload }];
      }
      default:
        return [msg];
    }
  }

  private tooLarge(head: Extract<Msg, { type: "event" | "reply" }>): Delivery[] {
    if (head.type === "event" && head.ackId !== 0) {
      this.send({
        type: "replyError",
        ackId: head.ackId,
        code: "PayloadTooLarge",
        message: `message larger than ${this.maxMessageSize} bytes`,
      });
    }
    return [];
  }

  /** `p2p:error` Busy for a frame of this link: resend from `seq`. */
  busy(seq: number): void {
    if (seq > this.acked && seq <= this.sentUpto) {
      this.sentUpto = seq - 1;
      this.rttProbe = null;
    }
  }

  /** Smoothed round trip in ms (from a frame to its acknowledgement), once measured. */
  get rtt(): number | null {
    return this.srtt;
  }

  /**
   * The transport changed (or a resumed connection): resend everything unacknowledged. The
   * first timeout on the new transport follows the round trip measured so far (PROTOCOL.md
   * section 5): a fresh data channel now and then loses the first message sent on it.
   */
  resend(): void {
    this.sentUpto = this.acked;
    this.rttProbe = null;
    this.rto = this.srtt === null ? SWITCH_RTO_UNMEASURED : Math.min(RTO_MIN, Math.max(SWITCH_RTO_MIN, 2 * this.srtt + ACK_DELAY));
    this.rtoAt = null;
    this.ackNow = this.consumed > 0;
  }

  /**
   * Frames to send at `now`: acknowledgements, pongs, then Data frames within the window
   * (at most `maxData` of them: the rest wait for the next poll).
   */
  poll(now: number, maxData = Infinity): Uint8Array[] {
    const out = this.control;
    this.control = [];
    if (this.rtoAt !== null && now >= this.rtoAt && this.sentUpto > this.acked) {
      this.sentUpto = this.acked;
      this.rttProbe = null;
      this.rto = Math.min(this.rto * 2, RTO_MAX);
      this.rtoAt = now + this.rto;
    }
    if (this.ackNow || this.nack || (this.ackAt !== null && now >= this.ackAt)) {
      out.push(this.frame({ kind: "linkAck", upto: this.consumed, nack: this.nack }));
      this.ackSent = this.consumed;
      this.ackNow = this.nack = false;
      this.ackAt = null;
    }
    const limit = Math.min(this.acked + this.window, this.nextSeq - 1, this.sentUpto + Math.max(0, maxData));
    if (this.sentUpto < limit) {
      for (let s = this.sentUpto + 1; s <= limit; s++) out.push(this.unacked[this.head + s - this.acked - 1]!);
      if (limit > this.highestSent) {
        // One new frame at a time is timed, never a resent one (Karn).
        if (this.rttProbe === null) this.rttProbe = { seq: Math.max(this.sentUpto, this.highestSent) + 1, at: now };
        this.highestSent = limit;
      }
      this.sentUpto = limit;
      if (this.rtoAt === null) this.rtoAt = now + this.rto;
    }
    if (this.sentUpto <= this.acked && this.backlog === 0) this.rtoAt = null;
    return out;
  }

  /** When `poll` has something to do next, or null if nothing is pending. */
  nextTimeout(): number | null {
    if (this.control.length > 0 || this.ackNow || this.nack) return 0;
    if (this.sentUpto < Math.min(this.acked + this.window, this.nextSeq - 1)) return 0;
    const t = [this.ackAt, this.sentUpto > this.acked ? this.rtoAt : null].filter((x): x is number => x !== null);
    return t.length ? Math.min(...t) : null;
  }
}
