/**
 * WebRTC negotiation with one peer (PROTOCOL.md section 9) as a pure state machine: inputs
 * (a wish to upgrade, signals from the peer, channel open/closed, time) go in, actions come
 * out. No RTCPeerConnection here: the driver performs the actions. Mirrors the Rust
 * peer's state machine, with liveness (keepalive, dead channel) and retry backoff.
 */

export type Signal =
  | { type: "offer"; sdp: string }
  | { type: "answer"; sdp: string }
  | { type: "candidate"; candidate: string; sdpMid?: string | null; sdpMLineIndex?: number | null; usernameFragment?: string | null }
  | { type: "request" }
  | { type: "bye"; reason?: string | null };

export type Action =
  /** Create a fresh peer connection, its two channels and an offer, then send it. */
  | { type: "createOffer" }
  /** Create a fresh peer connection, apply this offer, send the answer. */
  | { type: "acceptOffer"; sdp: string }
  /** Apply the answer to our offer. */
  | { type: "acceptAnswer"; sdp: string }
  /** Add a remote candidate (buffered by the driver until the remote description is set). */
  | { type: "addCandidate"; signal: Extract<Signal, { type: "candidate" }> }
  | { type: "send"; signal: Signal }
  /** Close the peer connection, if any. */
  | { type: "closeLink" }
  /** The channel is open: move traffic onto it (resend what is unacknowledged). */
  | { type: "upgraded" }
  /** The open channel is gone: move traffic back to the relay (resend what is unacknowledged). */
  | { type: "downgraded"; reason: string }
  /** The attempt failed; traffic stays on the relay. */
  | { type: "failed"; reason: string }
  /** Send a keepalive `Ping{nonce: 0}` on the channel. */
  | { type: "keepalive" };

export type Phase = "idle" | "requested" | "offering" | "answering" | "open";

export const BUSY = "busy: num_clients reached";
export const APP_DOWNGRADE = "downgrade requested by the application";

export interface NegotiationOptions {
  /** No open channel within this long fails the attempt (5 s). */
  upgradeTimeout?: number;
  /** Nothing received on an open channel for this long: dead (3 s, at least 300 ms). */
  dcTimeout?: number;
  /** Retry after failures and losses (only with autoUpgrade). */
  autoRetry?: boolean;
  /** First retry backoff (1 s), doubled up to `maxBackoff` (60 s). */
  retryBackoff?: number;
  maxBackoff?: number;
}

export class Negotiation {
  readonly offerer: boolean;
  phase: Phase = "idle";
  private since: number;
  private readonly upgradeTimeout: number;
  readonly dcTimeout: number;
  private readonly autoRetry: boolean;
  private readonly backoffMin: number;
  private readonly backoffMax: number;
  private backoff: number;
  /** When to retry, or null. */
  retryAt: number | null = null;
  /** Set after an application downgrade (either side) or a busy refusal: no automatic retry. */
  noRetry = false;
  private lastRx = 0;
  private lastPing = 0;
  /** A signal other than `bye` came from the peer since we started this attempt. */
  private heard = false;

  constructor(me: string, peer: string, now: number, opts: NegotiationOptions = {}) {
    this.offerer = me < peer;
    this.since = now;
    this.upgradeTimeout = opts.upgradeTimeout ?? 5000;
    this.dcTimeout = Math.max(300, opts.dcTimeout ?? 3000);
    this.autoRetry = opts.autoRetry ?? true;
    this.backoffMin = opts.retryBackoff ?? 1000;
    this.backoffMax = opts.maxBackoff ?? 60_000;
    this.backoff = this.backoffMin;
  }

  /** An attempt is under way or the channel is open (counts toward numClients). */
  get active(): boolean {
    return this.phase !== "idle";
  }

  get open(): boolean {
    return this.phase === "open";
  }

  private enter(phase: Phase, now: number): void {
    this.phase = phase;
    this.since = now;
  }

  /** The application (or autoUpgrade) wants a channel. `accept`: within numClients. */
  start(now: number, accept = true, explicit = false): Action[] {
    if (explicit) this.noRetry = false;
    if (this.phase !== "idle") return [];
    this.retryAt = null;
    this.heard = false;
    if (!accept) return [{ type: "failed", reason: BUSY }];
    if (this.offerer) {
      this.enter("offering", now);
      return [{ type: "createOffer" }];
    }
    this.enter("requested", now);
    return [{ type: "send", signal: { type: "request" } }];
  }

