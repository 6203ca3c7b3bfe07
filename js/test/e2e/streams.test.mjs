import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Interop, jsPeer, until, pattern, sha256 } from "../harness.mjs";
import { P2PError } from "../../dist/index.js";

let it;
const closers = [];
const peer = (...a) => {
  const p = jsPeer(...a);
  closers.push(p);
  return p;
};

before(async () => {
  it = await Interop.start();
});

after(async () => {
  for (const p of closers) p.close();
  await it?.stop();
});

/** Writes `len` pattern bytes in 64 KiB chunks, calling `progress(written)` after each. */
async function writeAll(writable, len, progress = () => {}) {
  const data = pattern(len);
  const w = writable.getWriter();
  for (let off = 0; off < len; off += 65536) {
    await w.write(data.subarray(off, Math.min(off + 65536, len)));
    await progress(off + 65536);
  }
  await w.close();
}

async function readAll(readable) {
  const h = createHash("sha256");
  let n = 0;
  for await (const chunk of readable) {
    h.update(chunk);
    n += chunk.length;
  }
  return { n, sha: h.digest("hex") };
}

const MiB16 = 16 << 20;
const expected = sha256(pattern(MiB16));

test("a stream of 16 MiB each way, JS opens, SHA-256 checked", async () => {
  const rid = await it.rustPeer("rs1", { rooms: ["streams1"] });
  const js = peer(it.url, { rooms: ["streams1"] });
  await js.ready;
  const t0 = Date.now();
  const s = await js.openStream(rid, `bytes:${MiB16}`);
  assert.equal(s.peer, rid);
  const [, got] = await Promise.all([writeAll(s.writable, MiB16), readAll(s.readable)]);
  assert.deepEqual(got, { n: MiB16, sha: expected });
  const r = await it.waitLine((l) => l.ev === "stream" && l.peer === "rs1", 60_000);
  assert.equal(r.read, MiB16);
  assert.equal(r.sha256, expected);
  assert.equal(r.error, null);
  console.log(`# 2 x 16 MiB stream in ${Date.now() - t0} ms`);
});

test("a stream of 16 MiB each way, Rust opens; refusal", async () => {
  await it.rustPeer("rs2", { rooms: ["streams2"] });
  const js = peer(it.url, { rooms: ["streams2"] });
  const me = await js.ready;
  await it.rustSees("rs2", [me.id]);
  const done = [];
  js.onStream((incoming) => {
    if (incoming.name === "no-thanks") return incoming.refuse("not today");
    const s = incoming.accept();
    done.push(Promise.all([writeAll(s.writable, MiB16), readAll(s.readable)]).then(([, r]) => r));
  });
  const r = await it.cmd({ cmd: "stream", peer: "rs2", to: me.id, name: "upload", len: MiB16 }, 120_000);
  assert.equal(r.ev, "done");
  assert.equal(r.read, MiB16);
  assert.equal(r.sha256, expected);
  assert.deepEqual(await done[0], { n: MiB16, sha: expected });
  const refused = await it.cmd({ cmd: "stream", peer: "rs2", to: me.id, name: "no-thanks", len: 1 });
  assert.equal(refused.ev, "error");
  assert.equal(refused.code, "Refused");
});

test("a slow reader slows the writer (credit flow control)", async () => {
  const rid = await it.rustPeer("rs3", { rooms: ["streams3"] });
  const js = peer(it.url, { rooms: ["streams3"], streamWindow: 64 * 1024 });
  await js.ready;
  // The Rust side writes 4 MiB back; we read nothing for a while.
  const s = await js.openStream(rid, `bytes:${4 << 20}`);
  const w = s.writable.getWriter();
  await w.close();
  const reader = s.readable.getReader();
  const first = await reader.read();
  assert.ok(first.value.length > 0);
  // Nothing more than the granted window can be buffered on our side.
  await new Promise((r) => setTimeout(r, 300));
  const state = js["streams"]["table"];
  const buffered = [...state.values()].reduce((a, st) => a + st.chunks.reduce((x, c) => x + c.length, 0), 0);
  assert.ok(buffered <= 64 * 1024, `buffered ${buffered}`);
  let n = first.value.length;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    n += value.length;
  }
  assert.equal(n, 4 << 20);
  await it.waitLine((l) => l.ev === "stream" && l.peer === "rs3");
});

