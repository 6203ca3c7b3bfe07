/**
 * Byte streams (PROTOCOL.md section 13) as WHATWG streams, with credit flow control. Stream
 * messages travel in the reliable link of the peer; this table only decides what to send.
 */
import type { Msg, StreamOp } from "./codec.js";
import { P2PError } from "./errors.js";
import { FRAGMENT_SIZE } from "./link.js";

type StreamMsg = Extract<Msg, { type: "stream" }>;

/** A stream: read what the peer writes, write what it reads. */
export interface P2PStream {
  readonly peer: string;
  readonly name: string;
  readonly readable: ReadableStream<Uint8Array>;
  readonly writable: WritableStream<Uint8Array | ArrayBuffer | ArrayBufferView>;
}

/** A stream another peer opened, waiting for `accept()` or `refuse()`. */
export interface IncomingStream {
  readonly peer: string;
  readonly name: string;
  accept(): P2PStream;
  refuse(reason?: string): void;
}

const MAX_WAITING = 64;

interface State {
  peer: string;
  id: number;
  /** We opened it. */
  mine: boolean;
  name: string;
  phase: "opening" | "waiting" | "open" | "done";
  deadline?: number;
  // Receive side.
  granted: number;
  received: number;
  unreported: number;
  chunks: Uint8Array[];
  finIn: boolean;
  pullWake: (() => void) | null;
  // Send side.
  credit: number;
  finOut: boolean;
  creditWake: (() => void) | null;
  /** Why the stream failed (also set, with `readDone`, after a late reset once everything was read). */
  error: P2PError | null;
  /** The peer's Fin arrived before the stream failed: reading finishes normally. */
  readDone: boolean;
  /** Our Fin went out before the stream failed: writing had finished. */
  writeDone: boolean;
  opened?: { resolve: (s: P2PStream) => void; reject: (e: P2PError) => void };
  stream?: P2PStream;
}

export class Streams {
  onIncoming: ((s: IncomingStream) => void) | null = null;
  private readonly window: number;
  private readonly requestTimeout: number;
  private nextId = 1;
  private readonly table = new Map<string, State>();
  /**
   * Streams that ended here lately: a Credit the peer sent before it saw our Fin may still
   * come; it is dropped instead of being answered with a Reset.
   */
  private readonly ended = new Set<string>();

  constructor(
    opts: { window?: number; requestTimeout: number },
    private readonly send: (peer: string, msg: Msg) => void,
  ) {
    this.window = Math.max(opts.window ?? 1024 * 1024, FRAGMENT_SIZE);
    this.requestTimeout = opts.requestTimeout;
  }

  private key(peer: string, mine: boolean, id: number): string {
    return `${mine ? "l" : "r"}:${id}:${peer}`;
  }

  private msg(s: State, op: StreamOp): void {
    this.send(s.peer, { type: "stream", id: s.id, opener: s.mine, op });
  }

  private newState(peer: string, id: number, mine: boolean, name: string, phase: State["phase"]): State {
    const s: State = {
      peer, id, mine, name, phase,
      granted: 0, received: 0, unreported: 0, chunks: [], finIn: false, pullWake: null,
      credit: 0, finOut: false, creditWake: null, error: null, readDone: false, writeDone: false,
    };
    this.table.set(this.key(peer, mine, id), s);
    return s;
  }

  /** Number of streams with state kept. */
  get size(): number {
    return this.table.size;
  }

  open(peer: string, name: string, now: number): Promise<P2PStream> {
    const s = this.newState(peer, this.nextId++, true, name, "opening");
    s.deadline = now + this.requestTimeout;
    s.granted = this.window;
    this.msg(s, { op: "open", name });
    this.msg(s, { op: "credit", bytes: this.window });
    return new Promise((resolve, reject) => (s.opened = { resolve, reject }));
  }

