/**
 * One WebRTC connection to one peer: a thin wrapper over an `RTCPeerConnection` and its two
 * data channels (`p2p` reliable ordered, `p2p-volatile` unordered without retransmits). It
 * performs what the negotiation decided and reports back; it decides nothing itself.
 * Remote candidates are buffered until the remote description is set; local candidates
 * until our offer or answer is out.
 */
import type { Signal } from "./negotiate.js";

/** The parts of the WebRTC API we use (the browser's, or a Node.js implementation's). */
export type RTCPeerConnectionCtor = new (config?: any) => any;

/**
 * What we let wait in the reliable channel's send buffer. Acks and pings share the ordered
 * channel with the data: a deep buffer delays them behind megabytes of data, the peers'
 * retransmission timers fire and resend what is still queued. A shallow one keeps them
 * a few milliseconds behind, and the channel is woken below `BUFFER_LOW`.
 */
export const BUFFER_HIGH = 256 * 1024;
export const BUFFER_LOW = 64 * 1024;

export interface RtcHooks {
  signal(s: Signal): void;
  /** The reliable channel's send buffer went below `BUFFER_LOW`. */
  drained(): void;
  open(): void;
  closed(reason: string): void;
  message(bytes: Uint8Array): void;
}

export interface RtcConfig {
  impl: RTCPeerConnectionCtor;
  config: Record<string, unknown>;
  trickle: boolean;
}

const toBytes = (d: unknown): Uint8Array | null => {
  if (d instanceof ArrayBuffer) return new Uint8Array(d);
  if (ArrayBuffer.isView(d)) return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
  return null;
};

export class RtcConn {
  readonly pc: any;
  dc: any = null;
  dcv: any = null;
  private remoteSet = false;
  private pendingRemote: Signal[] = [];
  private localSent = false;
  private pendingLocal: Signal[] = [];
  private done = false;

