// Golden vectors shared with the Rust codec (tests/tests/golden.rs): the Rust side writes
// fixtures/golden-rust.json, decoded and re-encoded here byte for byte; this side's vectors
// are in fixtures/golden-js.json (committed; rewritten with GOLDEN_WRITE=1), checked by Rust.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { encodeFrame, decodeFrame, encodeBatch, decodeBatch, toBase64, fromBase64, Session, Link, utf8 } from "../dist/core.js";

const fixture = (name) => fileURLToPath(new URL(`fixtures/${name}`, import.meta.url));
const hex = (b) => Buffer.from(b).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

/** A frame as JSON, in the shape golden.rs writes (bytes as hex, nonces as strings). */
function describe(f) {
  const payload = (p) => ({ binary: p.binary, hex: hex(p.data) });
  const msg = (m) => {
    switch (m.type) {
      case "event":
        return { type: "event", event: m.event, ackId: m.ackId, payload: payload(m.payload) };
      case "reply":
        return { type: "reply", ackId: m.ackId, payload: payload(m.payload) };
      case "replyError":
        return { type: "replyError", ackId: m.ackId, code: m.code, message: m.message };
      case "continuation":
        return { type: "continuation", hex: hex(m.data) };
      case "stream": {
        const { op, data, ...rest } = m.op;
        return { type: "stream", id: m.id, opener: m.opener, op: data ? { op, hex: hex(data) } : { op, ...rest } };
      }
    }
  };
  const b = f.body;
  const body =
    b.kind === "data" ? { kind: "data", seq: b.seq, more: b.more, msg: msg(b.msg) }
    : b.kind === "volatile" ? { kind: "volatile", msg: msg(b.msg) }
    : b.kind === "linkAck" ? { kind: "linkAck", upto: b.upto, nack: b.nack }
    : { kind: "ping", nonce: b.nonce.toString(), pong: b.pong };
  return { to: f.to, from: f.from, body };
}

const rust = JSON.parse(readFileSync(fixture("golden-rust.json"), "utf8"));

test("Rust frames decode to the same values and re-encode byte for byte", () => {
  assert.ok(rust.frames.length >= 20);
  for (const v of rust.frames) {
    const f = decodeFrame(unhex(v.hex));
    assert.deepEqual(describe(f), v.frame, v.name);
    assert.equal(hex(encodeFrame(f)), v.hex, v.name);
  }
});

test("Rust batches split into the same frames and re-encode byte for byte, binary and base64", () => {
  assert.ok(rust.batches.length >= 4);
  for (const b of rust.batches) {
    const frames = decodeBatch(unhex(b.hex));
    assert.deepEqual(frames.map(hex), b.frames.map((i) => rust.frames[i].hex));
    assert.equal(hex(encodeBatch(frames)), b.hex);
    assert.equal(toBase64(unhex(b.hex)), b.base64);
    assert.equal(hex(fromBase64(b.base64)), b.hex);
  }
});

test("Rust control messages: requests have the shape ours have, responses the fields we read", () => {
  const byName = Object.fromEntries(rust.control.map((c) => [c.name, c.json]));
  // Our hello after a reconnection (resume) is the Rust request plus the `frames` mode.
  const s = new Session({ uid: "alice", rooms: ["lobby"] });
  s.connected();
  s.response({ rid: 1, ok: byName["response welcome"].ok }, 0);
  const hello = s.connected();
  assert.deepEqual({ ...hello, rid: 1 }, byName["request hello with resume"]);
  s.response({ rid: hello.rid, ok: { ...byName["response welcome"].ok, continued: true } }, 0);
  const h = { resolve() {}, reject() {} };
  const shaped = (op, fields, rid) => ({ ...s.request(op, fields, 0, h), rid });
  assert.deepEqual(shaped("join", { room: "game" }, 2), byName["request join"]);
  assert.deepEqual(shaped("pair", { peer_uid: "bob", timeout_ms: 10000 }, 5), byName["request pair"]);
  assert.deepEqual(shaped("call", { service: "calc", method: "add", args: [2, 3], timeout_ms: 10000 }, 9), byName["request call"]);
  assert.deepEqual(
    shaped("call_result", { cid: 4, outcome: { error: { code: "UnknownMethod", message: "no" } } }, 10),
    byName["request call_result"],
  );
  const w = byName["response welcome"].ok;
  assert.deepEqual(Object.keys(w).sort(), ["continued", "id", "max_frame", "rooms", "token", "uid"]);
  assert.deepEqual(byName["response error"].error, { code: "PeerOffline", message: "no peer" });
  assert.deepEqual(byName["presence joined"], { type: "joined", room: "lobby", peer: { id: "A", uid: "alice" } });
  assert.deepEqual(byName["presence disconnected"], { type: "disconnected", peer: { id: "A" } });
  assert.deepEqual(byName["error busy"], { code: "Busy", message: "full", event: "p2p:f", to: "B", seq: 42 });
  assert.deepEqual(byName["publication"], { topic: "news", from: null, data: { title: "hi" } });
});

