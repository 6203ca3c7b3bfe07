/**
 * The binary frame codec (PROTOCOL.md section 4) and the relay batch of protocol version 2.
 * Pure functions over `Uint8Array`: no I/O, no Node APIs.
 */

/** Version byte of the frame format. */
export const FRAME_VERSION = 1;

const KIND_DATA = 1;
const KIND_VOLATILE = 2;
const KIND_LINK_ACK = 3;
const KIND_PING = 4;

const MSG_EVENT = 1;
const MSG_REPLY = 2;
const MSG_REPLY_ERROR = 3;
const MSG_CONTINUATION = 4;
const MSG_STREAM = 5;

const FLAG_MORE = 0x01;
const FLAG_BINARY = 0x02;
const FLAG_NACK = 0x04;
const FLAG_PONG = 0x08;
const STREAM_OPENER = 0x80;

/** A message payload: UTF-8 JSON text (`binary: false`, empty = null) or raw bytes. */
export interface WirePayload {
  binary: boolean;
  data: Uint8Array;
}

export type StreamOp =
  | { op: "open"; name: string }
  | { op: "accept" }
  | { op: "refuse"; code: string; message: string }
  | { op: "data"; data: Uint8Array }
  | { op: "credit"; bytes: number }
  | { op: "fin" }
  | { op: "reset"; code: string; message: string };

export type Msg =
  /** `ackId` 0 means no reply wanted. */
  | { type: "event"; event: string; ackId: number; payload: WirePayload }
  | { type: "reply"; ackId: number; payload: WirePayload }
  | { type: "replyError"; ackId: number; code: string; message: string }
  | { type: "continuation"; data: Uint8Array }
  | { type: "stream"; id: number; opener: boolean; op: StreamOp };

export type Body =
  | { kind: "data"; seq: number; more: boolean; msg: Msg }
  | { kind: "volatile"; msg: Msg }
  | { kind: "linkAck"; upto: number; nack: boolean }
  /** Nonces are full u64 (Rust pings use random ones): kept as bigint to echo them exactly. */
  | { kind: "ping"; nonce: bigint; pong: boolean };

export interface Frame {
  /** Target peer id (relay routing). */
  to: string;
  /** Sender id: sent empty, stamped by the server on relay. */
  from: string;
  body: Body;
}

/** A frame or batch that could not be decoded or encoded. */
export class CodecError extends Error {
  override name = "CodecError";
}

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

export function utf8(s: string): Uint8Array {
  return utf8Encoder.encode(s);
}

function fromUtf8(b: Uint8Array, what: string): string {
  try {
    return utf8Decoder.decode(b);
  } catch {
    throw new CodecError(`invalid UTF-8 in ${what}`);
  }
}

/** A growable byte buffer. */
export class Writer {
  private buf: Uint8Array;
  length = 0;