  /** A stream message from `peer`. */
  handle(peer: string, m: StreamMsg, now: number): void {
    void now;
    // The sender's opener bit: set when the sender opened it, so it is ours when clear.
    const mine = !m.opener;
    const s = this.table.get(this.key(peer, mine, m.id));
    const op = m.op;
    if (!s) {
      if (this.ended.has(this.key(peer, mine, m.id))) return;
      if (op.op === "open" && !mine) return this.incoming(peer, m.id, op.name);
      if (op.op !== "reset" && op.op !== "refuse") {
        this.send(peer, { type: "stream", id: m.id, opener: !m.opener, op: { op: "reset", code: "UnknownStream", message: "no such stream" } });
      }
      return;
    }
    switch (op.op) {
      case "accept":
        if (s.phase === "opening") {
          s.phase = "open";
          s.deadline = undefined;
          s.opened?.resolve(this.make(s));
        }
        return;
      case "refuse":
        if (s.phase === "opening") {
          this.table.delete(this.key(s.peer, s.mine, s.id));
          s.opened?.reject(new P2PError(op.code || "Refused", op.message || "stream refused"));
        }
        return;
      case "credit":
        s.credit += op.bytes;
        this.wakeWriter(s);
        return;
      case "data":
        if (s.received + op.data.length > s.granted) {
          this.msg(s, { op: "reset", code: "FlowControl", message: "more data than granted" });
          return this.fail(s, new P2PError("FlowControl", "the peer sent more data than granted"));
        }
        s.received += op.data.length;
        if (op.data.length) s.chunks.push(op.data.slice());
        this.wakeReader(s);
        return;
      case "fin":
        s.finIn = true;
        this.wakeReader(s);
        this.maybeDone(s);
        return;
      case "reset":
        this.remove(s);
        if (s.phase === "opening") s.opened?.reject(new P2PError(op.code, op.message));
        this.fail(s, new P2PError(op.code, op.message || "stream reset"));
        return;
      case "open":
        return;
    }
  }

  private incoming(peer: string, id: number, name: string): void {
    const waiting = [...this.table.values()].filter((s) => s.phase === "waiting").length;
    const refuse = (code: string, message: string) =>
      this.send(peer, { type: "stream", id, opener: false, op: { op: "refuse", code, message } });
    if (!this.onIncoming) return refuse("Refused", "no stream handler");
    if (waiting >= MAX_WAITING) return refuse("Busy", "too many streams waiting");
    const s = this.newState(peer, id, false, name, "waiting");
    const handler = this.onIncoming;
    let decided = false;
    handler({
      peer,
      name,
      accept: () => {
        if (decided) throw new P2PError("BadRequest", "already accepted or refused");
        decided = true;
        if (s.phase !== "waiting") throw s.error ?? new P2PError("Closed", "the stream is gone");
        s.phase = "open";
        s.granted = this.window;
        this.msg(s, { op: "accept" });
        this.msg(s, { op: "credit", bytes: this.window });
        return this.make(s);
      },
      refuse: (reason = "refused") => {
        if (decided) return;
        decided = true;
        if (s.phase !== "waiting") return;
        this.remove(s);
        this.msg(s, { op: "refuse", code: "Refused", message: reason });
      },
    });
  }

