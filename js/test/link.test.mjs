import { test } from "node:test";
import assert from "node:assert/strict";
import { Link, decodeFrame, utf8, RTO_MIN, RTO_MAX, FRAGMENT_SIZE } from "../dist/core.js";

const ev = (name, i = 0, ackId = 0) => ({ type: "event", event: name, ackId, payload: { binary: false, data: utf8(JSON.stringify(i)) } });
const decode = (frames) => frames.map(decodeFrame);
const seqs = (frames) => decode(frames).filter((f) => f.body.kind === "data").map((f) => f.body.seq);

/** Two links back to back; `drop(frame)` decides losses. */
function pair(opts = {}) {
  const a = new Link("B", opts);
  const b = new Link("A", opts);
  const got = { a: [], b: [] };
  let t = 0;
  const step = (drop = () => false) => {
    let moved = 0;
    for (const [from, to, box] of [[a, b, got.b], [b, a, got.a]]) {
      for (const raw of from.poll(t)) {
        const f = decodeFrame(raw);
        moved++;
        if (drop(f)) continue;
        box.push(...to.handle(f.body, t));
      }
    }
    return moved;
  };
  const run = (ms, drop) => {
    for (let i = 0; i < ms; i++) {
      while (step(drop)) {}
      t++;
    }
  };
  return { a, b, got, step, run, now: () => t, tick: (ms) => (t += ms) };
}

test("in order, acknowledged after window/4 frames or 5 ms", () => {
  const p = pair();
  for (let i = 0; i < 100; i++) p.a.send(ev("n", i));
  const out = p.a.poll(0);
  assert.deepEqual(seqs(out), Array.from({ length: 100 }, (_, i) => i + 1));
  const acks = [];
  for (const raw of out) p.got.b.push(...p.b.handle(decodeFrame(raw).body, 0));
  acks.push(...decode(p.b.poll(0)));
  assert.equal(p.got.b.length, 100);
  assert.deepEqual(acks.map((f) => f.body), [{ kind: "linkAck", upto: 100, nack: false }]);
  // A lone frame is acknowledged after the 5 ms delay, not before.
  p.a.send(ev("n", 100));
  for (const raw of p.a.poll(1)) p.b.handle(decodeFrame(raw).body, 1);
  assert.equal(p.b.poll(3).length, 0);
  assert.equal(p.b.nextTimeout(), 6);
  assert.deepEqual(decode(p.b.poll(6)).map((f) => f.body.upto), [101]);
});

test("window: at most 256 frames beyond the last ack", () => {
  const p = pair();
  for (let i = 0; i < 600; i++) p.a.send(ev("n", i));
  const first = p.a.poll(0);
  assert.equal(seqs(first).length, 256);
  assert.equal(p.a.poll(0).length, 0);
  p.a.handle({ kind: "linkAck", upto: 64, nack: false }, 1);
  const more = p.a.poll(1);
  assert.deepEqual(seqs(more), Array.from({ length: 64 }, (_, i) => 257 + i));
  for (const raw of [...first, ...more]) p.got.b.push(...p.b.handle(decodeFrame(raw).body, 1));
  assert.equal(p.a.backlog, 600 - 64);
  p.run(1000);
  assert.equal(p.got.b.length, 600);
  assert.deepEqual(p.got.b.map((m) => Number(new TextDecoder().decode(m.payload.data))), [...Array(600).keys()]);
  assert.equal(p.a.backlog, 0);
  assert.equal(p.a.nextTimeout(), null);
});

test("retransmission: RTO 200 ms, doubling to 2 s, back to 200 ms on progress", () => {
  const a = new Link("B");
  a.send(ev("x"));
  assert.deepEqual(seqs(a.poll(0)), [1]);
  const times = [];
  for (let t = 1; t <= 12000; t++) if (seqs(a.poll(t)).length) times.push(t);
  assert.deepEqual(times.slice(0, 6), [RTO_MIN, 600, 1400, 3000, 5000, 7000]);
  assert.ok(times.slice(4).every((t, i, all) => i === 0 || t - all[i - 1] === RTO_MAX));
  a.handle({ kind: "linkAck", upto: 1, nack: false }, 12001);
  a.send(ev("y"));
  assert.deepEqual(seqs(a.poll(12001)), [2]);
  assert.equal(a.nextTimeout(), 12001 + RTO_MIN);
});

test("a lost frame: the receiver NACKs the gap once, the sender goes back", () => {
  const p = pair();
  for (let i = 0; i < 5; i++) p.a.send(ev("n", i));
  const frames = p.a.poll(0).map(decodeFrame);
  for (const f of frames.slice(1)) p.b.handle(f.body, 0); // seq 1 lost
  const answer = decode(p.b.poll(0));
  assert.deepEqual(answer.map((f) => f.body), [{ kind: "linkAck", upto: 0, nack: true }]);
  for (const f of answer) p.a.handle(f.body, 1);
  assert.deepEqual(seqs(p.a.poll(1)), [1, 2, 3, 4, 5]);
  // Later frames of the same gap: no second NACK.
  for (const f of frames.slice(2)) p.b.handle(f.body, 1);
  assert.equal(p.b.poll(1).length, 0);
});

