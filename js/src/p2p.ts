/**
 * The driver: shuttles between a socket.io-client `Socket` and the pure core (session,
 * links, acks). It owns the one timer and the socket listeners; every decision is made by
 * the core.
 */
import type { Socket } from "socket.io-client";
import { AckTable, type AckResult } from "./acks.js";
import {
  CodecError,
  type Frame,
  type Msg,
  decodeBatch,
  decodeFrame,
  encodeBatch,
  encodeFrame,
  fromBase64,
} from "./codec.js";
import { P2PError } from "./errors.js";
import { FRAGMENT_SIZE, type Delivery, Link } from "./link.js";
import { fromWire, isBlob, toWire } from "./payload.js";
import { type MembersPage, type PeerInfo, type Response, type ServerError, Session, type Welcome } from "./session.js";
import { Streams, type IncomingStream, type P2PStream } from "./streams.js";
import { type Action, APP_DOWNGRADE, Negotiation, type Signal } from "./negotiate.js";
import { RtcConn, type RTCPeerConnectionCtor } from "./rtc.js";

/** Members asked for in one `members` page (the server lists 256 in a Welcome by default). */
const MEMBERS_PAGE = 256;

/** Options, named after the Rust `P2pOptions` (camel-cased). Durations are in milliseconds. */
export interface P2POptions {
  /** Rooms to join at registration. With no rooms, no `uid` and no `peerUid`: `["default"]`. */
  rooms?: string[];
  /** One room (added to `rooms`). */
  room?: string;
  /** A name of our choice, unique among connected peers. */
  uid?: string;
  /** Pair with the peer holding this uid; `ready` resolves once an echo went both ways. */
  peerUid?: string;
  /** Default timeout of `emitWithAck` (10 s). */
  ackTimeout?: number;
  /** Timeout of control requests to the server (10 s). */
  requestTimeout?: number;
  /** How long the server waits for the `peerUid` peer (10 s), and how long a peer may take to reappear after a resume. */
  pairTimeout?: number;
  /** Frames in flight per peer (256). */
  window?: number;
  /** Largest message, in bytes (64 MiB). */
  maxMessageSize?: number;
  /** Stream receive window in bytes (256 KiB). */
  streamWindow?: number;
  /** Upgrade every peer met to a WebRTC data channel, and retry after failures (default on). */
  autoUpgrade?: boolean;
  /** Most WebRTC connections (attempts plus open channels) at once (5). */
  numClients?: number;
  /** ICE servers of the RTCPeerConnection (none by default). */
  iceServers?: unknown[];
  /** Further RTCConfiguration fields (e.g. `iceTransportPolicy`). */
  rtcConfig?: Record<string, unknown>;
  /** Send candidates as they come (default); off: every candidate in the SDP. */
  trickle?: boolean;
  /** No open channel within this long fails an attempt (5 s). */
  upgradeTimeout?: number;
  /** An open channel on which nothing arrived for this long is dead (3 s). */
  dcTimeout?: number;
  /** First retry backoff (1 s, doubling up to 60 s). */
  retryBackoff?: number;
  /** An RTCPeerConnection implementation (Node.js); browsers use their own. */
  wrtc?: { RTCPeerConnection: RTCPeerConnectionCtor };
}

/** How an event arrived. */
export type Transport = "relay" | "datachannel";

/** What a handler learns about an event besides its data. */
export interface EventMeta {
  /** Sender's peer id. */
  from: string;
  /** Sender's uid, when it has one. */
  fromUid?: string;
  /** Event name. */
  event: string;
  transport: Transport;
}

/** The callback a handler gets as its last argument when the sender waits for a reply. */
export interface ReplyFn {
  (value?: unknown): void;
  /** Replies with an error (`err.code` on the sender's side). */
  error(code: string, message?: string): void;
}

export type Handler = (data: any, meta: EventMeta, reply?: ReplyFn) => void;
export type AnyHandler = (event: string, data: any, meta: EventMeta, reply?: ReplyFn) => void;
export type AckCallback = (err: P2PError | null, reply?: any) => void;

/** What `ready` resolves with: our own identity, and the paired peer with `peerUid`. */
export interface ReadyInfo extends PeerInfo {
  pair?: PeerInfo;
}

/** A publication on a topic. */
export interface Publication {
  topic: string;
  /** The publisher, or null for the server. */
  from: PeerInfo | null;
  data: unknown;
}

/** Methods of a provided service: each gets the call's `args` and returns (or resolves to) the result. */
export type ServiceMethods = Record<string, (args: any, meta: { from: PeerInfo; method: string }) => unknown>;

/** Local events, alongside the peers' application events. */
export const LOCAL_EVENTS = [
  "peer-joined",
  "peer-left",
  "peer-paired",
  "peer-disconnected",
  "reconnected",
  "server-error",
  "close",
  "upgrade",
  "downgrade",
  "upgrade-failed",
] as const;

interface PeerState {
  info: PeerInfo;
  rooms: Set<string>;
  paired: boolean;
  link: Link;
  neg?: Negotiation;
  rtc?: RtcConn;
  /** `upgradePeer` promises waiting for this peer's attempt. */
  upWaiters?: { resolve: () => void; reject: (e: P2PError) => void }[];
  /** After a continued resume: forgotten unless presence shows it again by then. */
  confirmBy?: number;
}

interface Entry {
  fn: Handler;
  once: boolean;
  from?: string;
}

interface AnyEntry {
  fn: AnyHandler;
  from?: string;
}

const VOLATILE_MAX = FRAGMENT_SIZE;
const BATCH_MAX = 64 * 1024;
const now = (): number => globalThis.performance.now();

function randomOddNonce(): bigint {
  const b = new Uint32Array(2);
  globalThis.crypto.getRandomValues(b);
  return ((BigInt(b[0]!) << 32n) | BigInt(b[1]!)) | 1n;
}

function toError(e: ServerError | P2PError, extra: P2PError["details"] = {}): P2PError {
  return e instanceof P2PError ? e : new P2PError(e.code, e.message, extra);
}