  constructor(capacity = 64) {
    this.buf = new Uint8Array(capacity);
  }

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
  }

  u8(v: number): this {
    this.reserve(1);
    this.buf[this.length++] = v;
    return this;
  }

  bytes(b: Uint8Array): this {
    this.reserve(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
    return this;
  }

  /** Unsigned LEB128 of a safe integer or a u64 bigint. */
  varint(v: number | bigint): this {
    if (typeof v === "number") {
      if (!Number.isSafeInteger(v) || v < 0) throw new CodecError(`bad varint value ${v}`);
      while (v >= 0x80) {
        this.u8((v % 0x80) | 0x80);
        v = Math.floor(v / 0x80);
      }
      return this.u8(v);
    }
    if (v < 0n || v >= 1n << 64n) throw new CodecError(`bad varint value ${v}`);
    while (v >= 0x80n) {
      this.u8(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    return this.u8(Number(v));
  }

  str8(s: string, what: string): this {
    const b = utf8(s);
    if (b.length > 255) throw new CodecError(`${what} too long`);
    return this.u8(b.length).bytes(b);
  }

  finish(): Uint8Array {
    return this.buf.slice(0, this.length);
  }
}

/** Reads a frame or batch; payload slices are views into the input. */
export class Reader {
  pos = 0;
  constructor(readonly buf: Uint8Array) {}

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  u8(): number {
    if (this.pos >= this.buf.length) throw new CodecError("frame truncated");
    return this.buf[this.pos++]!;
  }

  /** A varint as a bigint (any u64). */
  varint64(): bigint {
    let v = 0n;
    for (let i = 0; i < 10; i++) {
      const b = this.u8();
      if (i === 9 && b > 1) throw new CodecError("invalid varint");
      v |= BigInt(b & 0x7f) << BigInt(7 * i);
      if ((b & 0x80) === 0) return v;
    }
    throw new CodecError("invalid varint");
  }

  /** A varint that must fit a JavaScript safe integer. */
  varint(): number {
    // Fast path: up to 7 bytes (49 bits) without BigInt.
    let v = 0;
    let mul = 1;
    const start = this.pos;
    for (let i = 0; i < 7; i++) {
      const b = this.u8();
      v += (b & 0x7f) * mul;
      if ((b & 0x80) === 0) return v;
      mul *= 0x80;
    }
    this.pos = start;
    const big = this.varint64();
    if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw new CodecError("varint too large");
    return Number(big);
  }

  take(n: number): Uint8Array {
    if (n > this.remaining) throw new CodecError("frame truncated");
    const s = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return s;
  }

  rest(): Uint8Array {
    return this.take(this.remaining);
  }

  str8(what: string): string {
    return fromUtf8(this.take(this.u8()), what);
  }
}

/** Payload length a message carries, for sizing buffers. */
function msgSize(msg: Msg): number {
  switch (msg.type) {
    case "event":
      return msg.payload.data.length + msg.event.length * 3 + 20;
    case "reply":
      return msg.payload.data.length + 12;
    case "continuation":
      return msg.data.length + 1;
    case "replyError":
      return msg.message.length * 3 + 280;
    case "stream":
      return 300 + ("data" in msg.op ? msg.op.data.length : "message" in msg.op ? msg.op.message.length * 3 : 0) +
        ("name" in msg.op ? msg.op.name.length * 3 : 0);
  }
}

function writeMsg(w: Writer, msg: Msg): void {
  switch (msg.type) {
    case "event": {
      const name = utf8(msg.event);
      w.u8(MSG_EVENT).varint(msg.ackId).varint(name.length).bytes(name).bytes(msg.payload.data);
      return;
    }
    case "reply":
      w.u8(MSG_REPLY).varint(msg.ackId).bytes(msg.payload.data);
      return;
    case "replyError":
      w.u8(MSG_REPLY_ERROR).varint(msg.ackId).str8(msg.code, "code").bytes(utf8(msg.message));
      return;
    case "continuation":
      w.u8(MSG_CONTINUATION).bytes(msg.data);
      return;
    case "stream": {
      w.u8(MSG_STREAM).varint(msg.id);
      const op = (n: number) => w.u8(msg.opener ? n | STREAM_OPENER : n);
      const o = msg.op;
      switch (o.op) {
        case "open":
          op(1).bytes(utf8(o.name));
          return;
        case "accept":
          op(2);
          return;
        case "refuse":
          op(3).str8(o.code, "code").bytes(utf8(o.message));
          return;
        case "data":
          op(4).bytes(o.data);
          return;
        case "credit":
          op(5).varint(o.bytes);
          return;
        case "fin":
          op(6);
          return;
        case "reset":
          op(7).str8(o.code, "code").bytes(utf8(o.message));
          return;
      }
    }
  }
}

function flagsOf(body: Body): number {
  switch (body.kind) {
    case "data":
    case "volatile": {
      let f = body.kind === "data" && body.more ? FLAG_MORE : 0;
      const m = body.msg;
      if ((m.type === "event" || m.type === "reply") && m.payload.binary) f |= FLAG_BINARY;
      return f;
    }
    case "linkAck":
      return body.nack ? FLAG_NACK : 0;
    case "ping":
      return body.pong ? FLAG_PONG : 0;
  }
}

const KINDS = { data: KIND_DATA, volatile: KIND_VOLATILE, linkAck: KIND_LINK_ACK, ping: KIND_PING };

/** Encodes one frame. */
export function encodeFrame(frame: Frame): Uint8Array {
  const body = frame.body;
  const size = body.kind === "data" || body.kind === "volatile" ? msgSize(body.msg) : 0;
  const w = new Writer(size + 32 + frame.to.length * 3 + frame.from.length * 3);
  w.u8(FRAME_VERSION).u8(KINDS[body.kind]).u8(flagsOf(body));
  w.str8(frame.to, "to").str8(frame.from, "from");
  switch (body.kind) {
    case "data":
      w.varint(body.seq);
      writeMsg(w, body.msg);
      break;
    case "volatile":
      writeMsg(w, body.msg);
      break;
    case "linkAck":
      w.varint(body.upto);
      break;
    case "ping":
      w.varint(body.nonce);
      break;
  }
  return w.finish();
}

function readMsg(r: Reader, flags: number): Msg {
  const kind = r.u8();
  const payload = (): WirePayload => ({ binary: (flags & FLAG_BINARY) !== 0, data: r.rest() });
  switch (kind) {
    case MSG_EVENT: {
      const ackId = r.varint();
      const name = fromUtf8(r.take(r.varint()), "event");
      return { type: "event", event: name, ackId, payload: payload() };
    }
    case MSG_REPLY:
      return { type: "reply", ackId: r.varint(), payload: payload() };
    case MSG_REPLY_ERROR: {
      const ackId = r.varint();
      const code = r.str8("code");
      return { type: "replyError", ackId, code, message: fromUtf8(r.rest(), "message") };
    }
    case MSG_CONTINUATION:
      return { type: "continuation", data: r.rest() };
    case MSG_STREAM: {
      const id = r.varint();
      const b = r.u8();
      const opener = (b & STREAM_OPENER) !== 0;
      const stream = (op: StreamOp): Msg => ({ type: "stream", id, opener, op });
      switch (b & ~STREAM_OPENER) {
        case 1:
          return stream({ op: "open", name: fromUtf8(r.rest(), "stream name") });
        case 2:
          return stream({ op: "accept" });
        case 3:
        case 7: {
          const code = r.str8("code");
          const message = fromUtf8(r.rest(), "message");
          return stream((b & ~STREAM_OPENER) === 3 ? { op: "refuse", code, message } : { op: "reset", code, message });
        }
        case 4:
          return stream({ op: "data", data: r.rest() });
        case 5:
          return stream({ op: "credit", bytes: r.varint() });
        case 6:
          return stream({ op: "fin" });
        default:
          throw new CodecError(`unknown kind ${b & ~STREAM_OPENER}`);
      }
    }
    default:
      throw new CodecError(`unknown kind ${kind}`);
  }
}

/** Decodes one frame. Payload bytes are views into `bytes`. */
export function decodeFrame(bytes: Uint8Array): Frame {
  const r = new Reader(bytes);
  const version = r.u8();
  if (version !== FRAME_VERSION) throw new CodecError(`unsupported frame version ${version}`);
  const kind = r.u8();
  const flags = r.u8();
  const to = r.str8("to");
  const from = r.str8("from");
  let body: Body;
  switch (kind) {
    case KIND_DATA: {
      const seq = r.varint();
      body = { kind: "data", seq, more: (flags & FLAG_MORE) !== 0, msg: readMsg(r, flags) };
      break;
    }
    case KIND_VOLATILE:
      body = { kind: "volatile", msg: readMsg(r, flags) };
      break;
    case KIND_LINK_ACK:
      body = { kind: "linkAck", upto: r.varint(), nack: (flags & FLAG_NACK) !== 0 };
      break;
    case KIND_PING:
      body = { kind: "ping", nonce: r.varint64(), pong: (flags & FLAG_PONG) !== 0 };
      break;
    default:
      throw new CodecError(`unknown kind ${kind}`);
  }
  return { to, from, body };
}

/** Joins encoded frames into one relay batch: `varint(length) ++ frame`, repeated. */
export function encodeBatch(frames: readonly Uint8Array[]): Uint8Array {
  let size = 0;
  for (const f of frames) size += f.length + 5;
  const w = new Writer(size);
  for (const f of frames) {
    if (f.length === 0) throw new CodecError("empty frame in batch");
    w.varint(f.length).bytes(f);
  }
  return w.finish();
}

/** Splits a relay batch into its frames (views into `batch`). */
export function decodeBatch(batch: Uint8Array): Uint8Array[] {
  const r = new Reader(batch);
  const out: Uint8Array[] = [];
  if (batch.length === 0) throw new CodecError("empty batch");
  while (r.remaining > 0) {
    const n = r.varint();
    if (n === 0) throw new CodecError("empty frame in batch");
    out.push(r.take(n));
  }
  return out;
}

/** Bytes `varint(n)` takes. */
export function varintLen(n: number): number {
  let len = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    len++;
  }
  return len;
}

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** Standard base64 with padding (the `base64` frames mode). */
export function toBase64(b: Uint8Array): string {
  let out = "";
  let i = 0;
  for (; i + 2 < b.length; i += 3) {
    const n = (b[i]! << 16) | (b[i + 1]! << 8) | b[i + 2]!;
    out += B64[n >> 18]! + B64[(n >> 12) & 63]! + B64[(n >> 6) & 63]! + B64[n & 63]!;
  }
  if (i < b.length) {
    const n = (b[i]! << 16) | ((b[i + 1] ?? 0) << 8);
    out += B64[n >> 18]! + B64[(n >> 12) & 63]! + (i + 1 < b.length ? B64[(n >> 6) & 63]! : "=") + "=";
  }
  return out;
}

export function fromBase64(s: string): Uint8Array {
  if (s.length % 4 !== 0) throw new CodecError("bad base64");
  const pad = s.endsWith("==") ? 2 : s.endsWith("=") ? 1 : 0;
  const out = new Uint8Array((s.length / 4) * 3 - pad);
  let o = 0;
  for (let i = 0; i < s.length; i += 4) {
    let n = 0;
    for (let j = 0; j < 4; j++) {
      const c = s[i + j]!;
      const v = c === "=" && i + j >= s.length - pad ? 0 : B64.indexOf(c);
      if (v < 0) throw new CodecError("bad base64");
      n = (n << 6) | v;
    }
    if (o < out.length) out[o++] = n >> 16;
    if (o < out.length) out[o++] = (n >> 8) & 255;
    if (o < out.length) out[o++] = n & 255;
  }
  return out;
}