test("lossy wire: everything arrives once and in order", () => {
  const p = pair();
  let n = 0;
  for (let i = 0; i < 2000; i++) p.a.send(ev("n", i));
  p.run(60000, (f) => ++n % 53 === 0);
  assert.equal(p.got.b.length, 2000);
  assert.ok(p.got.b.every((m, i) => new TextDecoder().decode(m.payload.data) === String(i)));
});

test("duplicates are dropped and answered with the consumed point", () => {
  const p = pair();
  p.a.send(ev("x"));
  const [raw] = p.a.poll(0);
  assert.equal(p.b.handle(decodeFrame(raw).body, 0).length, 1);
  p.b.poll(10);
  assert.equal(p.b.handle(decodeFrame(raw).body, 11).length, 0);
  assert.deepEqual(decode(p.b.poll(11)).map((f) => f.body), [{ kind: "linkAck", upto: 1, nack: false }]);
});

test("Busy goes back to the seq it names", () => {
  const a = new Link("B");
  for (let i = 0; i < 10; i++) a.send(ev("n", i));
  a.poll(0);
  a.busy(4);
  assert.deepEqual(seqs(a.poll(1)), [4, 5, 6, 7, 8, 9, 10]);
  a.busy(20); // not sent: ignored
  assert.deepEqual(seqs(a.poll(2)), []);
  a.resend();
  assert.equal(seqs(a.poll(3)).length, 10);
});

test("fragmentation: 16 KiB fragments, MORE on all but the last, reassembled", () => {
  const p = pair();
  const data = new Uint8Array(FRAGMENT_SIZE * 2 + 10).map((_, i) => i & 255);
  p.a.send({ type: "event", event: "f", ackId: 4, payload: { binary: true, data } });
  const frames = decode(p.a.poll(0));
  assert.deepEqual(frames.map((f) => [f.body.seq, f.body.more, f.body.msg.type]), [
    [1, true, "event"], [2, true, "continuation"], [3, false, "continuation"],
  ]);
  assert.equal(frames[0].body.msg.payload.data.length, FRAGMENT_SIZE);
  assert.equal(frames[2].body.msg.data.length, 10);
  const out = frames.flatMap((f) => p.b.handle(f.body, 0));
  assert.equal(out.length, 1);
  assert.equal(out[0].ackId, 4);
  assert.deepEqual(out[0].payload, { binary: true, data });
});

test("a stray Continuation is ignored; a new head discards a partial message", () => {
  const b = new Link("A");
  const d = (seq, more, msg) => ({ kind: "data", seq, more, msg });
  assert.deepEqual(b.handle(d(1, false, { type: "continuation", data: new Uint8Array([1]) }), 0), []);
  assert.deepEqual(b.handle(d(2, true, ev("a")), 0), []);
  const out = b.handle(d(3, false, ev("b")), 0);
  assert.deepEqual(out.map((m) => m.event), ["b"]);
});

test("a message over maxMessageSize is dropped and answered PayloadTooLarge", () => {
  const p = pair({ maxMessageSize: 20000 });
  p.a.send({ type: "event", event: "big", ackId: 9, payload: { binary: true, data: new Uint8Array(40000) } });
  p.run(20);
  assert.equal(p.got.b.length, 0);
  assert.deepEqual(p.got.a.map((m) => [m.type, m.ackId, m.code]), [["replyError", 9, "PayloadTooLarge"]]);
});

test("pings are answered with the same u64 nonce", () => {
  const p = pair();
  const nonce = 0xfedcba9876543211n;
  p.a.ping(nonce);
  p.run(2);
  assert.deepEqual(p.got.a, [{ type: "pong", nonce }]);
});

test("poll with maxData: at most that many Data frames, the rest on the next polls", () => {
  const a = new Link("B");
  for (let i = 0; i < 10; i++) a.send(ev("n", i));
  assert.deepEqual(seqs(a.poll(0, 3)), [1, 2, 3]);
  assert.equal(a.nextTimeout(), 0);
  assert.deepEqual(seqs(a.poll(1, 0)), []);
  assert.deepEqual(seqs(a.poll(1, 4)), [4, 5, 6, 7]);
  assert.deepEqual(seqs(a.poll(2)), [8, 9, 10]);
  assert.deepEqual(seqs(a.poll(3)), []);
});

test("after a transport change the first resend follows the measured round trip", () => {
  const a = new Link("B");
  // Nothing measured yet: 40 ms.
  a.send(ev("n", 0));
  a.poll(0);
  a.resend();
  a.poll(0);
  assert.equal(a.nextTimeout(), 40);
  // A resent frame is not timed (Karn)...
  a.handle({ kind: "linkAck", upto: 1, nack: false }, 1);
  assert.equal(a.rtt, null);
  // ...a new one is: a round trip of 1 ms; 2 × 1 + the 5 ms ack delay is below the 20 ms floor.
  a.send(ev("n", 1));
  a.poll(10);
  a.handle({ kind: "linkAck", upto: 2, nack: false }, 11);
  assert.equal(a.rtt, 1);
  a.send(ev("n", 2));
  a.poll(20);
  a.resend();
  assert.deepEqual(seqs(a.poll(20)), [3]);
  assert.equal(a.nextTimeout(), 40);
  // Resent then, and the timeout doubles as usual.
  assert.deepEqual(seqs(a.poll(40)), [3]);
  assert.equal(a.nextTimeout(), 80);
});
