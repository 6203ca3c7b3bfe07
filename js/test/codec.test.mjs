import { test } from "node:test";
import assert from "node:assert/strict";
import {
  encodeFrame, decodeFrame, encodeBatch, decodeBatch, Writer, Reader, toBase64, fromBase64, utf8, CodecError,
} from "../dist/core.js";

const hex = (b) => Buffer.from(b).toString("hex").replace(/(..)(?!$)/g, "$1 ");
const bytes = (h) => new Uint8Array(Buffer.from(h.replace(/\s+/g, ""), "hex"));

test("PROTOCOL.md example: first reliable event", () => {
  const f = { to: "B", from: "", body: { kind: "data", seq: 1, more: false,
    msg: { type: "event", event: "hi", ackId: 0, payload: { binary: false, data: utf8('{"x":1}') } } } };
  const enc = encodeFrame(f);
  assert.equal(hex(enc), "01 01 00 01 42 00 01 01 00 02 68 69 7b 22 78 22 3a 31 7d");
  const relayed = decodeFrame(bytes("01 01 00 01 42 01 41 01 01 00 02 68 69 7b 22 78 22 3a 31 7d"));
  assert.equal(relayed.from, "A");
  assert.equal(relayed.body.msg.event, "hi");
  assert.equal(new TextDecoder().decode(relayed.body.msg.payload.data), '{"x":1}');
});

test("PROTOCOL.md examples: acks, pings, replies, varints", () => {
  assert.equal(hex(encodeFrame({ to: "A", from: "", body: { kind: "linkAck", upto: 1, nack: false } })), "01 03 00 01 41 00 01");
  assert.equal(hex(encodeFrame({ to: "A", from: "", body: { kind: "linkAck", upto: 1, nack: true } })), "01 03 04 01 41 00 01");
  assert.equal(hex(encodeFrame({ to: "B", from: "", body: { kind: "ping", nonce: 5n, pong: false } })), "01 04 00 01 42 00 05");
  assert.equal(hex(encodeFrame({ to: "A", from: "", body: { kind: "ping", nonce: 5n, pong: true } })), "01 04 08 01 41 00 05");
  assert.equal(
    hex(encodeFrame({ to: "A", from: "", body: { kind: "data", seq: 1, more: false,
      msg: { type: "reply", ackId: 1, payload: { binary: false, data: utf8('"ok"') } } } })),
    "01 01 00 01 41 00 01 02 01 22 6f 6b 22");
  assert.equal(hex(new Writer().varint(300).finish()), "ac 02");
});

test("u64 varints round-trip exactly as bigint", () => {
  for (const n of [0n, 1n, 127n, 128n, (1n << 53n) + 1n, (1n << 64n) - 1n, 0x9e3779b97f4a7c15n]) {
    const f = { to: "x", from: "y", body: { kind: "ping", nonce: n, pong: true } };
    assert.equal(decodeFrame(encodeFrame(f)).body.nonce, n);
  }
  const max = new Writer().varint((1n << 64n) - 1n).finish();
  assert.equal(max.length, 10);
  assert.equal(max[9], 1);
  const bad = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
  assert.throws(() => new Reader(bad).varint64(), CodecError);
  assert.throws(() => new Reader(new Uint8Array([0x80, 0x80])).varint(), CodecError);
  assert.throws(() => new Reader(new Writer().varint(1n << 60n).finish()).varint(), /too large/);
});

test("every message kind round-trips", () => {
  const bin = new Uint8Array([0, 1, 0x1d, 0x1e, 255]);
  const msgs = [
    { type: "event", event: "é", ackId: 7, payload: { binary: true, data: bin } },
    { type: "reply", ackId: 300, payload: { binary: false, data: utf8("null") } },
    { type: "replyError", ackId: 2, code: "NoHandler", message: "no handler ✓" },
    { type: "continuation", data: bin },
    ...[
      { op: "open", name: "file.bin" }, { op: "accept" }, { op: "refuse", code: "Refused", message: "no" },
      { op: "data", data: bin }, { op: "credit", bytes: 1 << 20 }, { op: "fin" }, { op: "reset", code: "Dropped", message: "x" },
    ].map((op, i) => ({ type: "stream", id: i + 1, opener: i % 2 === 0, op })),
  ];
  for (const msg of msgs) {
    for (const body of [{ kind: "data", seq: 42, more: msg.type === "continuation", msg }, { kind: "volatile", msg }]) {
      const f = { to: "peer-b", from: "peer-a", body };
      const back = decodeFrame(encodeFrame(f));
      assert.deepEqual(encodeFrame(back), encodeFrame(f));
      assert.deepEqual(JSON.parse(JSON.stringify(back, (k, v) => (v instanceof Uint8Array ? [...v] : v))),
        JSON.parse(JSON.stringify(f, (k, v) => (v instanceof Uint8Array ? [...v] : v))));
    }
  }
});

test("bad frames are typed errors", () => {
  assert.throws(() => decodeFrame(bytes("09 01 00 00 00")), /unsupported frame version 9/);
  assert.throws(() => decodeFrame(bytes("01 07 00 00 00 01")), /unknown kind 7/);
  assert.throws(() => decodeFrame(bytes("01 01 00 05 41")), /truncated/);
  assert.throws(() => decodeFrame(bytes("01 01 00 01 ff 00 01 01 00 00")), /UTF-8/);
  assert.throws(() => encodeFrame({ to: "x".repeat(256), from: "", body: { kind: "linkAck", upto: 1, nack: false } }), /to too long/);
});

test("batches: varint length + frame, concatenated", () => {
  const a = bytes("01 03 00 01 41 00 01");
  const b = new Uint8Array(200).fill(7);
  const batch = encodeBatch([a, b]);
  assert.equal(hex(batch.subarray(0, 8)), "07 01 03 00 01 41 00 01");
  assert.equal(hex(batch.subarray(8, 10)), "c8 01");
  const back = decodeBatch(batch);
  assert.equal(back.length, 2);
  assert.deepEqual(back[0], a);
  assert.deepEqual(back[1], b);
  assert.throws(() => decodeBatch(new Uint8Array(0)), CodecError);
  assert.throws(() => decodeBatch(bytes("00")), /empty frame/);
  assert.throws(() => decodeBatch(bytes("05 01 02")), /truncated/);
});

test("base64 with padding", () => {
  for (let n = 0; n < 40; n++) {
    const b = new Uint8Array(n).map((_, i) => (i * 37 + n) & 255);
    assert.equal(toBase64(b), Buffer.from(b).toString("base64"));
    assert.deepEqual(fromBase64(Buffer.from(b).toString("base64")), b);
  }
  assert.throws(() => fromBase64("abc"), CodecError);
});
