import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Interop, jsPeer, until, pattern, sha256, rawSend } from "../harness.mjs";
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

test("events both ways, with sender and transport", async () => {
  const rid = await it.rustPeer("r1", { rooms: ["both"] });
  const js = peer(it.url, { rooms: ["both"] });
  const me = await js.ready;
  assert.ok(me.id);
  assert.deepEqual(js.peers().map((p) => p.id), [rid]);
  js.emit("hi", { x: 1, s: "é" });
  const got = await it.waitLine((l) => l.ev === "event" && l.peer === "r1" && l.name === "hi");
  assert.equal(got.from, me.id);
  assert.deepEqual(got.data, { json: { x: 1, s: "é" } });
  const seen = new Promise((r) => js.on("hi", (data, meta) => r({ data, meta })));
  await it.cmd({ cmd: "emit", peer: "r1", to: me.id, event: "hi", data: [1, "two", null] });
  const { data, meta } = await seen;
  assert.deepEqual(data, [1, "two", null]);
  assert.equal(meta.from, rid);
  assert.equal(meta.transport, "relay");
  assert.equal(meta.event, "hi");
  // Volatile: best effort, but on an idle loopback it arrives.
  js.volatile.to(rid).emit("msg", { v: true });
  const vol = await it.waitLine((l) => l.ev === "event" && l.peer === "r1" && l.name === "msg");
  assert.deepEqual([vol.from, vol.data, vol.wants_reply], [me.id, { json: { v: true } }, false]);
});

test("10,000 numbered events each way, complete and in order", async () => {
  const rid = await it.rustPeer("r10k", { rooms: ["tenk"] });
  const js = peer(it.url, { rooms: ["tenk"] });
  const me = await js.ready;
  await it.rustSees("r10k", [me.id]);
  const N = 10_000;
  const got = [];
  js.on("num", (n) => got.push(n));
  const t0 = Date.now();
  for (let i = 0; i < N; i++) js.to(rid).emit("num", i);
  const rustDone = it.cmd({ cmd: "emit_n", peer: "r10k", to: me.id, event: "num", n: N }, 120_000);
  await until(() => it.events("r10k", "num").length >= N, 120_000, "rust to get 10k events");
  await rustDone;
  await until(() => got.length >= N, 120_000, "js to get 10k events");
  const ms = Date.now() - t0;
  const rs = it.events("r10k", "num").map((l) => l.data.json);
  assert.deepEqual(rs, [...Array(N).keys()]);
  assert.deepEqual(got, [...Array(N).keys()]);
  console.log(`# 2 x ${N} events in ${ms} ms`);
});

test("targeted send reaches only its target", async () => {
  const rid = await it.rustPeer("rt", { rooms: ["target"] });
  const a = peer(it.url, { rooms: ["target"] });
  const b = peer(it.url, { rooms: ["target"] });
  const [ia, ib] = [await a.ready, await b.ready];
  await until(() => a.peers().length === 2 && b.peers().length === 2, 5000, "peers");
  await it.rustSees("rt", [ia.id, ib.id]);
  const gotA = [], gotB = [];
  a.on("msg", (d, m) => gotA.push([d, m.from]));
  b.on("msg", (d, m) => gotB.push([d, m.from]));
  await it.cmd({ cmd: "emit", peer: "rt", to: ia.id, event: "msg", data: "for a" });
  a.to(ib.id).emit("msg", "a to b");
  a.to(rid).emit("msg", "a to rust");
  await until(() => gotA.length === 1 && gotB.length === 1 && it.events("rt", "msg").length === 1, 5000, "messages");
  // One more round trip through each path, so that a stray message would have arrived.
  assert.equal(await a.to(rid).emitWithAck("echo", 1), 1);
  assert.equal(await b.to(rid).emitWithAck("echo", 2), 2);
  assert.deepEqual(gotA, [["for a", rid]]);
  assert.deepEqual(gotB, [["a to b", ia.id]]);
  assert.equal(it.events("rt", "msg")[0].from, ia.id);
  assert.deepEqual(it.events("rt", "msg")[0].data, { json: "a to rust" });
});