  private make(s: State): P2PStream {
    const readable = new ReadableStream<Uint8Array>(
      {
        pull: async (controller) => {
          for (;;) {
            if (s.error && !s.readDone) throw s.error;
            const c = s.chunks.shift();
            if (c) {
              controller.enqueue(c);
              this.consumed(s, c.length);
              return;
            }
            if (s.finIn) {
              controller.close();
              return;
            }
            await new Promise<void>((r) => (s.pullWake = r));
          }
        },
        cancel: (reason) => {
          if (s.phase === "done") return;
          this.msg(s, { op: "reset", code: "Cancelled", message: String(reason ?? "cancelled") });
          this.fail(s, new P2PError("Cancelled", "cancelled"));
        },
      },
      { highWaterMark: 0 },
    );
    const writable = new WritableStream<Uint8Array | ArrayBuffer | ArrayBufferView>({
      write: async (chunk) => {
        let bytes =
          chunk instanceof Uint8Array
            ? chunk
            : chunk instanceof ArrayBuffer
              ? new Uint8Array(chunk)
              : new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
        while (bytes.length) {
          if (s.error) throw s.error;
          if (s.credit <= 0) {
            await new Promise<void>((r) => (s.creditWake = r));
            continue;
          }
          const n = Math.min(bytes.length, FRAGMENT_SIZE, s.credit);
          s.credit -= n;
          this.msg(s, { op: "data", data: bytes.slice(0, n) });
          bytes = bytes.subarray(n);
        }
      },
      close: () => {
        if (s.error && !s.writeDone) throw s.error;
        s.finOut = true;
        this.msg(s, { op: "fin" });
        this.maybeDone(s);
      },
      abort: (reason) => {
        if (s.phase === "done") return;
        this.msg(s, { op: "reset", code: "Aborted", message: String(reason ?? "aborted") });
        this.fail(s, new P2PError("Aborted", "aborted"));
      },
    });
    s.stream = { peer: s.peer, name: s.name, readable, writable };
    return s.stream;
  }

  private consumed(s: State, n: number): void {
    s.unreported += n;
    if (s.unreported >= Math.max(1, this.window >> 2) && !s.finIn && !s.error) {
      s.granted += s.unreported;
      this.msg(s, { op: "credit", bytes: s.unreported });
      s.unreported = 0;
    }
    this.maybeDone(s);
  }

  private maybeDone(s: State): void {
    if (s.finIn && s.finOut && s.chunks.length === 0) {
      s.phase = "done";
      this.remove(s);
    }
  }

  private remove(s: State): void {
    const key = this.key(s.peer, s.mine, s.id);
    this.table.delete(key);
    this.ended.add(key);
    if (this.ended.size > 1024) this.ended.delete(this.ended.values().next().value!);
  }

  private wakeReader(s: State): void {
    const w = s.pullWake;
    s.pullWake = null;
    w?.();
  }

  private wakeWriter(s: State): void {
    const w = s.creditWake;
    s.creditWake = null;
    w?.();
  }

  private fail(s: State, e: P2PError): void {
    this.remove(s);
    s.phase = "done";
    s.error = e;
    // A reset after the peer's Fin (a Credit of ours may cross its Fin and find the stream
    // gone: "UnknownStream") does not take back what was received, nor what was sent.
    s.readDone = s.finIn;
    s.writeDone = s.finOut;
    this.wakeReader(s);
    this.wakeWriter(s);
  }

  /** The peer is gone: its streams fail without a message. */
  failPeer(peer: string): void {
    for (const s of [...this.table.values()]) {
      if (s.peer !== peer) continue;
      const e = new P2PError("PeerOffline", `peer ${peer} is gone`);
      if (s.phase === "opening") s.opened?.reject(e);
      this.fail(s, e);
    }
  }

  failAll(code: string): void {
    for (const s of [...this.table.values()]) {
      const e = new P2PError(code, code);
      if (s.phase === "opening") s.opened?.reject(e);
      this.fail(s, e);
    }
  }

  /** Opens that got no answer in time: `Reset("Timeout")`. */
  tick(now: number): void {
    for (const s of [...this.table.values()]) {
      if (s.phase === "opening" && s.deadline !== undefined && s.deadline <= now) {
        this.msg(s, { op: "reset", code: "Timeout", message: "no answer to the stream request" });
        s.opened?.reject(new P2PError("Timeout", "no answer to the stream request"));
        this.fail(s, new P2PError("Timeout", "timeout"));
      }
    }
  }

  nextTimeout(): number | null {
    let t: number | null = null;
    for (const s of this.table.values()) if (s.deadline !== undefined && (t === null || s.deadline < t)) t = s.deadline;
    return t;
  }
}
