/**
 * Pending acks (request/reply, PROTOCOL.md section 6): ack ids, the peer each request went
 * to, and deadlines. Pure: time is passed in.
 */
export type AckResult<T> = { ok: true; value: T } | { ok: false; code: string; message: string };

interface Pending<T> {
  peer: string;
  deadline: number;
  done: (r: AckResult<T>) => void;
}

export class AckTable<T> {
  private next = 1;
  private readonly pending = new Map<number, Pending<T>>();

  get size(): number {
    return this.pending.size;
  }

  /** Registers a request to `peer`; returns its ack id (1, 2, ...). */
  add(peer: string, timeoutMs: number, now: number, done: (r: AckResult<T>) => void): number {
    const id = this.next++;
    this.pending.set(id, { peer, deadline: now + timeoutMs, done });
    return id;
  }

  /** A reply arrived from `peer`: it counts only if pending and from the peer asked. */
  settle(peer: string, ackId: number, r: AckResult<T>): boolean {
    const p = this.pending.get(ackId);
    if (!p || p.peer !== peer) return false;
    this.pending.delete(ackId);
    p.done(r);
    return true;
  }

  /** Fails every request whose deadline passed with `Timeout`. */
  expire(now: number): void {
    for (const [id, p] of this.pending) {
      if (p.deadline <= now) {
        this.pending.delete(id);
        p.done({ ok: false, code: "Timeout", message: `no reply from ${p.peer} in time` });
      }
    }
  }

  /** Fails every request to `peer` (or to everyone when `peer` is null). */
  fail(peer: string | null, code: string, message: string): void {
    for (const [id, p] of this.pending) {
      if (peer === null || p.peer === peer) {
        this.pending.delete(id);
        p.done({ ok: false, code, message });
      }
    }
  }

  nextTimeout(): number | null {
    let t: number | null = null;
    for (const p of this.pending.values()) if (t === null || p.deadline < t) t = p.deadline;
    return t;
  }
}