test("acks both ways: reply values, errors, NoHandler, timeouts", async () => {
  const rid = await it.rustPeer("ra", { rooms: ["acks"] });
  const js = peer(it.url, { rooms: ["acks"], ackTimeout: 5000 });
  const me = await js.ready;
  await it.rustSees("ra", [me.id]);
  // JS asks Rust.
  assert.deepEqual(await js.to(rid).emitWithAck("echo", { a: [1, 2] }), { a: [1, 2] });
  assert.equal(await js.to(rid).emitWithAck("add", [2, 3]), 5);
  await assert.rejects(js.to(rid).emitWithAck("fail", null), (e) => e instanceof P2PError && e.code === "Nope");
  await assert.rejects(js.to(rid).emitWithAck("nobody", 1), (e) => e.code === "NoHandler");
  await assert.rejects(js.timeout(200).to(rid).emitWithAck("hold", 1), (e) => e.code === "Timeout");
  await assert.rejects(js.to(rid).emitWithAck("silent", 1), (e) => e.code === "NoReply");
  const viaCallback = await new Promise((r) => js.to(rid).emit("echo", "cb", (err, reply) => r([err, reply])));
  assert.deepEqual(viaCallback, [null, "cb"]);
  assert.deepEqual(await js.emitWithAck("echo", 7), [7]);
  // Rust asks JS.
  js.on("echo", (data, meta, reply) => reply(data));
  js.on("add", (nums, meta, reply) => reply(nums.reduce((a, b) => a + b, 0)));
  js.on("fail", (data, meta, reply) => reply.error("Nope", "no way"));
  js.on("silent", () => {});
  let r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "echo", data: { deep: { x: [true] } } });
  assert.deepEqual(r.ok, { json: { deep: { x: [true] } } });
  r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "add", data: [4, 5, 6] });
  assert.deepEqual(r.ok, { json: 15 });
  r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "fail", data: 1 });
  assert.equal(r.code, "Nope");
  r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "nobody", data: 1 });
  assert.equal(r.code, "NoHandler");
  r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "silent", data: 1, timeout_ms: 200 });
  assert.equal(r.code, "Timeout");
  r = await it.cmd({ cmd: "ack", peer: "ra", to: me.id, event: "echo", bin: 40000 });
  assert.deepEqual(r.ok, { bin: 40000, sha256: sha256(pattern(40000)) });
});

test("1 MiB binary each way, byte-exact", async () => {
  const rid = await it.rustPeer("rb", { rooms: ["bin"] });
  const js = peer(it.url, { rooms: ["bin"] });
  const me = await js.ready;
  await it.rustSees("rb", [me.id]);
  const MiB = 1 << 20;
  const data = pattern(MiB);
  js.to(rid).emit("bin", data.buffer);
  const got = await it.waitLine((l) => l.ev === "event" && l.peer === "rb" && l.name === "bin", 30_000);
  assert.deepEqual(got.data, { bin: MiB, sha256: sha256(data) });
  // Typed-array views send only their bytes.
  js.to(rid).emit("bin", new Uint16Array(data.buffer, 2, 8));
  await until(() => it.events("rb", "bin").length === 2);
  assert.deepEqual(it.events("rb", "bin")[1].data, { bin: 16, sha256: sha256(data.subarray(2, 18)) });
  // Blobs too, in order with the rest.
  js.to(rid).emit("bin", new Blob([data.subarray(0, 1000)]));
  js.to(rid).emit("bin", data.subarray(0, 3));
  await until(() => it.events("rb", "bin").length === 4);
  assert.deepEqual(it.events("rb", "bin").slice(2).map((l) => l.data.bin), [1000, 3]);
  const seen = new Promise((r) => js.on("bin", (b, meta) => r([b, meta])));
  await it.cmd({ cmd: "emit_bin", peer: "rb", to: me.id, event: "bin", len: MiB });
  const [bytes, meta] = await seen;
  assert.ok(bytes instanceof Uint8Array);
  assert.equal(bytes.length, MiB);
  assert.equal(sha256(bytes), sha256(data));
  assert.equal(meta.from, rid);
});

test("pairing by uid: JS asks for a Rust uid", async () => {
  const rid = await it.rustPeer("rpair1", { uid: "rust-pair-1" });
  const js = peer(it.url, { peerUid: "rust-pair-1" });
  const info = await js.ready;
  assert.equal(info.pair.id, rid);
  assert.equal(info.pair.uid, "rust-pair-1");
  assert.equal(await js.to(rid).emitWithAck("echo", "paired"), "paired");
});

