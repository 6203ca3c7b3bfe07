/**
 * Registration with the server (PROTOCOL.md sections 2, 3 and 10): `hello`, `Welcome`,
 * resume after a reconnection, and the table of control requests matched by `rid`. Pure:
 * it returns the requests to send and never touches a socket or a clock.
 */

/** Version of the control protocol this client speaks. */
export const PROTOCOL_VERSION = 2;
/** How long a control request waits for its response by default (ms). */
export const REQUEST_TIMEOUT = 10_000;

export interface PeerInfo {
  id: string;
  uid?: string;
}

export interface RoomPeers {
  room: string;
  /** The first members (sorted by id); with `more`, ask for the rest in `members` pages. */
  peers: PeerInfo[];
  more?: boolean;
}

/** The answer to `members`: one page of a room's other members, sorted by id. */
export interface MembersPage {
  peers: PeerInfo[];
  more: boolean;
}

export interface Welcome {
  id: string;
  uid?: string | null;
  rooms: RoomPeers[];
  max_frame: number;
  token: string;
  continued: boolean;
  /** STUN/TURN servers handed out by the server (short-lived TURN credentials), to use beside our own. */
  ice_servers?: { urls: string[]; username?: string; credential?: string }[];
}

export interface ServerError {
  code: string;
  message: string;
}

/** A `p2p:req` object. */
export type Request = { rid: number; op: string } & Record<string, unknown>;

/** A `p2p:res` object. */
export interface Response {
  rid: number;
  ok?: unknown;
  error?: ServerError;
}

interface Pending {
  req: Request;
  deadline: number;
  timeout: number;
  /** Sent again on the next connection if its answer was lost with the old one. */
  retry: boolean;
  sent: boolean;
  resolve: (v: unknown) => void;
  reject: (e: ServerError) => void;
}

export type HelloOutcome =
  | { type: "welcome"; welcome: Welcome; first: boolean; send: Request[] }
  | { type: "refused"; error: ServerError; first: boolean };

export class Session {
  /** Our peer id (`Welcome.id`), once registered. */
  id: string | null = null;
  uid: string | null;
  maxFrame = 262144;
  readonly rooms: Set<string>;
  /** A `Welcome` answered the `hello` of the current connection. */
  registered = false;
  private token: string | null = null;
  private welcomed = false;
  private nextRid = 1;
  private helloRid = 0;
  private readonly pending = new Map<number, Pending>();

  constructor(opts: { uid?: string | null; rooms?: Iterable<string> } = {}) {
    this.uid = opts.uid ?? null;
    this.rooms = new Set(opts.rooms ?? []);
  }

  /** A new connection is up: the `hello` to send first (with `resume` after the first Welcome). */
  connected(): Request {
    this.registered = false;
    this.helloRid = this.nextRid++;
    const hello: Request = { rid: this.helloRid, op: "hello", version: PROTOCOL_VERSION, frames: "binary" };
    if (this.uid !== null) hello.uid = this.uid;
    if (this.rooms.size) hello.rooms = [...this.rooms];
    if (this.id !== null && this.token !== null) hello.resume = { id: this.id, token: this.token };
    return hello;
  }

  /** The connection is gone: requests in flight are sent again later, or fail. */
  disconnected(): void {
    this.registered = false;
    this.helloRid = 0;
    for (const [rid, p] of this.pending) {
      if (!p.sent) continue;
      if (p.retry) p.sent = false;
      else {
        this.pending.delete(rid);
        p.reject({ code: "Disconnected", message: `connection lost during ${p.req.op}` });
      }
    }
  }

  /**
   * Queues a control request. Returns it if it can go out now, or null if it waits for the
   * registration.
   */
  request(
    op: string,
    fields: Record<string, unknown>,
    now: number,
    handlers: { resolve: (v: unknown) => void; reject: (e: ServerError) => void },
    opts: { timeout?: number; retry?: boolean } = {},
  ): Request | null {
    const req: Request = { ...fields, rid: this.nextRid++, op };
    const timeout = opts.timeout ?? REQUEST_TIMEOUT;
    const p: Pending = { req, timeout, deadline: now + timeout, retry: opts.retry ?? true, sent: false, ...handlers };
    this.pending.set(req.rid, p);
    if (!this.registered) return null;
    p.sent = true;
    return req;
  }

  /** Handles a `p2p:res`. */
  response(res: Response, now: number): HelloOutcome | null {
    if (res.rid === this.helloRid && this.helloRid !== 0) {
      this.helloRid = 0;
      const first = !this.welcomed;
      if (res.error) return { type: "refused", error: res.error, first };
      const welcome = res.ok as Welcome;
      this.welcomed = true;
      this.registered = true;
      this.id = welcome.id;
      this.token = welcome.token;
      this.maxFrame = welcome.max_frame || this.maxFrame;
      if (welcome.uid) this.uid = welcome.uid;
      const send: Request[] = [];
      for (const p of this.pending.values()) {
        if (p.sent) continue;
        p.sent = true;
        p.deadline = now + p.timeout;
        send.push(p.req);
      }
      return { type: "welcome", welcome, first, send };
    }
    const p = this.pending.get(res.rid);
    if (!p) return null;
    this.pending.delete(res.rid);
    if (res.error) p.reject(res.error);
    else p.resolve(res.ok ?? null);
    return null;
  }

  /** Fails requests sent and unanswered past their deadline. */
  expire(now: number): void {
    for (const [rid, p] of this.pending) {
      if (p.sent && p.deadline <= now) {
        this.pending.delete(rid);
        p.reject({ code: "Timeout", message: `no answer to ${p.req.op} from the server` });
      }
    }
  }

  /** Fails every request (the client is closing). */
  close(): void {
    this.registered = false;
    for (const p of this.pending.values()) p.reject({ code: "Closed", message: "closed" });
    this.pending.clear();
  }

  nextTimeout(): number | null {
    let t: number | null = null;
    for (const p of this.pending.values()) if (p.sent && (t === null || p.deadline < t)) t = p.deadline;
    return t;
  }
}