  constructor(
    private readonly cfg: RtcConfig,
    private readonly hooks: RtcHooks,
  ) {
    this.pc = new cfg.impl(cfg.config);
    const pc = this.pc;
    pc.onicecandidate = (e: any) => {
      if (!this.cfg.trickle || this.done) return;
      const c = e?.candidate;
      if (!c || !c.candidate) return;
      const s: Signal = {
        type: "candidate",
        candidate: c.candidate,
        sdpMid: c.sdpMid ?? null,
        sdpMLineIndex: c.sdpMLineIndex ?? null,
        usernameFragment: c.usernameFragment ?? null,
      };
      if (this.localSent) this.hooks.signal(s);
      else this.pendingLocal.push(s);
    };
    const onState = () => {
      const st = pc.connectionState ?? pc.iceConnectionState;
      if (st === "failed") this.fail("ice failed");
      else if (st === "closed") this.fail("peer connection closed");
    };
    pc.onconnectionstatechange = onState;
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "failed") this.fail("ice failed");
    };
    pc.ondatachannel = (e: any) => this.take(e.channel);
  }

  private take(ch: any): void {
    if (ch.label === "p2p") this.dc = ch;
    else if (ch.label === "p2p-volatile") this.dcv = ch;
    else return;
    ch.binaryType = "arraybuffer";
    ch.onmessage = (e: any) => {
      if (this.done) return;
      const b = toBytes(e.data);
      if (b) this.hooks.message(b);
    };
    if (ch.label === "p2p") {
      ch.bufferedAmountLowThreshold = BUFFER_LOW;
      ch.onbufferedamountlow = () => !this.done && this.hooks.drained();
      ch.onopen = () => !this.done && this.hooks.open();
      ch.onclose = () => this.fail("data channel closed");
      ch.onerror = () => {};
      if (ch.readyState === "open") queueMicrotask(() => !this.done && this.hooks.open());
    }
  }

  private fail(reason: string): void {
    if (this.done) return;
    this.done = true;
    this.hooks.closed(reason);
  }

  private async gathered(): Promise<void> {
    if (this.cfg.trickle || this.pc.iceGatheringState === "complete") return;
    await new Promise<void>((resolve) => {
      const prev = this.pc.onicegatheringstatechange;
      this.pc.onicegatheringstatechange = (e: any) => {
        prev?.(e);
        if (this.pc.iceGatheringState === "complete") resolve();
      };
      const prevCand = this.pc.onicecandidate;
      this.pc.onicecandidate = (e: any) => {
        prevCand?.(e);
        if (!e?.candidate) resolve();
      };
    });
  }

  private sendLocal(s: Signal): void {
    this.hooks.signal(s);
    this.localSent = true;
    for (const c of this.pendingLocal) this.hooks.signal(c);
    this.pendingLocal = [];
  }

  private async remoteDone(): Promise<void> {
    this.remoteSet = true;
    const list = this.pendingRemote;
    this.pendingRemote = [];
    for (const c of list) await this.addCandidate(c);
  }

  private guard(p: Promise<void>): void {
    p.catch((e) => this.fail(`webrtc: ${e?.message ?? e}`));
  }

  offer(): void {
    this.take(this.pc.createDataChannel("p2p"));
    this.take(this.pc.createDataChannel("p2p-volatile", { ordered: false, maxRetransmits: 0 }));
    this.guard(
      (async () => {
        const o = await this.pc.createOffer();
        await this.pc.setLocalDescription(o);
        await this.gathered();
        if (this.done) return;
        this.sendLocal({ type: "offer", sdp: this.pc.localDescription.sdp });
      })(),
    );
  }

  answerTo(sdp: string): void {
    this.guard(
      (async () => {
        await this.pc.setRemoteDescription({ type: "offer", sdp });
        await this.remoteDone();
        const a = await this.pc.createAnswer();
        await this.pc.setLocalDescription(a);
        await this.gathered();
        if (this.done) return;
        this.sendLocal({ type: "answer", sdp: this.pc.localDescription.sdp });
      })(),
    );
  }

  acceptAnswer(sdp: string): void {
    this.guard(
      (async () => {
        await this.pc.setRemoteDescription({ type: "answer", sdp });
        await this.remoteDone();
      })(),
    );
  }

  candidate(s: Signal): void {
    if (!this.remoteSet) this.pendingRemote.push(s);
    else this.guard(this.addCandidate(s));
  }

  private async addCandidate(s: Signal): Promise<void> {
    if (s.type !== "candidate" || this.done) return;
    const init: Record<string, unknown> = { candidate: s.candidate };
    if (s.sdpMid != null) init.sdpMid = s.sdpMid;
    if (s.sdpMLineIndex != null) init.sdpMLineIndex = s.sdpMLineIndex;
    if (s.usernameFragment != null) init.usernameFragment = s.usernameFragment;
    if (init.sdpMid === undefined && init.sdpMLineIndex === undefined) init.sdpMLineIndex = 0;
    await this.pc.addIceCandidate(init);
  }

  /** The reliable channel is open. */
  get isOpen(): boolean {
    return !this.done && this.dc?.readyState === "open";
  }

  /** Bytes the reliable channel takes before its buffer is full (`BUFFER_HIGH`). */
  get room(): number {
    if (!this.isOpen) return 0;
    return BUFFER_HIGH - (this.dc.bufferedAmount ?? 0);
  }

  get volatileOpen(): boolean {
    return !this.done && this.dcv?.readyState === "open";
  }

  send(frame: Uint8Array, volatile: boolean): boolean {
    const ch = volatile && this.volatileOpen ? this.dcv : this.dc;
    if (this.done || ch?.readyState !== "open") return false;
    try {
      ch.send(frame);
      return true;
    } catch {
      return false;
    }
  }

  /** Closes everything without reporting (the caller already knows). */
  close(): void {
    this.done = true;
    for (const ch of [this.dc, this.dcv]) {
      try {
        ch?.close();
      } catch {
        /* already closed */
      }
    }
    try {
      this.pc.close();
    } catch {
      /* already closed */
    }
  }
}