  onSignal(signal: Signal, accept: boolean, now: number): Action[] {
    if (signal.type !== "bye") this.heard = true;
    switch (signal.type) {
      case "request": {
        if (!this.offerer) return [{ type: "send", signal: { type: "request" } }];
        if (this.phase === "offering") return [];
        if (this.phase === "open") {
          this.enter("offering", now);
          return [{ type: "closeLink" }, { type: "downgraded", reason: "peer asked for a new connection" }, { type: "createOffer" }];
        }
        if (!accept && this.phase === "idle") return [{ type: "send", signal: { type: "bye", reason: BUSY } }];
        this.retryAt = null;
        this.enter("offering", now);
        return [{ type: "createOffer" }];
      }
      case "offer": {
        if (this.phase === "offering" && this.offerer) return [];
        if (!accept && this.phase === "idle") return [{ type: "send", signal: { type: "bye", reason: BUSY } }];
        const wasOpen = this.phase === "open";
        this.retryAt = null;
        this.enter("answering", now);
        const out: Action[] = [{ type: "closeLink" }];
        if (wasOpen) out.push({ type: "downgraded", reason: "peer renegotiated" });
        out.push({ type: "acceptOffer", sdp: signal.sdp });
        return out;
      }
      case "answer":
        return this.phase === "offering" ? [{ type: "acceptAnswer", sdp: signal.sdp }] : [];
      case "candidate":
        return this.phase === "offering" || this.phase === "answering" || this.phase === "open"
          ? [{ type: "addCandidate", signal }]
          : [];
      case "bye": {
        const reason = signal.reason ?? "peer hung up";
        // A bye names no attempt. One that comes while we wait for the peer's first answer
        // to an attempt we started, and is not a busy refusal, belongs to the connection
        // before: the peer closed it (its channel closed) before it saw our new request or
        // offer. Ending the new attempt for it would fail an upgrade that is going well. If
        // the peer did give up on this attempt, the upgrade timeout ends it.
        if ((this.phase === "requested" || this.phase === "offering") && !this.heard && !reason.startsWith("busy")) return [];
        if (reason.includes("application") || reason.startsWith("busy")) this.noRetry = true;
        return this.closedWith(reason, false, now);
      }
    }
  }

  /** The reliable channel opened. */
  onOpen(now: number): Action[] {
    if (this.phase !== "offering" && this.phase !== "answering") return [];
    this.enter("open", now);
    this.backoff = this.backoffMin;
    this.retryAt = null;
    this.lastRx = now;
    this.lastPing = now;
    return [{ type: "upgraded" }];
  }

  /** Something arrived on the channel (a sign of life). */
  onReceive(now: number): void {
    this.lastRx = now;
  }

  /** The connection closed or failed by itself, or a local WebRTC call failed. */
  onClosed(reason: string, now: number): Action[] {
    return this.closedWith(reason, true, now);
  }

  /** Local request to go back to the relay. */
  hangUp(reason: string, now: number): Action[] {
    if (reason.includes("application")) this.noRetry = true;
    return this.closedWith(reason, true, now);
  }

  private closedWith(reason: string, tellPeer: boolean, now: number): Action[] {
    const phase = this.phase;
    this.phase = "idle";
    if (phase === "idle") return [];
    const out: Action[] = [{ type: "closeLink" }];
    out.push(phase === "open" ? { type: "downgraded", reason } : { type: "failed", reason });
    if (tellPeer) out.push({ type: "send", signal: { type: "bye", reason } });
    if (this.autoRetry && !this.noRetry && !reason.startsWith("busy")) {
      this.retryAt = now + this.backoff;
      this.backoff = Math.min(this.backoff * 2, this.backoffMax);
    } else {
      this.retryAt = null;
      if (reason.startsWith("busy")) this.noRetry = true;
    }
    return out;
  }

  /** Timer: upgrade timeout, keepalive, dead channel, retry. */
  onTick(now: number, accept = true): Action[] {
    switch (this.phase) {
      case "requested":
      case "offering":
      case "answering":
        if (now - this.since >= this.upgradeTimeout) {
          return this.closedWith(`no data channel within ${this.upgradeTimeout} ms`, true, now);
        }
        return [];
      case "open": {
        if (now - this.lastRx >= this.dcTimeout) {
          return this.closedWith(`nothing received on the data channel for ${this.dcTimeout} ms`, true, now);
        }
        const third = this.dcTimeout / 3;
        if (now - this.lastRx >= third && now - this.lastPing >= third) {
          this.lastPing = now;
          return [{ type: "keepalive" }];
        }
        return [];
      }
      case "idle":
        if (this.retryAt !== null && now >= this.retryAt && !this.noRetry) {
          this.retryAt = null;
          return this.start(now, accept);
        }
        return [];
    }
  }

  /** When `onTick` has something to do next, or null. */
  nextTimeout(): number | null {
    switch (this.phase) {
      case "requested":
      case "offering":
      case "answering":
        return this.since + this.upgradeTimeout;
      case "open": {
        const third = this.dcTimeout / 3;
        return Math.min(this.lastRx + this.dcTimeout, Math.max(this.lastRx, this.lastPing) + third);
      }
      case "idle":
        return this.noRetry ? null : this.retryAt;
    }
  }
}