test("pairing by uid: Rust asks for a JS uid", async () => {
  const js = peer(it.url, { uid: "js-pair-2" });
  const me = await js.ready;
  assert.equal(me.uid, "js-pair-2");
  const paired = new Promise((r) => js.on("peer-paired", (p) => r(p)));
  const rid = await it.rustPeer("rpair2", { peer_uid: "js-pair-2" });
  assert.equal((await paired).peer.id, rid);
  const got = new Promise((r) => js.on("hi", (d, m) => r(m.from)));
  await it.cmd({ cmd: "emit", peer: "rpair2", to: me.id, event: "hi", data: 1 });
  assert.equal(await got, rid);
});

test("pairing errors: PeerOffline, UidTaken", async () => {
  await assert.rejects(peer(it.url, { peerUid: "nobody-here", pairTimeout: 300 }).ready, (e) => e instanceof P2PError && e.code === "PeerOffline");
  await it.rustPeer("ruid", { uid: "taken-uid" });
  await assert.rejects(peer(it.url, { uid: "taken-uid" }).ready, (e) => e.code === "UidTaken");
});

test("presence: joined, left, disconnected; rooms and peers", async () => {
  const js = peer(it.url, { rooms: ["pres"] });
  const me = await js.ready;
  const log = [];
  for (const ev of ["peer-joined", "peer-left", "peer-disconnected"]) js.on(ev, (p) => log.push([ev, p.peer.id, p.room]));
  const rid = await it.rustPeer("rp", { rooms: ["pres"] });
  await until(() => log.length === 1);
  assert.deepEqual(log[0], ["peer-joined", rid, "pres"]);
  assert.deepEqual(js.peers(), [{ id: rid }]);
  assert.deepEqual(await js.roomPeers("pres"), [{ id: rid }]);
  await it.cmd({ cmd: "join", peer: "rp", room: "pres2" });
  assert.deepEqual(await js.join("pres2"), [{ id: rid }]);
  // The Rust peer sees the JS peer leave and join again.
  await js.leave("pres2");
  await it.waitLine((l) => l.ev === "presence" && l.peer === "rp" && l.type === "left" && l.who.id === me.id && l.room === "pres2");
  await assert.rejects(js.roomPeers("pres2"), (e) => e.code === "UnknownRoom");
  await js.join("pres2");
  await it.waitLine((l) => l.ev === "presence" && l.peer === "rp" && l.type === "joined" && l.who.id === me.id && l.room === "pres2");
  await it.cmd({ cmd: "leave", peer: "rp", room: "pres2" });
  await until(() => log.length === 2);
  assert.deepEqual(log[1], ["peer-left", rid, "pres2"]);
  assert.deepEqual(js.peers(), [{ id: rid }]);
  await it.cmd({ cmd: "close", peer: "rp" });
  await until(() => log.length === 3);
  assert.deepEqual(log[2], ["peer-disconnected", rid, undefined]);
  assert.deepEqual(js.peers(), []);
});