/** Sending options collected by the `to`/`timeout`/`volatile` operators. */
interface SendFlags {
  targets: string[] | null;
  timeout?: number;
  volatile: boolean;
}

/** The operators of `p2p.to(id)`, `p2p.timeout(ms)` and `p2p.volatile`. */
export class Sender {
  constructor(
    private readonly p2p: P2P,
    private readonly flags: SendFlags,
  ) {}

  /** Adds a target peer (chainable, like Socket.IO's `to`). */
  to(peer: string | string[]): Sender {
    const add = Array.isArray(peer) ? peer : [peer];
    return new Sender(this.p2p, { ...this.flags, targets: [...(this.flags.targets ?? []), ...add] });
  }

  timeout(ms: number): Sender {
    return new Sender(this.p2p, { ...this.flags, timeout: ms });
  }

  /** Best effort: never retransmitted, may be lost, at most 16 KiB. */
  get volatile(): Sender {
    return new Sender(this.p2p, { ...this.flags, volatile: true });
  }

  /** Sends an event; a function as last argument asks for a reply: `(err, reply) => ...`. */
  emit(event: string, ...args: unknown[]): this {
    this.p2p["sendEvent"](this.flags, event, args);
    return this;
  }

  /** Sends an event and resolves with the reply (an array of replies without a single target). */
  emitWithAck(event: string, data?: unknown): Promise<any> {
    return new Promise((resolve, reject) => {
      this.p2p["sendEvent"](this.flags, event, [data, (err: P2PError | null, reply: unknown) => (err ? reject(err) : resolve(reply))]);
    });
  }
}

/**
 * A peer: one connection to a socketio-p2p server, and every peer met there.
 *
 * ```js
 * const p2p = new P2P(io(url), { rooms: ["chat"] });
 * await p2p.ready;
 * p2p.on("msg", (text, { from }) => console.log(from, text));
 * p2p.emit("msg", "hello");
 * ```
 */
export class P2P {
  /** Resolves once registered (and paired, with `peerUid`); rejects with a `P2PError`. */
  readonly ready: Promise<ReadyInfo>;
  readonly opts: Readonly<P2POptions>;

  private readonly session: Session;
  private readonly peersById = new Map<string, PeerState>();
  private readonly handlers = new Map<string, Entry[]>();
  private anyHandlers: AnyEntry[] = [];
  private readonly acks = new AckTable<unknown>();
  private readonly streams: Streams;
  private readonly services = new Map<string, ServiceMethods>();
  private readonly subscriptions = new Map<string, Set<(p: Publication) => void>>();
  /** Ends every subscription's iterator (on close). */
  private readonly subscriptionStops = new Set<() => void>();
  private readonly pingWaiters = new Map<bigint, (from: string) => void>();
  private volatileOut: [string, Uint8Array][] = [];
  private readonly rtcImpl: RTCPeerConnectionCtor | undefined;
  private flushQueued = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private timerAt = Infinity;
  private closed = false;
  /** Counts Welcomes: member pages asked for before the latest one are ignored. */
  private welcomes = 0;
  private pendingBlobs = 0;
  private blobChain: Promise<void> = Promise.resolve();
  private resolveReady!: (info: ReadyInfo) => void;
  private rejectReady!: (e: P2PError) => void;
  private isReady = false;
  private readonly listeners: [string, (...a: any[]) => void][];

  constructor(
    readonly socket: Socket,
    opts: P2POptions = {},
    /** Called with the peer id each time a data channel to a peer opens. */
    readonly onUpgrade?: (peer: string) => void,
  ) {
    this.opts = opts;
    this.rtcImpl = opts.wrtc?.RTCPeerConnection ?? (globalThis as any).RTCPeerConnection;
    const rooms = [...(opts.rooms ?? []), ...(opts.room ? [opts.room] : [])];
    if (!rooms.length && !opts.uid && !opts.peerUid) rooms.push("default");
    this.session = new Session({ uid: opts.uid ?? null, rooms });
    this.streams = new Streams(
      {
        window: opts.streamWindow,
        requestTimeout: opts.requestTimeout ?? 10_000,
      },
      (peer, msg) => this.sendReliable(peer, msg),
    );
    this.ready = new Promise<ReadyInfo>((res, rej) => {
      this.resolveReady = res;
      this.rejectReady = rej;
    });
    this.ready.catch(() => {});
    this.listeners = [
      ["connect", () => this.onConnect()],
      ["disconnect", () => this.onDisconnect()],
      ["connect_error", (err: Error) => this.onConnectError(err)],
      ["p2p:res", (res: Response) => this.onResponse(res)],
      ["p2p:presence", (p: any) => this.onPresence(p)],
      ["p2p:error", (e: any) => this.onServerError(e)],
      ["p2p:f", (data: unknown) => this.onFrames(data)],
      ["p2p:call", (c: any) => this.onCall(c)],
      ["p2p:topic", (t: any) => this.onTopic(t)],
      ["p2p:sig", (s: any) => this.onSignal(s)],
    ];
    for (const [ev, fn] of this.listeners) socket.on(ev, fn);
    if (socket.connected) this.onConnect();
  }

  /** Our peer id (`Welcome.id`; not `socket.id`, which differs after a resume). */
  get id(): string | null {
    return this.session.id;
  }

  get uid(): string | null {
    return this.session.uid;
  }

  // ---------------------------------------------------------------- events

  /** Handles an event from any peer (or a local event such as `peer-joined`). */
  on(event: string, fn: Handler): this {
    return this.addHandler(event, { fn, once: false });
  }

  once(event: string, fn: Handler): this {
    return this.addHandler(event, { fn, once: true });
  }

  /** Removes one handler, or every handler of `event` (not those of `from(..)`). */
  off(event: string, fn?: Handler): this {
    const list = this.handlers.get(event);
    if (list) {
      const keep = list.filter((e) => (fn ? e.fn !== fn : e.from !== undefined));
      if (keep.length) this.handlers.set(event, keep);
      else this.handlers.delete(event);
    }
    return this;
  }

