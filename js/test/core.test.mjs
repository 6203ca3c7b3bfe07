import { test } from "node:test";
import assert from "node:assert/strict";
import { AckTable, Session, PROTOCOL_VERSION } from "../dist/core.js";

test("acks: settle only from the peer asked, once; time out; fail by peer", () => {
  const t = new AckTable();
  const done = [];
  const a = t.add("P", 1000, 0, (r) => done.push(["a", r]));
  const b = t.add("Q", 500, 0, (r) => done.push(["b", r]));
  const c = t.add("Q", 5000, 0, (r) => done.push(["c", r]));
  assert.deepEqual([a, b, c], [1, 2, 3]);
  assert.equal(t.settle("Q", a, { ok: true, value: 1 }), false);
  assert.equal(t.settle("P", a, { ok: true, value: 1 }), true);
  assert.equal(t.settle("P", a, { ok: true, value: 2 }), false);
  assert.equal(t.nextTimeout(), 500);
  t.expire(499);
  assert.equal(done.length, 1);
  t.expire(500);
  assert.equal(done[1][1].code, "Timeout");
  t.fail("Q", "PeerOffline", "gone");
  assert.deepEqual(done.map(([n, r]) => [n, r.ok ? r.value : r.code]), [["a", 1], ["b", "Timeout"], ["c", "PeerOffline"]]);
  assert.equal(t.size, 0);
  assert.equal(t.nextTimeout(), null);
});

test("session: hello, then queued requests, then resume after a reconnection", () => {
  const s = new Session({ uid: "alice", rooms: ["lobby"] });
  const hello = s.connected();
  assert.deepEqual(hello, { rid: 1, op: "hello", version: PROTOCOL_VERSION, frames: "binary", uid: "alice", rooms: ["lobby"] });
  assert.equal(PROTOCOL_VERSION, 2);
  const got = [];
  const h = { resolve: (v) => got.push(["ok", v]), reject: (e) => got.push(["err", e.code]) };
  assert.equal(s.request("join", { room: "game" }, 0, h), null); // waits for the Welcome
  const w = { id: "A1", uid: "alice", rooms: [{ room: "lobby", peers: [{ id: "B1" }] }], max_frame: 1000, token: "t1", continued: false };
  const out = s.response({ rid: 1, ok: w }, 5);
  assert.equal(out.type, "welcome");
  assert.equal(out.first, true);
  assert.deepEqual(out.send.map((r) => [r.op, r.room]), [["join", "game"]]);
  assert.equal(s.id, "A1");
  assert.equal(s.maxFrame, 1000);
  assert.equal(s.registered, true);
  s.response({ rid: out.send[0].rid, ok: [] }, 6);
  assert.deepEqual(got, [["ok", []]]);
  // A call in flight is lost with the connection; a join is sent again.
  const call = s.request("call", { service: "x" }, 10, h, { retry: false });
  const join = s.request("join", { room: "r2" }, 10, h);
  s.disconnected();
  assert.deepEqual(got.at(-1), ["err", "Disconnected"]);
  s.rooms.add("game");
  const hello2 = s.connected();
  assert.deepEqual(hello2.resume, { id: "A1", token: "t1" });
  assert.deepEqual(hello2.rooms, ["lobby", "game"]);
  const out2 = s.response({ rid: hello2.rid, ok: { ...w, token: "t2", continued: true } }, 21);
  assert.equal(out2.first, false);
  assert.deepEqual(out2.send.map((r) => r.rid), [join.rid]);
  assert.ok(call.rid);
  assert.deepEqual(s.connected().resume, { id: "A1", token: "t2" });
});

test("session: a refused hello, request timeouts, close", () => {
  const s = new Session({});
  const hello = s.connected();
  assert.deepEqual(s.response({ rid: hello.rid, error: { code: "UidTaken", message: "x" } }, 1), {
    type: "refused", error: { code: "UidTaken", message: "x" }, first: true,
  });
  assert.equal(s.registered, false);
  const h2 = s.connected();
  s.response({ rid: h2.rid, ok: { id: "X", rooms: [], max_frame: 10, token: "t", continued: false } }, 3);
  const got = [];
  const h = { resolve: () => got.push("ok"), reject: (e) => got.push(e.code) };
  s.request("peers", { room: "a" }, 10, h, { timeout: 100 });
  s.request("peers", { room: "b" }, 10, h);
  assert.equal(s.nextTimeout(), 110);
  s.expire(110);
  s.close();
  assert.deepEqual(got, ["Timeout", "Closed"]);
});