test("bad input from JS: typed errors, and the Rust peer carries on", async () => {
  const rid = await it.rustPeer("rbad", { rooms: ["bad"] });
  const js = peer(it.url, { rooms: ["bad"] });
  const me = await js.ready;
  const errors = [];
  js.on("server-error", (e) => errors.push(e));
  const raw = js.socket;
  raw.emit("p2p:f", 42);
  raw.emit("p2p:f", new Uint8Array([1, 2, 3]), new Uint8Array([4]));
  raw.emit("p2p:f", new Uint8Array([0x05, 0x01])); // truncated batch
  raw.emit("chat", "hello");
  await until(() => errors.length >= 4, 5000, "errors");
  assert.ok(errors.every((e) => e instanceof P2PError));
  assert.deepEqual(errors.map((e) => e.code), ["BadRequest", "BadRequest", "BadRequest", "UnknownEvent"]);
  // A wrong-typed request gets its BadRequest in p2p:res.
  const res = new Promise((r) => raw.once("p2p:res", r));
  raw.emit("p2p:req", { rid: 99999, op: "join", room: 5 });
  assert.equal((await res).error.code, "BadRequest");
  // Oversized frame: PayloadTooLarge.
  const { encodeFrame, utf8 } = await import("../../dist/core.js");
  const big = encodeFrame({ to: rid, from: "", body: { kind: "volatile", msg: { type: "event", event: "big", ackId: 0, payload: { binary: true, data: new Uint8Array(300 * 1024) } } } });
  rawSend(raw, big);
  await until(() => errors.length >= 5, 5000, "PayloadTooLarge");
  assert.equal(errors[4].code, "PayloadTooLarge");
  // Forged `from`: the server stamps the real sender.
  const forged = encodeFrame({ to: rid, from: "somebody-else", body: { kind: "volatile", msg: { type: "event", event: "msg", ackId: 0, payload: { binary: false, data: utf8('"forged"') } } } });
  rawSend(raw, forged);
  const got = await it.waitLine((l) => l.ev === "event" && l.peer === "rbad" && l.name === "msg");
  assert.equal(got.from, me.id);
  // A frame to nobody: UnknownPeer.
  js.to(rid); // (valid target API)
  const ghost = encodeFrame({ to: "ghost", from: "", body: { kind: "ping", nonce: 3n, pong: false } });
  rawSend(raw, ghost);
  await until(() => errors.some((e) => e.code === "UnknownPeer"), 5000, "UnknownPeer");
  assert.equal(errors.find((e) => e.code === "UnknownPeer").details.to, "ghost");
  // Local checks throw typed errors before anything is sent.
  assert.throws(() => js.to("ghost").emit("x", 1), (e) => e.code === "PeerOffline");
  assert.throws(() => js.volatile.to(rid).emit("x", new Uint8Array(20000)), (e) => e.code === "PayloadTooLarge");
  assert.throws(() => js.to(rid).emit("x", 1n), (e) => e.code === "BadPayload");
  // The Rust peer is unaffected.
  assert.equal(await js.to(rid).emitWithAck("echo", "still here"), "still here");
  const r = await it.cmd({ cmd: "ack", peer: "rbad", to: me.id, event: "nobody" });
  assert.equal(r.code, "NoHandler");
});

test("a broken connection resumes: same id, links carry on, nothing lost either way", async () => {
  const rid = await it.rustPeer("rres", { rooms: ["resume"] });
  const js = peer(it.url, { rooms: ["resume"] });
  const me = await js.ready;
  await it.rustSees("rres", [me.id]);
  const got = [];
  js.on("num", (n) => got.push(n));
  const reconnected = new Promise((r) => js.once("reconnected", r));
  for (let i = 0; i < 100; i++) js.to(rid).emit("num", i);
  await new Promise((r) => setImmediate(r)); // the first 100 are on the wire
  js.socket.io.engine.close(); // as if the network dropped: socket.io-client reconnects
  for (let i = 100; i < 200; i++) js.to(rid).emit("num", i);
  const sent = it.cmd({ cmd: "emit_n", peer: "rres", to: me.id, event: "num", n: 200 });
  assert.deepEqual(await reconnected, { continued: true });
  assert.equal(js.id, me.id);
  await sent;
  await until(() => got.length >= 200 && it.events("rres", "num").length >= 200, 20_000, "200 events each way");
  assert.deepEqual(got, [...Array(200).keys()]);
  assert.deepEqual(it.events("rres", "num").map((l) => l.data.json), [...Array(200).keys()]);
  assert.equal(await js.to(rid).emitWithAck("echo", "after"), "after");
});

test("the server's auth hook: Rejected with its reason; the right token gets in", async () => {
  const guarded = await Interop.start(["--auth-token", "secret"]);
  try {
    const bad = jsPeer(guarded.url, { rooms: ["auth"] }, { auth: { token: "nope" } });
    closers.push(bad);
    await assert.rejects(bad.ready, (e) => e instanceof P2PError && e.code === "Rejected" && /bad token/.test(e.message));
    const rid = await guarded.rustPeer("rauth", { rooms: ["auth"], auth: { token: "secret" } });
    const good = jsPeer(guarded.url, { rooms: ["auth"] }, { auth: { token: "secret" } });
    closers.push(good);
    await good.ready;
    assert.equal(await good.to(rid).emitWithAck("echo", "in"), "in");
  } finally {
    await guarded.stop();
  }
});