  /** Handles every peer event: `(event, data, meta, reply?)`. */
  onAny(fn: AnyHandler): this {
    this.anyHandlers.push({ fn });
    return this;
  }

  offAny(fn?: AnyHandler): this {
    this.anyHandlers = this.anyHandlers.filter((e) => (fn ? e.fn !== fn : e.from !== undefined));
    return this;
  }

  /** Handlers for one sender's events: `p2p.from(id).on("x", ...)`. They go when that peer does. */
  from(peer: string) {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    return {
      on(event: string, fn: Handler) {
        self.addHandler(event, { fn, once: false, from: peer });
        return this;
      },
      once(event: string, fn: Handler) {
        self.addHandler(event, { fn, once: true, from: peer });
        return this;
      },
      onAny(fn: AnyHandler) {
        self.anyHandlers.push({ fn, from: peer });
        return this;
      },
      off(event: string, fn?: Handler) {
        const list = self.handlers.get(event) ?? [];
        self.handlers.set(
          event,
          list.filter((e) => !(e.from === peer && (!fn || e.fn === fn))),
        );
        return this;
      },
    };
  }

  private addHandler(event: string, e: Entry): this {
    const list = this.handlers.get(event);
    if (list) list.push(e);
    else this.handlers.set(event, [e]);
    return this;
  }

