// Test harness: starts the Rust interop program (server + Rust peers driven over stdin) and
// connects JS peers to it. Loopback only; every wait has a timeout.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { io } from "socket.io-client";
import { P2P } from "../dist/index.js";
import { encodeBatch } from "../dist/core.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "../..");
export const interopBin =
  process.env.INTEROP_BIN ?? path.join(process.env.CARGO_TARGET_DIR ?? path.join(repoRoot, "target"), "debug/examples/interop");

/** Byte `i` is `(i * 31 + 7) mod 256`, as in the interop program. */
export function pattern(len) {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + 7) & 255;
  return b;
}

export const sha256 = (b) => createHash("sha256").update(b).digest("hex");

/** Resolves when `pred()` is truthy, polling on every macrotask turn; rejects after `ms`. */
export function until(pred, ms = 10_000, what = "condition") {
  return new Promise((resolve, reject) => {
    const end = Date.now() + ms;
    const check = () => {
      let v;
      try {
        v = pred();
      } catch (e) {
        return reject(e);
      }
      if (v) return resolve(v);
      if (Date.now() > end) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(check, 5);
    };
    check();
  });
}

export class Interop {
  static async start(args = []) {
    const it = new Interop(args);
    const l = await it.waitLine((l) => l.ev === "listening" || l.ev === "spawn-error", 30_000, "the interop server");
    if (l.ev !== "listening") throw new Error(`cannot start ${interopBin}: ${it.lines.at(-1).message}`);
    it.url = l.url;
    it.port = l.port;
    return it;
  }

  constructor(args) {
    this.lines = [];
    this.nextId = 1;
    this.waiters = new Set();
    this.proc = spawn(interopBin, args, { stdio: ["pipe", "pipe", "inherit"] });
    this.exited = new Promise((r) => this.proc.on("exit", r));
    this.proc.on("error", (e) => {
      this.lines.push({ ev: "spawn-error", message: String(e) });
      for (const w of [...this.waiters]) w({ ev: "spawn-error" });
    });
    createInterface({ input: this.proc.stdout }).on("line", (text) => {
      let l;
      try {
        l = JSON.parse(text);
      } catch {
        return;
      }
      this.lines.push(l);
      for (const w of [...this.waiters]) w(l);
    });
  }

  /** Waits for a line (already seen or to come) matching `pred`. */
  waitLine(pred, ms = 10_000, what = "a line") {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = (l) => {
        if (!pred(l)) return;
        this.waiters.delete(w);
        clearTimeout(timer);
        resolve(l);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(new Error(`timed out waiting for ${what}`));
      }, ms);
      this.waiters.add(w);
    });
  }

  /** Sends a command and resolves with its answer (`done`, `ack`, `peer` or `error` with its id). */
  cmd(c, ms = 30_000) {
    const id = this.nextId++;
    this.proc.stdin.write(JSON.stringify({ ...c, id }) + "\n");
    return this.waitLine((l) => l.id === id && ["done", "ack", "peer", "error"].includes(l.ev), ms, `answer to ${c.cmd}`);
  }

  /** Starts a Rust peer; resolves with its peer id. */
  async rustPeer(name, opts = {}) {
    const r = await this.cmd({ cmd: "peer", name, ...opts });
    if (r.ev !== "peer") throw new Error(`rust peer ${name}: ${r.code} ${r.message}`);
    return r.peer_id;
  }

  /** Waits until the Rust peer `name` lists every id of `ids` among its peers. */
  async rustSees(name, ids, ms = 10_000) {
    const end = Date.now() + ms;
    for (;;) {
      const r = await this.cmd({ cmd: "peers", peer: name });
      if (ids.every((id) => r.peers?.some((p) => p.id === id))) return;
      if (Date.now() > end) throw new Error(`rust peer ${name} does not see ${ids.join(", ")}`);
      await new Promise((res) => setTimeout(res, 10));
    }
  }

  events(peer, name) {
    return this.lines.filter((l) => l.ev === "event" && l.peer === peer && (!name || l.name === name));
  }

  async stop() {
    if (this.proc.exitCode !== null) return;
    this.proc.stdin.end(JSON.stringify({ cmd: "exit" }) + "\n");
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await this.exited;
    clearTimeout(t);
  }
}

/** A JS peer on its own socket (websocket transport, quick reconnection). */
export function jsPeer(url, opts = {}, ioOpts = {}) {
  const socket = io(url, {
    transports: ["websocket"],
    forceNew: true,
    reconnectionDelay: 50,
    reconnectionDelayMax: 500,
    ...ioOpts,
  });
  return new P2P(socket, opts);
}

/** Sends one frame on the socket, alone in its batch. */
export function rawSend(socket, frame) {
  socket.emit("p2p:f", encodeBatch([frame]));
}