test("Busy from a full server buffer: the link goes back and everything arrives in order", async () => {
  const tight = await Interop.start(["--buffer", "4"]);
  try {
    const rid = await tight.rustPeer("rbusy", { rooms: ["busy"] });
    const js = jsPeer(tight.url, { rooms: ["busy"] });
    closers.push(js);
    await js.ready;
    let busy = 0;
    js.socket.on("p2p:error", (e) => { if (e.code === "Busy") busy++; });
    const N = 3000;
    const blob = pattern(256 * 1024);
    for (let i = 0; i < N; i++) {
      js.to(rid).emit("num", i);
      if (i % 1000 === 0) js.to(rid).emit("bin", blob);
    }
    await until(() => tight.events("rbusy", "num").length >= N && tight.events("rbusy", "bin").length >= 3, 60_000, "all events");
    assert.deepEqual(tight.events("rbusy", "num").map((l) => l.data.json), [...Array(N).keys()]);
    assert.ok(tight.events("rbusy", "bin").every((l) => l.data.sha256 === sha256(blob)));
    console.log(`# ${busy} Busy errors on the way`);
  } finally {
    await tight.stop();
  }
});

test("back after the grace period: not continued, peers met anew, fresh links", async () => {
  const rid = await it.rustPeer("rgrace", { rooms: ["grace"] });
  const js = peer(it.url, { rooms: ["grace"] }, { reconnectionDelay: 6500, reconnectionDelayMax: 6500, randomizationFactor: 0 });
  const me = await js.ready;
  await it.rustSees("rgrace", [me.id]);
  assert.equal(await js.to(rid).emitWithAck("echo", 1), 1);
  const got = [];
  js.on("num", (n) => got.push(n));
  const reconnected = new Promise((r) => js.once("reconnected", r));
  js.socket.io.engine.close();
  await it.waitLine((l) => l.ev === "presence" && l.peer === "rgrace" && l.type === "disconnected" && l.who.id === me.id, 10_000);
  assert.deepEqual(await reconnected, { continued: false });
  await it.waitLine((l) => l.ev === "presence" && l.peer === "rgrace" && l.type === "joined" && l.who.id === js.id);
  assert.deepEqual(js.peers().map((p) => p.id), [rid]);
  await it.cmd({ cmd: "emit_n", peer: "rgrace", to: js.id, event: "num", n: 50 });
  await until(() => got.length === 50);
  assert.deepEqual(got, [...Array(50).keys()]);
  assert.equal(await js.to(rid).emitWithAck("echo", "anew"), "anew");
});

test("a message over maxMessageSize is refused with PayloadTooLarge, both ways", async () => {
  const rid = await it.rustPeer("rmax", { rooms: ["max"] });
  const js = peer(it.url, { rooms: ["max"], maxMessageSize: 100_000 });
  const me = await js.ready;
  await it.rustSees("rmax", [me.id]);
  js.on("echo", (d, m, reply) => reply(d));
  const r = await it.cmd({ cmd: "ack", peer: "rmax", to: me.id, event: "echo", bin: 200_000 });
  assert.equal(r.code, "PayloadTooLarge");
  assert.throws(() => js.to(rid).emit("bin", new Uint8Array(100_001)), (e) => e.code === "PayloadTooLarge");
  assert.equal((await it.cmd({ cmd: "ack", peer: "rmax", to: me.id, event: "echo", bin: 100_000 })).ok.bin, 100_000);
});

test("leaving the only shared room forgets the peer; meeting again starts fresh links", async () => {
  const rid = await it.rustPeer("rleave", { rooms: ["only"] });
  const js = peer(it.url, { rooms: ["mine"] });
  const me = await js.ready;
  const got = [];
  js.on("num", (n) => got.push(n));
  let mark = -1; // presence lines before this index belong to earlier rounds
  for (let round = 0; round < 3; round++) {
    await js.join("only");
    assert.deepEqual(js.peers().map((p) => p.id), [rid]);
    await it.waitLine((l) => l.ev === "presence" && l.peer === "rleave" && l.type === "joined" && l.who.id === me.id && it.lines.indexOf(l) > mark);
    for (let i = 0; i < 20; i++) js.to(rid).emit("num", round * 100 + i);
    await it.cmd({ cmd: "emit_n", peer: "rleave", to: me.id, event: "num", n: 20 });
    await until(() => got.length === (round + 1) * 20 && it.events("rleave", "num").length === (round + 1) * 20, 10_000, `round ${round}`);
    assert.equal(await js.to(rid).emitWithAck("echo", round), round);
    mark = it.lines.length - 1;
    await js.leave("only");
    assert.deepEqual(js.peers(), []);
    await it.waitLine((l) => l.ev === "presence" && l.peer === "rleave" && l.type === "left" && l.who.id === me.id && it.lines.indexOf(l) > mark);
  }
  assert.deepEqual(got, [0, 1, 2].flatMap(() => [...Array(20).keys()]));
  assert.deepEqual(it.events("rleave", "num").map((l) => l.data.json), [0, 1, 2].flatMap((r) => [...Array(20).keys()].map((i) => r * 100 + i)));
});