function jsVectors() {
  const frames = [];
  const add = (name, f) => frames.push({ name, hex: hex(encodeFrame(f)), frame: describe(f) });
  const awkward = new Uint8Array([0, 0x1d, 0x1e, 0x7f, 0x80, 0xff]);
  // What a link sends for a fragmented binary event with a reply wanted.
  const link = new Link("Rust-peer-id");
  const big = new Uint8Array(16384 + 6).map((_, i) => (i * 31 + 7) & 255);
  link.send({ type: "event", event: "file ✓", ackId: 3, payload: { binary: true, data: big } });
  link.send({ type: "reply", ackId: 1 << 20, payload: { binary: false, data: utf8('{"ok":[1,2]}') } });
  link.ping(0xfedcba9876543211n);
  link.ping(7n, true);
  link.poll(0).forEach((raw, i) => add(`link output ${i}`, decodeFrame(raw)));
  const d = (seq, msg, more = false) => ({ to: "R", from: "", body: { kind: "data", seq, more, msg } });
  add("event json", d(1, { type: "event", event: "hi", ackId: 0, payload: { binary: false, data: utf8('{"x":1}') } }));
  add("event empty payload", d(2, { type: "event", event: "", ackId: 0, payload: { binary: false, data: new Uint8Array(0) } }));
  add("reply binary", d(3, { type: "reply", ackId: 5, payload: { binary: true, data: awkward } }));
  add("reply error", d(4, { type: "replyError", ackId: 6, code: "NoHandler", message: 'no handler for "z" ✗' }));
  add("volatile", { to: "R", from: "", body: { kind: "volatile", msg: { type: "event", event: "pos", ackId: 0, payload: { binary: true, data: awkward } } } });
  add("link ack", { to: "R", from: "", body: { kind: "linkAck", upto: 2 ** 40 + 1, nack: false } });
  add("link nack", { to: "R", from: "", body: { kind: "linkAck", upto: 0, nack: true } });
  add("pong u64 max", { to: "R", from: "", body: { kind: "ping", nonce: (1n << 64n) - 1n, pong: true } });
  const ops = [
    { op: "open", name: "bytes:16" }, { op: "accept" }, { op: "refuse", code: "Busy", message: "64 waiting" },
    { op: "data", data: awkward }, { op: "credit", bytes: 262144 }, { op: "fin" }, { op: "reset", code: "FlowControl", message: "" },
  ];
  ops.forEach((op, i) => add(`stream ${op.op}`, d(10 + i, { type: "stream", id: 1 + i * 100, opener: i % 2 === 0, op })));
  const s = new Session({ uid: "js", rooms: ["lobby", "game"] });
  const requests = [{ name: "hello", json: s.connected() }];
  s.response({ rid: 1, ok: { id: "J1", rooms: [], max_frame: 262144, token: "t.1", continued: false } }, 0);
  requests.push({ name: "hello with resume", json: s.connected() });
  s.response({ rid: 2, ok: { id: "J1", rooms: [], max_frame: 262144, token: "t.2", continued: true } }, 0);
  const h = { resolve() {}, reject() {} };
  for (const [op, fields] of [
    ["join", { room: "x" }], ["leave", { room: "x" }], ["peers", { room: "x" }],
    ["pair", { peer_uid: "bob", timeout_ms: 5000 }], ["provide", { service: "calc" }],
    ["call", { service: "calc", method: "add", args: [1, 2], timeout_ms: 10000 }],
    ["call_result", { cid: 3, outcome: { ok: 3 } }], ["subscribe", { topic: "news" }],
    ["publish", { topic: "news", data: { a: 1 } }],
  ]) requests.push({ name: op, json: s.request(op, fields, 0, h) });
  const batches = [[0, 1, 2, 3], [5], [6, 7, 8, 9, 10, 11]].map((idx) => {
    const batch = encodeBatch(idx.map((i) => unhex(frames[i].hex)));
    return { frames: idx, hex: hex(batch), base64: toBase64(batch) };
  });
  return {
    about: "written by js/test/golden.test.mjs from the JS codec (GOLDEN_WRITE=1); checked by tests/tests/golden.rs",
    frames,
    batches,
    requests,
  };
}

test("JS vectors: the committed fixture is what this codec writes", () => {
  const text = JSON.stringify(jsVectors(), null, 2) + "\n";
  const path = fixture("golden-js.json");
  if (process.env.GOLDEN_WRITE === "1" || !existsSync(path)) writeFileSync(path, text);
  assert.equal(readFileSync(path, "utf8"), text);
});
