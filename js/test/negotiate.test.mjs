import { test } from "node:test";
import assert from "node:assert/strict";
import { Negotiation, BUSY, APP_DOWNGRADE } from "../dist/core.js";

const types = (acts) => acts.map((a) => a.type);

test("negotiate: the smaller id offers, the larger requests", () => {
  const a = new Negotiation("a", "b", 0);
  const b = new Negotiation("b", "a", 0);
  assert.deepEqual(a.start(0), [{ type: "createOffer" }]);
  assert.deepEqual(b.start(0), [{ type: "send", signal: { type: "request" } }]);
  assert.deepEqual(a.onSignal({ type: "request" }, true, 1), [], "offering ignores a request");
});

test("negotiate: full exchange, candidates only while attempting or open", () => {
  const a = new Negotiation("a", "b", 0);
  const b = new Negotiation("b", "a", 0);
  const cand = { type: "candidate", candidate: "candidate:1 1 udp 1 127.0.0.1 5 typ host" };
  assert.deepEqual(b.onSignal(cand, true, 0), [], "idle ignores candidates");
  a.start(0);
  assert.deepEqual(types(b.onSignal({ type: "offer", sdp: "v=0" }, true, 1)), ["closeLink", "acceptOffer"]);
  assert.deepEqual(types(b.onSignal(cand, true, 1)), ["addCandidate"]);
  assert.deepEqual(a.onSignal({ type: "answer", sdp: "v=0" }, true, 2), [{ type: "acceptAnswer", sdp: "v=0" }]);
  assert.deepEqual(a.onOpen(3), [{ type: "upgraded" }]);
  assert.deepEqual(b.onOpen(3), [{ type: "upgraded" }]);
  assert.equal(a.open && b.open, true);
  assert.deepEqual(a.onSignal({ type: "answer", sdp: "v=0" }, true, 4), [], "answer ignored when open");
});

test("negotiate: glare, the smaller id's offer stands", () => {
  const a = new Negotiation("a", "b", 0);
  a.start(0);
  assert.deepEqual(a.onSignal({ type: "offer", sdp: "v=0" }, true, 1), []);
});

test("negotiate: numClients refusal with bye busy, no retry after busy", () => {
  const a = new Negotiation("a", "b", 0);
  assert.deepEqual(a.onSignal({ type: "request" }, false, 0), [{ type: "send", signal: { type: "bye", reason: BUSY } }]);
  const b = new Negotiation("b", "a", 0);
  assert.deepEqual(b.onSignal({ type: "offer", sdp: "v=0" }, false, 0), [{ type: "send", signal: { type: "bye", reason: BUSY } }]);
  b.start(0);
  assert.deepEqual(types(b.onSignal({ type: "bye", reason: BUSY }, true, 1)), ["closeLink", "failed"]);
  assert.equal(b.retryAt, null);
  assert.equal(b.nextTimeout(), null);
});

test("negotiate: upgrade timeout fails with bye, then retries with doubling backoff", () => {
  const a = new Negotiation("a", "b", 0, { upgradeTimeout: 5000 });
  a.start(0);
  assert.equal(a.nextTimeout(), 5000);
  assert.deepEqual(a.onTick(4999), []);
  const acts = a.onTick(5000);
  assert.deepEqual(types(acts), ["closeLink", "failed", "send"]);
  assert.equal(acts[2].signal.type, "bye");
  assert.equal(a.retryAt, 6000);
  assert.deepEqual(a.onTick(6000), [{ type: "createOffer" }]);
  a.onTick(11000);
  assert.equal(a.retryAt, 13000, "backoff doubled to 2 s");
  for (let i = 0; i < 10; i++) {
    a.onTick(a.retryAt);
    a.onTick(a.nextTimeout());
  }
  assert.ok(a.retryAt - a.nextTimeout() === 0);
  const gap = a.retryAt - (a["since"] + 5000);
  assert.ok(gap <= 60000);
});