test("from(id).on, once, off, onAny, offAny", async () => {
  const rid = await it.rustPeer("rh", { rooms: ["handlers"] });
  const a = peer(it.url, { rooms: ["handlers"] });
  const b = peer(it.url, { rooms: ["handlers"] });
  const [ia, ib] = [await a.ready, await b.ready];
  await until(() => a.peers().length === 2);
  await it.rustSees("rh", [ia.id, ib.id]);
  const log = [];
  a.from(rid).on("msg", (d) => log.push(["from rust", d]));
  a.from(ib.id).on("msg", (d) => log.push(["from b", d]));
  a.once("msg", (d) => log.push(["once", d]));
  const any = (ev, d, m) => log.push(["any", ev, d, m.from === rid ? "rust" : "b"]);
  a.onAny(any);
  await it.cmd({ cmd: "emit", peer: "rh", to: ia.id, event: "msg", data: 1 });
  await until(() => log.length === 3);
  b.to(ia.id).emit("msg", 2);
  await until(() => log.length === 5);
  assert.deepEqual(log, [["from rust", 1], ["once", 1], ["any", "msg", 1, "rust"], ["from b", 2], ["any", "msg", 2, "b"]]);
  a.offAny(any);
  a.from(ib.id).off("msg");
  b.to(ia.id).emit("msg", 3);
  await it.cmd({ cmd: "emit", peer: "rh", to: ia.id, event: "msg", data: 4 });
  await until(() => log.length === 6);
  // A round trip from b too, so that a stray "from b" handler would have fired by now.
  assert.equal(await b.to(rid).emitWithAck("echo", 0), 0);
  assert.deepEqual(log.slice(5), [["from rust", 4]]);
  a.off("msg"); // leaves the from(..) handlers
  await it.cmd({ cmd: "emit", peer: "rh", to: ia.id, event: "msg", data: 5 });
  await until(() => log.length === 7);
  assert.deepEqual(log[6], ["from rust", 5]);
});

test("a Welcome capped at 2 members: the rest comes in pages, joins and leaves meanwhile count", async () => {
  const small = await Interop.start(["--welcome-members", "2"]);
  const crowd = [];
  try {
    for (let i = 0; i < 7; i++) {
      const p = jsPeer(small.url, { rooms: ["paged"], autoUpgrade: false });
      crowd.push(p);
      await p.ready;
    }
    const rid = await small.rustPeer("rp", { rooms: ["paged"] });
    const ids = new Map();
    for (const p of crowd) ids.set(p, (await p.ready).id);
    const want = new Set([...ids.values(), rid]);
    const js = jsPeer(small.url, { rooms: ["paged"], autoUpgrade: false });
    crowd.push(js);
    await js.ready;
    // One leaves and one joins while the pages are on their way.
    const gone = crowd.shift();
    want.delete(ids.get(gone));
    gone.close();
    const late = jsPeer(small.url, { rooms: ["paged"], autoUpgrade: false });
    crowd.push(late);
    want.add((await late.ready).id);
    await until(() => js.peers().length === want.size && js.peers().every((p) => want.has(p.id)), 10_000, "a complete view").catch((e) => {
      const have = new Set(js.peers().map((p) => p.id));
      const missing = [...want].filter((id) => !have.has(id));
      const extra = [...have].filter((id) => !want.has(id));
      throw new Error(`${e.message}: missing ${missing.join(",")}; extra ${extra.join(",")}`);
    });
    assert.deepEqual(new Set(js.peers().map((p) => p.id)), want);
    // The Rust peer, which joined a room of 7 (5 beyond its Welcome), paged too.
    const everyone = new Set([...want, (await js.ready).id]);
    everyone.delete(rid);
    const end = Date.now() + 10_000;
    let r = await small.cmd({ cmd: "peers", peer: "rp" });
    while (r.peers?.length !== everyone.size && Date.now() < end) {
      await new Promise((ok) => setTimeout(ok, 20));
      r = await small.cmd({ cmd: "peers", peer: "rp" });
    }
    assert.deepEqual(new Set((r.peers ?? []).map((p) => p.id)), everyone);
  } finally {
    for (const p of crowd) p.close();
    await small.stop();
  }
});
