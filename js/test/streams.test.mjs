import { test } from "node:test";
import assert from "node:assert/strict";
import { Streams } from "../dist/core.js";

/** Two stream tables wired back to back through a queue of messages. */
function pair(window = 65536) {
  const wires = { a: [], b: [] };
  const a = new Streams({ window, requestTimeout: 1000 }, (peer, msg) => wires.b.push(msg));
  const b = new Streams({ window, requestTimeout: 1000 }, (peer, msg) => wires.a.push(msg));
  const deliver = async (until) => {
    for (let n = 0; n < 100_000 && !until(); n++) {
      const ma = wires.a.shift();
      if (ma) a.handle("B", ma, 0);
      const mb = wires.b.shift();
      if (mb) b.handle("A", mb, 0);
      if (!ma && !mb) await new Promise((r) => setImmediate(r));
    }
  };
  return { a, b, wires, deliver };
}

test("open, accept, credit-limited data both ways, fin both ways", async () => {
  const p = pair(32768);
  let incoming;
  p.b.onIncoming = (i) => (incoming = i);
  const opening = p.a.open("B", "file", 0);
  assert.deepEqual(p.wires.b.map((m) => [m.op.op, m.opener, m.id]), [["open", true, 1], ["credit", true, 1]]);
  let stream;
  opening.then((s) => (stream = s));
  await p.deliver(() => incoming);
  assert.equal(incoming.name, "file");
  const theirs = incoming.accept();
  await p.deliver(() => stream);
  // The writer may send only what was granted: 32 KiB, in ≤ 16 KiB pieces.
  const w = stream.writable.getWriter();
  const writing = w.write(new Uint8Array(100_000).fill(7)).then(() => w.close());
  await new Promise((r) => setImmediate(r));
  const sent = p.wires.b.filter((m) => m.op.op === "data");
  assert.deepEqual(sent.map((m) => m.op.data.length), [16384, 16384]);
  // Reading on the other side grants more: everything arrives, then the end.
  let n = 0;
  const reading = (async () => {
    for await (const c of theirs.readable) n += c.length;
  })();
  await p.deliver(() => n === 100_000);
  await writing;
  const w2 = theirs.writable.getWriter();
  await w2.close();
  await p.deliver(() => p.a.size === 0 && p.b.size === 0);
  await reading;
  const back = [];
  for await (const c of stream.readable) back.push(c);
  assert.deepEqual(back, []);
  assert.equal(n, 100_000);
  assert.equal(p.a.size + p.b.size, 0);
});

test("refusal, no handler, unknown stream, data beyond credit", async () => {
  const p = pair(16384);
  p.b.onIncoming = (i) => i.refuse("no thanks");
  const refused = p.a.open("B", "x", 0);
  await p.deliver(() => p.a.size === 0);
  await assert.rejects(refused, (e) => e.code === "Refused" && e.message === "no thanks");
  p.b.onIncoming = null;
  const nobody = p.a.open("B", "y", 0);
  await p.deliver(() => p.a.size === 0);
  await assert.rejects(nobody, (e) => e.code === "Refused");
  // A message for a stream that does not exist: Reset UnknownStream.
  await p.deliver(() => !p.wires.a.length && !p.wires.b.length);
  p.wires.a.length = 0;
  p.b.handle("A", { type: "stream", id: 99, opener: true, op: { op: "data", data: new Uint8Array(1) } }, 0);
  assert.deepEqual(p.wires.a.map((m) => [m.op.op, m.op.code, m.opener]), [["reset", "UnknownStream", false]]);
  p.wires.a.length = 0;
  // More data than granted: Reset FlowControl, and the reader fails.
  let inc;
  p.b.onIncoming = (i) => (inc = i.accept());
  const opened = p.a.open("B", "z", 0);
  await p.deliver(() => inc && !p.wires.a.length);
  await opened;
  p.b.handle("A", { type: "stream", id: 3, opener: true, op: { op: "data", data: new Uint8Array(20000) } }, 0);
  assert.equal(p.wires.a.at(-1).op.code, "FlowControl");
  await assert.rejects(inc.readable.getReader().read(), (e) => e.code === "FlowControl");
});

test("an open without an answer times out with Reset Timeout", async () => {
  const p = pair();
  const opening = p.a.open("B", "slow", 0);
  assert.equal(p.a.nextTimeout(), 1000);
  p.a.tick(999);
  assert.equal(p.a.size, 1);
  p.a.tick(1000);
  await assert.rejects(opening, (e) => e.code === "Timeout");
  assert.deepEqual(p.wires.b.at(-1).op, { op: "reset", code: "Timeout", message: "no answer to the stream request" });
});

test("a reset that crosses the peer's Fin does not take back what was received", async () => {
  const p = pair(65536);
  let inc;
  p.b.onIncoming = (i) => (inc = i);
  const opening = p.a.open("B", "late", 0);
  await p.deliver(() => inc);
  inc.accept();
  await p.deliver(() => !p.wires.a.length);
  const s = await opening;
  // The peer sends data and its Fin, then (our Credit having crossed its Fin) a Reset.
  p.a.handle("B", { type: "stream", id: 1, opener: false, op: { op: "data", data: new Uint8Array([1, 2, 3]) } }, 0);
  p.a.handle("B", { type: "stream", id: 1, opener: false, op: { op: "fin" } }, 0);
  p.a.handle("B", { type: "stream", id: 1, opener: false, op: { op: "reset", code: "UnknownStream", message: "no such stream" } }, 0);
  const got = [];
  for await (const c of s.readable) got.push(...c);
  assert.deepEqual(got, [1, 2, 3]);
  // Our side had not finished writing: that fails.
  await assert.rejects(s.writable.getWriter().write(new Uint8Array(1)), (e) => e.code === "UnknownStream");
});