  private emitLocal(event: string, data: unknown): void {
    const list = this.handlers.get(event);
    if (!list) return;
    const meta: EventMeta = { from: this.session.id ?? "", event, transport: "relay" };
    for (const e of [...list]) {
      if (e.once) this.removeEntry(event, e);
      try {
        e.fn(data, meta);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }

  private removeEntry(event: string, e: Entry): void {
    const list = this.handlers.get(event);
    if (!list) return;
    const i = list.indexOf(e);
    if (i >= 0) list.splice(i, 1);
  }

  // ---------------------------------------------------------------- sending

  /** Sends to every peer of our rooms and pair; a last-argument function asks for replies. */
  emit(event: string, ...args: unknown[]): this {
    this.sendEvent({ targets: null, volatile: false }, event, args);
    return this;
  }

  /** Sends to every peer and resolves with their replies (in peer id order). */
  emitWithAck(event: string, data?: unknown): Promise<any[]> {
    return new Sender(this, { targets: null, volatile: false }).emitWithAck(event, data);
  }

  to(peer: string | string[]): Sender {
    return new Sender(this, { targets: null, volatile: false }).to(peer);
  }

  timeout(ms: number): Sender {
    return new Sender(this, { targets: null, volatile: false, timeout: ms });
  }

  get volatile(): Sender {
    return new Sender(this, { targets: null, volatile: true });
  }

  private sendEvent(flags: SendFlags, event: string, args: unknown[]): void {
    let ack: AckCallback | undefined;
    if (args.length && typeof args[args.length - 1] === "function") ack = args.pop() as AckCallback;
    if (args.length > 1) throw new P2PError("BadPayload", "one data argument per event (pass an array or an object)");
    const data = args[0];
    if (this.pendingBlobs > 0 || isBlob(data)) {
      this.pendingBlobs++;
      this.blobChain = this.blobChain.then(async () => {
        try {
          const value = isBlob(data) ? new Uint8Array(await data.arrayBuffer()) : data;
          this.sendNow(flags, event, value, ack);
        } catch (e) {
          if (ack) ack(toError(e as P2PError));
        } finally {
          this.pendingBlobs--;
        }
      });
      return;
    }
    this.sendNow(flags, event, data, ack);
  }

  private sendNow(flags: SendFlags, event: string, data: unknown, ack?: AckCallback): void {
    const fail = (e: P2PError) => {
      if (ack) queueMicrotask(() => ack(e));
      else throw e;
    };
    if (this.closed) return fail(new P2PError("Closed", "this P2P is closed"));
    const single = flags.targets?.length === 1;
    const targets = flags.targets ?? this.peers().map((p) => p.id);
    const payload = toWire(data);
    const max = this.opts.maxMessageSize ?? 64 * 1024 * 1024;
    if (payload.data.length > max) {
      return fail(new P2PError("PayloadTooLarge", `payload of ${payload.data.length} bytes is larger than the limit of ${max}`));
    }
    if (flags.volatile) {
      if (payload.data.length > VOLATILE_MAX) return fail(new P2PError("PayloadTooLarge", "volatile events are at most 16 KiB"));
      for (const t of targets) {
        if (!this.session.registered) break;
        this.volatileOut.push([t, encodeFrame({ to: t, from: "", body: { kind: "volatile", msg: { type: "event", event, ackId: 0, payload } } })]);
      }
      this.scheduleFlush();
      if (ack) queueMicrotask(() => ack(null, single ? undefined : []));
      return;
    }
    for (const t of targets) {
      if (!this.peersById.has(t)) return fail(new P2PError("PeerOffline", `no peer ${t} in our rooms or pair`, { peer: t }));
    }
    if (!ack) {
      for (const t of targets) this.sendReliable(t, { type: "event", event, ackId: 0, payload });
      return;
    }
    const timeout = flags.timeout ?? this.opts.ackTimeout ?? 10_000;
    const results: unknown[] = new Array(targets.length);
    let left = targets.length;
    let failed = false;
    if (left === 0) return void queueMicrotask(() => ack(null, []));
    targets.forEach((t, i) => {
      const ackId = this.acks.add(t, timeout, now(), (r: AckResult<unknown>) => {
        if (failed) return;
        if (!r.ok) {
          failed = true;
          return ack(new P2PError(r.code, r.message, { peer: t, remote: r.code !== "Timeout" && r.code !== "PeerOffline" && r.code !== "Closed" }));
        }
        results[i] = r.value;
        if (--left === 0) ack(null, single ? results[0] : results);
      });
      this.sendReliable(t, { type: "event", event, ackId, payload });
    });
  }

  private sendReliable(peer: string, msg: Msg): void {
    const st = this.peersById.get(peer);
    if (!st) return;
    st.link.send(msg);
    this.scheduleFlush();
  }

  // ---------------------------------------------------------------- rooms

  /** The peers we can reach (rooms and pair), sorted by id. */
  peers(): PeerInfo[] {
    return [...this.peersById.values()]
      .filter((p) => p.rooms.size > 0 || p.paired)
      .map((p) => p.info)
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  /** Joins a room; resolves with its other members. */
  async join(room: string): Promise<PeerInfo[]> {
    return (await this.request("join", { room }, {}, (ok) => {
      this.session.rooms.add(room);
      for (const p of ok as PeerInfo[]) this.meet(p, room);
    })) as PeerInfo[];
  }

  async leave(room: string): Promise<void> {
    await this.request("leave", { room });
    this.session.rooms.delete(room);
    for (const p of [...this.peersById.values()]) {
      if (p.rooms.delete(room)) this.forgetIfOutOfScope(p);
    }
  }

  /** The other members of a room we are in (asks the server). */
  async roomPeers(room: string): Promise<PeerInfo[]> {
    return (await this.request("peers", { room })) as PeerInfo[];
  }

  /**
   * Sends a request. `apply` runs on the answer at once, in the socket's order: a promise's
   * `then` would run only after the events that arrived with the answer, so a member that
   * the server listed and then announced gone would come back.
   */
  private request(
    op: string,
    fields: Record<string, unknown>,
    opts: { timeout?: number; retry?: boolean } = {},
    apply?: (ok: unknown) => void,
  ): Promise<unknown> {
    if (this.closed) return Promise.reject(new P2PError("Closed", "this P2P is closed"));
    return new Promise((resolve, reject) => {
      const answered = (ok: unknown) => {
        if (apply && !this.closed) apply(ok);
        resolve(ok);
      };
      const req = this.session.request(
        op,
        fields,
        now(),
        { resolve: answered, reject: (e) => reject(toError(e)) },
        { timeout: (opts.timeout ?? 0) + (this.opts.requestTimeout ?? 10_000), retry: opts.retry },
      );
      if (req) this.socket.emit("p2p:req", req);
      this.scheduleFlush();
    });
  }

  // ---------------------------------------------------------------- services and topics

  /** Provides a service, callable by any peer with `service(name).call(method, args)`. */
  async provide(name: string, methods: ServiceMethods): Promise<void> {
    await this.request("provide", { service: name });
    this.services.set(name, methods);
  }

  async unprovide(name: string): Promise<void> {
    this.services.delete(name);
    await this.request("unprovide", { service: name });
  }

  /** A service (of a peer or of the server) to call. */
  service(name: string) {
    return {
      call: async (method: string, args?: unknown, opts: { timeout?: number } = {}): Promise<any> => {
        const timeout = opts.timeout ?? this.opts.ackTimeout ?? 10_000;
        const outcome = (await this.request(
          "call",
          { service: name, method, args: args ?? null, timeout_ms: timeout },
          { timeout, retry: false },
        )) as { ok?: unknown; error?: ServerError };
        if (outcome && "error" in outcome && outcome.error) throw new P2PError(outcome.error.code, outcome.error.message, { remote: true });
        return outcome?.ok;
      },
    };
  }

  /** Subscribes to a topic: an async iterator of its publications (stop with `return()` or `break`). */
  async subscribe(topic: string): Promise<AsyncIterableIterator<Publication> & { unsubscribe(): Promise<void> }> {
    await this.request("subscribe", { topic });
    const queue: Publication[] = [];
    let wake: ((r: IteratorResult<Publication>) => void) | null = null;
    let done = false;
    const push = (p: Publication) => {
      if (wake) {
        const w = wake;
        wake = null;
        w({ value: p, done: false });
      } else queue.push(p);
    };
    let set = this.subscriptions.get(topic);
    if (!set) this.subscriptions.set(topic, (set = new Set()));
    set.add(push);
    const end = () => {
      done = true;
      if (wake) wake({ value: undefined, done: true });
      wake = null;
    };
    this.subscriptionStops.add(end);
    const stop = async () => {
      if (done) return;
      done = true;
      this.subscriptionStops.delete(end);
      set!.delete(push);
      if (wake) wake({ value: undefined, done: true });
      if (set!.size === 0) {
        this.subscriptions.delete(topic);
        if (!this.closed) await this.request("unsubscribe", { topic }).catch(() => {});
      }
    };
    const it = {
      next: (): Promise<IteratorResult<Publication>> => {
        if (queue.length) return Promise.resolve({ value: queue.shift()!, done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((r) => (wake = r));
      },
      return: async (): Promise<IteratorResult<Publication>> => {
        await stop();
        return { value: undefined, done: true };
      },
      unsubscribe: stop,
      [Symbol.asyncIterator]() {
        return it;
      },
    };
    return it;
  }

  /** Publishes to every subscriber of `topic`; resolves with how many it reached. */
  async publish(topic: string, data: unknown): Promise<number> {
    return (await this.request("publish", { topic, data: data ?? null }, { retry: false })) as number;
  }

  private onCall(c: { cid: number; from: PeerInfo; service: string; method: string; args: unknown }): void {
    const answer = (outcome: unknown) => void this.request("call_result", { cid: c.cid, outcome }).catch(() => {});
    const methods = this.services.get(c.service);
    const fn = methods && Object.prototype.hasOwnProperty.call(methods, c.method) ? methods[c.method] : undefined;
    if (!fn) return answer({ error: { code: "UnknownMethod", message: `no method ${c.method} in ${c.service}` } });
    Promise.resolve()
      .then(() => fn(c.args, { from: c.from, method: c.method }))
      .then(
        (ok) => answer({ ok: ok ?? null }),
        (e) => answer({ error: { code: e instanceof P2PError ? e.code : "Error", message: String(e?.message ?? e) } }),
      );
  }

  private onTopic(t: { topic: string; from: PeerInfo | null; data: unknown }): void {
    const set = this.subscriptions.get(t.topic);
    if (set) for (const push of [...set]) push({ topic: t.topic, from: t.from ?? null, data: t.data });
  }

  // ---------------------------------------------------------------- streams

  /** Opens a byte stream to `peer`; resolves once accepted. */
  openStream(peer: string, name: string): Promise<P2PStream> {
    if (!this.peersById.has(peer)) return Promise.reject(new P2PError("PeerOffline", `no peer ${peer} in our rooms or pair`));
    return this.streams.open(peer, name, now());
  }

  /** Called for every stream another peer opens: `incoming.accept()` or `incoming.refuse(reason)`. */
  onStream(fn: (incoming: IncomingStream) => void): this {
    this.streams.onIncoming = fn;
    return this;
  }

  // ---------------------------------------------------------------- lifecycle

  /** Leaves at once: disconnects the socket; pending calls fail with `Closed`. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [ev, fn] of this.listeners) this.socket.off(ev, fn);
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.socket.disconnect();
    for (const p of this.peersById.values()) this.dropRtc(p, "Closed");
    this.session.close();
    this.acks.fail(null, "Closed", "closed");
    this.streams.failAll("Closed");
    for (const stop of this.subscriptionStops) stop();
    if (!this.isReady) this.rejectReady(new P2PError("Closed", "closed before ready"));
    this.emitLocal("close", { reason: "closed" });
  }

  private onConnect(): void {
    if (this.closed) return;
    const hello = this.session.connected();
    this.socket.emit("p2p:req", hello);
  }

  private onDisconnect(): void {
    this.session.disconnected();
  }

  private onConnectError(err: Error): void {
    // A refusal by the server's middleware (auth): socket.io-client does not retry it.
    if (!this.socket.active && !this.isReady) {
      this.rejectReady(new P2PError("Rejected", err.message));
      this.close();
    }
  }

  private onResponse(res: Response): void {
    if (this.closed || !res || typeof res !== "object") return;
    const out = this.session.response(res, now());
    if (!out) return this.scheduleFlush();
    if (out.type === "refused") {
      const err = toError(out.error);
      if (out.first) this.rejectReady(err);
      this.emitLocal("server-error", err);
      this.close();
      return;
    }
    for (const req of out.send) this.socket.emit("p2p:req", req);
    this.onWelcome(out.welcome, out.first);
  }

  private onWelcome(w: Welcome, first: boolean): void {
    const t = now();
    this.serverIce = w.ice_servers ?? [];
    const listed = new Set<string>();
    if (!first && !w.continued) {
      for (const p of [...this.peersById.values()]) this.forget(p, "PeerOffline", false);
    }
    const welcome = ++this.welcomes;
    for (const r of w.rooms ?? []) {
      for (const p of r.peers) {
        listed.add(p.id);
        this.meet(p, r.room);
      }
      // A big room: the rest comes in pages (presences meanwhile apply on top).
      if (r.more) this.fetchMembers(r.room, r.peers.at(-1)?.id ?? null, welcome);
    }
    if (!first) {
      for (const p of this.peersById.values()) {
        if (w.continued) p.link.resend();
        if (!listed.has(p.info.id)) p.confirmBy = t + (this.opts.pairTimeout ?? 10_000);
      }
      for (const name of this.services.keys()) void this.request("provide", { service: name }).catch(() => {});
      for (const topic of this.subscriptions.keys()) void this.request("subscribe", { topic }).catch(() => {});
      this.emitLocal("reconnected", { continued: w.continued });
    }
    if (this.opts.peerUid) this.pair(this.opts.peerUid, first);
    else if (first) this.markReady();
    this.scheduleFlush();
  }

  /**
   * Asks for the members of `room` after `after` until the server says no more (PROTOCOL.md
   * section 3.1, `members`). Pages asked for before the latest Welcome are ignored.
   */
  private fetchMembers(room: string, after: string | null, welcome: number): void {
    const fields: Record<string, unknown> = { room, limit: MEMBERS_PAGE };
    if (after !== null) fields.after = after;
    const apply = (ok: unknown) => {
      if (welcome !== this.welcomes || !this.session.rooms.has(room)) return;
      const page = ok as MembersPage;
      for (const p of page.peers ?? []) this.meet(p, room);
      const last = page.peers?.at(-1)?.id;
      if (page.more && last !== undefined) this.fetchMembers(room, last, welcome);
      this.scheduleFlush();
    };
    this.request("members", fields, { retry: false }, apply).then(
      () => {},
      (e: P2PError) => {
        if (this.closed || welcome !== this.welcomes) return;
        // No answer in time: ask again. Lost with the connection: the next Welcome pages
        // afresh. A refusal (we left the room meanwhile) ends it.
        if (e.code === "Timeout") this.fetchMembers(room, after, welcome);
        else if (e.code !== "Disconnected" && e.code !== "Closed") this.emitLocal("server-error", e);
      },
    );
  }

  private markReady(pair?: PeerInfo): void {
    if (this.isReady) return;
    this.isReady = true;
    const info: ReadyInfo = { id: this.session.id! };
    if (this.session.uid) info.uid = this.session.uid;
    if (pair) info.pair = pair;
    this.resolveReady(info);
  }

  private pair(peerUid: string, first: boolean): void {
    const timeout = this.opts.pairTimeout ?? 10_000;
    this.request("pair", { peer_uid: peerUid, timeout_ms: timeout }, { timeout, retry: false }).then(
      (info) => {
        const peer = info as PeerInfo;
        const st = this.meet(peer, null);
        st.paired = true;
        st.confirmBy = undefined;
        if (!first) return;
        // Ready after the echo (PROTOCOL.md section 7).
        const nonce = randomOddNonce();
        const timer = setTimeout(() => {
          this.pingWaiters.delete(nonce);
          this.rejectReady(new P2PError("PeerOffline", `no echo from ${peer.id}`));
        }, timeout);
        this.pingWaiters.set(nonce, (from) => {
          if (from !== peer.id) return;
          clearTimeout(timer);
          this.pingWaiters.delete(nonce);
          this.markReady(peer);
        });
        st.link.ping(nonce);
        this.scheduleFlush();
      },
      (e: P2PError) => {
        if (first) {
          this.rejectReady(e);
          this.close();
        } else this.emitLocal("server-error", e);
      },
    );
  }

  // ---------------------------------------------------------------- peers

  private meet(info: PeerInfo, room: string | null): PeerState {
    let st = this.peersById.get(info.id);
    if (!st) {
      st = {
        info: { ...info },
        rooms: new Set(),
        paired: false,
        link: new Link(info.id, { window: this.opts.window, maxMessageSize: this.opts.maxMessageSize }),
      };
      this.peersById.set(info.id, st);
      if (this.autoUpgrade) {
        const id = info.id;
        queueMicrotask(() => {
          const p = this.peersById.get(id);
          if (p && !this.closed) this.startUpgrade(p, false);
        });
      }
    } else if (info.uid) st.info.uid = info.uid;
    if (room !== null) st.rooms.add(room);
    st.confirmBy = undefined;
    return st;
  }

  private forgetIfOutOfScope(p: PeerState): void {
    if (p.rooms.size === 0 && !p.paired) this.forget(p, "PeerOffline", false);
  }

  private forget(p: PeerState, code: string, announce: boolean): void {
    this.peersById.delete(p.info.id);
    this.dropRtc(p, code);
    this.acks.fail(p.info.id, code, `peer ${p.info.id} is gone`);
    this.streams.failPeer(p.info.id);
    for (const [ev, list] of this.handlers) {
      const keep = list.filter((e) => e.from !== p.info.id);
      if (keep.length !== list.length) this.handlers.set(ev, keep);
    }
    this.anyHandlers = this.anyHandlers.filter((e) => e.from !== p.info.id);
    if (announce) this.emitLocal("peer-disconnected", { peer: p.info });
  }

  private onPresence(p: { type: string; room?: string; peer: PeerInfo }): void {
    if (this.closed || !p?.peer?.id) return;
    switch (p.type) {
      case "joined":
        this.meet(p.peer, p.room ?? null);
        this.emitLocal("peer-joined", { room: p.room, peer: p.peer });
        break;
      case "paired":
        this.meet(p.peer, null).paired = true;
        this.emitLocal("peer-paired", { peer: p.peer });
        break;
      case "left": {
        const st = this.peersById.get(p.peer.id);
        if (st && p.room) st.rooms.delete(p.room);
        this.emitLocal("peer-left", { room: p.room, peer: p.peer });
        if (st) this.forgetIfOutOfScope(st);
        break;
      }
      case "disconnected": {
        const st = this.peersById.get(p.peer.id);
        if (st) this.forget(st, "PeerOffline", false);
        this.emitLocal("peer-disconnected", { peer: p.peer });
        break;
      }
    }
  }

  private onServerError(e: { code: string; message: string; event?: string; to?: string; seq?: number }): void {
    if (this.closed || !e) return;
    if (e.code === "Busy" && e.to && typeof e.seq === "number") {
      this.peersById.get(e.to)?.link.busy(e.seq);
      this.scheduleFlush();
      return;
    }
    // A peer or we are reconnecting: the links keep the frames and the RTO resends them.
    if (e.code === "UnknownPeer" || e.code === "NotRegistered") {
      if (e.event === "p2p:f" && e.to && this.peersById.has(e.to)) return;
    }
    this.emitLocal("server-error", new P2PError(e.code, e.message, { event: e.event, to: e.to, seq: e.seq }));
  }

  // ---------------------------------------------------------------- frames

  private onFrames(data: unknown): void {
    if (this.closed) return;
    let bytes: Uint8Array;
    if (typeof data === "string") {
      try {
        bytes = fromBase64(data);
      } catch {
        return;
      }
    } else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
    else if (ArrayBuffer.isView(data)) bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    else return;
    const t = now();
    let frames: Uint8Array[];
    try {
      frames = decodeBatch(bytes);
    } catch {
      return;
    }
    for (const raw of frames) {
      let frame: Frame;
      try {
        frame = decodeFrame(raw);
      } catch (e) {
        if (!(e instanceof CodecError)) throw e;
        continue;
      }
      if (!frame.from) continue;
      const st = this.peersById.get(frame.from) ?? this.meet({ id: frame.from }, null);
      for (const d of st.link.handle(frame.body, t)) this.deliver(st, d, frame.body.kind === "volatile", "relay");
    }
    this.scheduleFlush();
  }

  private deliver(st: PeerState, d: Delivery, volatile: boolean, via: Transport): void {
    const from = st.info.id;
    switch (d.type) {
      case "event":
        return this.dispatch(st, d.event, d.ackId, d.payload, volatile, via);
      case "reply": {
        let r: AckResult<unknown>;
        try {
          r = { ok: true, value: fromWire(d.payload) };
        } catch (e) {
          r = { ok: false, code: "BadPayload", message: (e as Error).message };
        }
        this.acks.settle(from, d.ackId, r);
        return;
      }
      case "replyError":
        this.acks.settle(from, d.ackId, { ok: false, code: d.code, message: d.message });
        return;
      case "stream":
        this.streams.handle(from, d, now());
        return;
      case "pong":
        this.pingWaiters.get(d.nonce)?.(from);
        return;
    }
  }

  private dispatch(st: PeerState, event: string, ackId: number, payload: import("./codec.js").WirePayload, volatile: boolean, via: Transport): void {
    const from = st.info.id;
    const replyError = (code: string, message: string) => {
      if (ackId !== 0 && !volatile) this.sendReliable(from, { type: "replyError", ackId, code, message });
    };
    let data: unknown;
    try {
      data = fromWire(payload);
    } catch (e) {
      return replyError("BadPayload", (e as Error).message);
    }
    const entries = (this.handlers.get(event) ?? []).filter((e) => e.from === undefined || e.from === from);
    const anys = this.anyHandlers.filter((e) => e.from === undefined || e.from === from);
    if (!entries.length && !anys.length) return replyError("NoHandler", `no handler for ${JSON.stringify(event)}`);
    const meta: EventMeta = { from, event, transport: via };
    if (st.info.uid) meta.fromUid = st.info.uid;
    let reply: ReplyFn | undefined;
    if (ackId !== 0 && !volatile) {
      let done = false;
      const once = (msg: Msg) => {
        if (done || !this.peersById.has(from)) return;
        done = true;
        this.sendReliable(from, msg);
      };
      reply = Object.assign(
        (value?: unknown) => {
          let p;
          try {
            p = toWire(value);
          } catch (e) {
            return once({ type: "replyError", ackId, code: "BadPayload", message: (e as Error).message });
          }
          once({ type: "reply", ackId, payload: p });
        },
        { error: (code: string, message = "") => once({ type: "replyError", ackId, code, message }) },
      );
    }
    for (const e of entries) {
      if (e.once) this.removeEntry(event, e);
      this.callHandler(() => e.fn(data, meta, reply), reply);
    }
    for (const e of anys) this.callHandler(() => e.fn(event, data, meta, reply), reply);
  }

  private callHandler(run: () => unknown, reply?: ReplyFn): void {
    try {
      const r = run() as unknown;
      if (r && typeof (r as Promise<unknown>).then === "function") {
        (r as Promise<unknown>).then(undefined, (err) => reply?.error("HandlerError", String(err?.message ?? err)));
      }
    } catch (err) {
      reply?.error("HandlerError", String((err as Error)?.message ?? err));
      queueMicrotask(() => {
        throw err;
      });
    }
  }

  // ---------------------------------------------------------------- WebRTC

  private get autoUpgrade(): boolean {
    return (this.opts.autoUpgrade ?? true) && this.rtcImpl !== undefined;
  }

  /** Whether WebRTC is available here (the browser's, or the `wrtc` option's). */
  get webrtc(): boolean {
    return this.rtcImpl !== undefined;
  }

  /** Which transport carries messages to `peer` now. */
  transport(peer: string): Transport {
    const p = this.peersById.get(peer);
    return p?.neg?.open && p.rtc?.isOpen ? "datachannel" : "relay";
  }

  /** Starts an upgrade with every peer we can reach. */
  upgrade(): void {
    for (const p of [...this.peersById.values()]) this.startUpgrade(p, true);
  }

  /** Upgrades to a data channel with `peer`; resolves once it is open. */
  upgradePeer(peer: string): Promise<void> {
    const p = this.peersById.get(peer);
    if (!p) return Promise.reject(new P2PError("PeerOffline", `no peer ${peer} in our rooms or pair`, { peer }));
    if (!this.rtcImpl) return Promise.reject(new P2PError("Unsupported", "no RTCPeerConnection here (pass the wrtc option)", { peer }));
    if (p.neg?.open) return Promise.resolve();
    if (!this.negFor(p)) return Promise.reject(new P2PError("NotRegistered", "not registered yet", { peer }));
    return new Promise((resolve, reject) => {
      (p.upWaiters ??= []).push({ resolve, reject });
      this.startUpgrade(p, true);
    });
  }

  /** Goes back to the relay with `peer` (no automatic retry until asked again). */
  downgradePeer(peer: string): void {
    const p = this.peersById.get(peer);
    if (p?.neg) this.perform(p, p.neg.hangUp(APP_DOWNGRADE, now()));
  }

  /** Test hook: closes the peer connection to `peer` as if it died (no bye). */
  killDataChannel(peer: string): void {
    this.peersById.get(peer)?.rtc?.pc.close();
  }

  private negFor(p: PeerState): Negotiation | null {
    if (!this.rtcImpl || !this.session.id) return null;
    p.neg ??= new Negotiation(this.session.id, p.info.id, now(), {
      upgradeTimeout: this.opts.upgradeTimeout,
      dcTimeout: this.opts.dcTimeout,
      retryBackoff: this.opts.retryBackoff,
      autoRetry: this.opts.autoUpgrade ?? true,
    });
    return p.neg;
  }

  /** Within numClients for one more connection to `p`. */
  private mayConnect(p: PeerState): boolean {
    let n = 0;
    for (const q of this.peersById.values()) if (q !== p && q.neg?.active) n++;
    return n < (this.opts.numClients ?? 5);
  }

  private startUpgrade(p: PeerState, explicit: boolean): void {
    const neg = this.negFor(p);
    if (!neg) return;
    this.perform(p, neg.start(now(), this.mayConnect(p), explicit));
  }

  private onSignal(m: { from?: string; signal?: Signal }): void {
    if (this.closed || !m?.from || !m.signal || typeof m.signal !== "object") return;
    const p = this.peersById.get(m.from);
    if (!p) return;
    const neg = this.negFor(p);
    if (!neg) return;
    this.perform(p, neg.onSignal(m.signal, this.mayConnect(p), now()));
  }

  /** ICE servers of the last welcome (used beside `opts.iceServers`). */
  private serverIce: unknown[] = [];

  private sendSignal(peer: string, signal: Signal): void {
    void this.request("signal", { to: peer, signal }, { retry: false }).catch(() => {});
  }

  private newConn(p: PeerState): RtcConn {
    const iceServers = [...(this.opts.iceServers ?? []), ...this.serverIce];
    const config: Record<string, unknown> = { iceServers, ...(this.opts.rtcConfig ?? {}) };
    const conn: RtcConn = new RtcConn(
      { impl: this.rtcImpl!, config, trickle: this.opts.trickle ?? true },
      {
        signal: (s) => {
          if (p.rtc === conn && !this.closed) this.sendSignal(p.info.id, s);
        },
        drained: () => {
          if (p.rtc === conn) this.scheduleFlush();
        },
        open: () => {
          if (p.rtc === conn && p.neg && !this.closed) this.perform(p, p.neg.onOpen(now()));
        },
        closed: (reason) => {
          if (p.rtc === conn && p.neg && !this.closed) this.perform(p, p.neg.onClosed(reason, now()));
        },
        message: (bytes) => {
          if (p.rtc === conn && !this.closed) this.onChannelFrame(p, bytes);
        },
      },
    );
    p.rtc = conn;
    return conn;
  }

  private perform(p: PeerState, actions: Action[]): void {
    if (!actions.length) return;
    const id = p.info.id;
    for (const a of actions) {
      switch (a.type) {
        case "createOffer":
          this.newConn(p).offer();
          break;
        case "acceptOffer":
          this.newConn(p).answerTo(a.sdp);
          break;
        case "acceptAnswer":
          p.rtc?.acceptAnswer(a.sdp);
          break;
        case "addCandidate":
          p.rtc?.candidate(a.signal);
          break;
        case "send":
          this.sendSignal(id, a.signal);
          break;
        case "closeLink":
          p.rtc?.close();
          p.rtc = undefined;
          break;
        case "keepalive":
          p.link.ping(0n);
          break;
        case "upgraded":
          p.link.resend();
          for (const w of p.upWaiters ?? []) w.resolve();
          p.upWaiters = [];
          this.emitLocal("upgrade", { peer: id });
          if (this.onUpgrade) {
            try {
              this.onUpgrade(id);
            } catch (err) {
              queueMicrotask(() => {
                throw err;
              });
            }
          }
          break;
        case "downgraded":
          p.link.resend();
          this.emitLocal("downgrade", { peer: id, reason: a.reason });
          break;
        case "failed":
          for (const w of p.upWaiters ?? []) w.reject(new P2PError("UpgradeFailed", a.reason, { peer: id }));
          p.upWaiters = [];
          this.emitLocal("upgrade-failed", { peer: id, reason: a.reason });
          break;
      }
    }
    this.scheduleFlush();
  }

  /** A peer is gone (or we close): the connection goes without a bye. */
  private dropRtc(p: PeerState, code: string): void {
    p.rtc?.close();
    p.rtc = undefined;
    if (p.neg) p.neg.phase = "idle";
    p.neg = undefined;
    for (const w of p.upWaiters ?? []) w.reject(new P2PError(code, `peer ${p.info.id} is gone`, { peer: p.info.id }));
    p.upWaiters = [];
  }

  private onChannelFrame(p: PeerState, bytes: Uint8Array): void {
    const t = now();
    p.neg?.onReceive(t);
    let frame: Frame;
    try {
      frame = decodeFrame(bytes);
    } catch {
      return;
    }
    // The channel tells the sender: the frame's `from` is ignored.
    for (const d of p.link.handle(frame.body, t)) {
      if (!this.peersById.has(p.info.id)) break;
      this.deliver(p, d, frame.body.kind === "volatile", "datachannel");
    }
    this.scheduleFlush();
  }

  // ---------------------------------------------------------------- output and time

  private scheduleFlush(): void {
    if (this.flushQueued || this.closed) return;
    this.flushQueued = true;
    queueMicrotask(() => this.flush());
  }

  private flush(): void {
    this.flushQueued = false;
    if (this.closed) return;
    const t = now();
    this.session.expire(t);
    this.acks.expire(t);
    this.streams.tick(t);
    for (const p of [...this.peersById.values()]) {
      if (p.confirmBy !== undefined && p.confirmBy <= t) this.forget(p, "PeerOffline", true);
    }
    for (const p of [...this.peersById.values()]) if (p.neg) this.perform(p, p.neg.onTick(t, this.mayConnect(p)));
    const relayUp = this.session.registered && this.socket.connected;
    const out: Uint8Array[] = [];
    for (const [to, f] of this.volatileOut) {
      const p = this.peersById.get(to);
      if (p?.rtc && p.neg?.open && p.rtc.send(f, true)) continue;
      if (relayUp) out.push(f);
    }
    this.volatileOut = [];
    for (const p of this.peersById.values()) {
      if (p.rtc && p.neg?.open && p.rtc.isOpen) {
        // A full send buffer: wait for `drained` (frames are at most FRAGMENT_SIZE + header).
        const room = p.rtc.room;
        if (room <= 0) continue;
        for (const f of p.link.poll(t, Math.ceil(room / FRAGMENT_SIZE))) p.rtc.send(f, false);
      } else if (relayUp) for (const f of p.link.poll(t)) out.push(f);
    }
    if (relayUp) this.sendBatches(out);
    this.armTimer(t);
  }

  private sendBatches(frames: Uint8Array[]): void {
    let group: Uint8Array[] = [];
    let size = 0;
    for (const f of frames) {
      const n = f.length + 3;
      if (group.length && size + n > BATCH_MAX) {
        this.socket.emit("p2p:f", encodeBatch(group));
        group = [];
        size = 0;
      }
      group.push(f);
      size += n;
    }
    if (group.length) this.socket.emit("p2p:f", encodeBatch(group));
  }

  private armTimer(t: number): void {
    let next: number | null = null;
    const take = (x: number | null) => {
      if (x !== null && (next === null || x < next)) next = x;
    };
    take(this.session.nextTimeout());
    take(this.acks.nextTimeout());
    take(this.streams.nextTimeout());
    for (const p of this.peersById.values()) {
      if (p.confirmBy !== undefined) take(p.confirmBy);
      // A channel with a full buffer wakes us itself (`drained`).
      const full = p.neg?.open && p.rtc?.isOpen && p.rtc.room <= 0;
      if ((this.session.registered || p.neg?.open) && !full) take(p.link.nextTimeout());
      if (p.neg) take(p.neg.nextTimeout());
    }
    if (next === null) return;
    const at = Math.max(next, t + 1);
    if (this.timer && this.timerAt <= at) return;
    if (this.timer) clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.timerAt = Infinity;
      this.flush();
    }, at - t);
  }
}