test("negotiate: keepalive every dcTimeout/3, dead after dcTimeout, backoff reset on open", () => {
  const a = new Negotiation("a", "b", 0, { dcTimeout: 3000 });
  a.start(0);
  a.onOpen(10);
  assert.deepEqual(a.onTick(1009), []);
  assert.deepEqual(a.onTick(1010), [{ type: "keepalive" }]);
  assert.deepEqual(a.onTick(1500), [], "at most once per dcTimeout/3");
  a.onReceive(1600);
  assert.deepEqual(a.onTick(2600), [{ type: "keepalive" }]);
  const dead = a.onTick(4600);
  assert.deepEqual(types(dead), ["closeLink", "downgraded", "send"]);
  assert.match(dead[1].reason, /nothing received on the data channel/);
  assert.equal(a.retryAt, 5600);
});

test("negotiate: an application downgrade (ours or the peer's) is not retried until asked", () => {
  const a = new Negotiation("a", "b", 0);
  a.start(0);
  a.onOpen(1);
  const acts = a.hangUp(APP_DOWNGRADE, 2);
  assert.deepEqual(types(acts), ["closeLink", "downgraded", "send"]);
  assert.equal(a.nextTimeout(), null);
  assert.deepEqual(a.start(3, true, true), [{ type: "createOffer" }], "an explicit upgrade still works");
  a.onOpen(4);
  assert.deepEqual(types(a.onSignal({ type: "bye", reason: APP_DOWNGRADE }, true, 5)), ["closeLink", "downgraded"]);
  assert.equal(a.nextTimeout(), null);
});

test("negotiate: a request while open renegotiates; an offer while open re-answers", () => {
  const a = new Negotiation("a", "b", 0);
  a.start(0);
  a.onOpen(1);
  assert.deepEqual(types(a.onSignal({ type: "request" }, true, 2)), ["closeLink", "downgraded", "createOffer"]);
  const b = new Negotiation("b", "a", 0);
  b.onSignal({ type: "offer", sdp: "v=0" }, true, 0);
  b.onOpen(1);
  assert.deepEqual(types(b.onSignal({ type: "offer", sdp: "v=0" }, true, 2)), ["closeLink", "downgraded", "acceptOffer"]);
  assert.deepEqual(b.onSignal({ type: "bye" }, true, 3).length, 2);
  assert.deepEqual(b.onSignal({ type: "bye" }, true, 4), [], "a crossing bye is ignored");
});

test("negotiate: a bye from the connection before does not end a new attempt; a busy one does", () => {
  // Requester: the peer's bye crossed our new request.
  const b = new Negotiation("b", "a", 0);
  b.start(0);
  assert.deepEqual(b.onSignal({ type: "bye", reason: "reliable data channel closed" }, true, 1), [], "stale bye ignored");
  assert.equal(b.phase, "requested");
  assert.deepEqual(types(b.onSignal({ type: "offer", sdp: "v=0" }, true, 2)), ["closeLink", "acceptOffer"]);
  assert.deepEqual(types(b.onSignal({ type: "bye", reason: "webrtc: bad sdp" }, true, 3)), ["closeLink", "failed"], "after the peer's offer a bye counts");
  // Offerer: the same before the answer; busy always counts.
  const a = new Negotiation("a", "b", 0);
  a.start(10);
  assert.deepEqual(a.onSignal({ type: "bye", reason: APP_DOWNGRADE }, true, 11), []);
  assert.equal(a.phase, "offering");
  assert.deepEqual(types(a.onSignal({ type: "bye", reason: BUSY }, true, 12)), ["closeLink", "failed"]);
  // The stale bye's attempt still has its timeout.
  const c = new Negotiation("c", "d", 0, { upgradeTimeout: 100 });
  c.start(0);
  c.onSignal({ type: "bye", reason: "peer hung up" }, true, 1);
  assert.deepEqual(types(c.onTick(100)), ["closeLink", "failed", "send"]);
});