test("refused stream from JS is a typed error", async () => {
  const rid = await it.rustPeer("rs4", { rooms: ["streams4"] });
  const js = peer(it.url, { rooms: ["streams4"] });
  await js.ready;
  await assert.rejects(js.openStream(rid, "refuse-me"), (e) => e instanceof P2PError && e.code === "Refused");
});

test("services each way and a topic", async () => {
  const rid = await it.rustPeer("rsv", { rooms: ["svc"] });
  const js = peer(it.url, { rooms: ["svc"] });
  const me = await js.ready;
  // Rust provides, JS calls.
  assert.equal((await it.cmd({ cmd: "provide", peer: "rsv", service: "rcalc" })).ev, "done");
  assert.equal(await js.service("rcalc").call("add", [2, 3]), 5);
  await assert.rejects(js.service("rcalc").call("fail", null), (e) => e.code === "Nope");
  await assert.rejects(js.service("nothing").call("add", [1, 2]), (e) => e.code === "NoSuchService");
  // JS provides, Rust calls.
  await js.provide("jscalc", {
    add: ([a, b], { from }) => (from.id === rid ? a + b : -1),
    slow: async (x) => {
      await new Promise((r) => setTimeout(r, 20));
      return { x };
    },
  });
  await assert.rejects(js.provide("rcalc", {}), (e) => e.code === "ServiceTaken");
  let r = await it.cmd({ cmd: "call", peer: "rsv", service: "jscalc", method: "add", args: [20, 22] });
  assert.deepEqual(r.ok, 42);
  r = await it.cmd({ cmd: "call", peer: "rsv", service: "jscalc", method: "slow", args: "s" });
  assert.deepEqual(r.ok, { x: "s" });
  r = await it.cmd({ cmd: "call", peer: "rsv", service: "jscalc", method: "nope", args: 1 });
  assert.equal(r.code, "UnknownMethod");
  // A topic: both subscribed, both publish.
  const sub = await js.subscribe("news");
  await it.cmd({ cmd: "subscribe", peer: "rsv", topic: "news" });
  assert.equal(await js.publish("news", { title: "from js" }), 2);
  const first = await sub.next();
  assert.deepEqual(first.value, { topic: "news", from: { id: me.id }, data: { title: "from js" } });
  await it.waitLine((l) => l.ev === "publication" && l.peer === "rsv" && l.data.title === "from js");
  await it.cmd({ cmd: "publish", peer: "rsv", topic: "news", data: { title: "from rust" } });
  const got = [];
  for await (const p of sub) {
    got.push(p);
    break;
  }
  assert.equal(got[0].from.id, rid);
  assert.deepEqual(got[0].data, { title: "from rust" });
  const n = await it.cmd({ cmd: "publish", peer: "rsv", topic: "news", data: 1 });
  assert.equal(n.reached, 1);
});

test("the server restarted mid-stream: the JS peers resume and nothing is lost", async () => {
  // Both ends are JS peers: a Rust peer sometimes comes back on two connections after a
  // restart (its second hello registers it as a new peer), which would end the stream.
  const own = await Interop.start();
  try {
    const a = jsPeer(own.url, { rooms: ["restart"] });
    const b = jsPeer(own.url, { rooms: ["restart"] });
    closers.push(a, b);
    const [ia, ib] = [await a.ready, await b.ready];
    await until(() => a.peers().length === 1 && b.peers().length === 1);
    const reconnected = Promise.all([a, b].map((p) => new Promise((r) => p.once("reconnected", r))));
    const events = [];
    b.on("num", (n) => events.push(n));
    b.onStream((incoming) => {
      const s = incoming.accept();
      b.result = Promise.all([writeAll(s.writable, MiB16), readAll(s.readable)]).then(([, r]) => r);
    });
    const s = await a.openStream(ib.id, "across a restart");
    const reading = readAll(s.readable);
    let n = 0;
    await writeAll(s.writable, MiB16, async (written) => {
      a.to(ib.id).emit("num", n++);
      if (written === 4 << 20) await own.cmd({ cmd: "restart", down_ms: 100 });
    });
    assert.deepEqual(await reading, { n: MiB16, sha: expected });
    assert.deepEqual(await b.result, { n: MiB16, sha: expected });
    assert.deepEqual(await reconnected, [{ continued: true }, { continued: true }]);
    assert.deepEqual([a.id, b.id], [ia.id, ib.id]);
    await until(() => events.length === n);
    assert.deepEqual(events, [...Array(n).keys()]);
  } finally {
    await own.stop();
  }
});
