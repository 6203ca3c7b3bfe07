// WebRTC in Node.js with the `wrtc` option and @roamhq/wrtc (a dev dependency: its Linux
// binary comes from the npm registry as a package). Node peers upgrade with Rust peers and
// with each other; without the option they stay on the relay. Loopback only, no STUN/TURN.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { Interop, jsPeer, until, pattern, sha256 } from "../harness.mjs";

let wrtc = null;
try {
  wrtc = createRequire(import.meta.url)("@roamhq/wrtc");
} catch (e) {
  console.log(`# @roamhq/wrtc is not installed here (${e.code ?? e.message}): the WebRTC cases are skipped`);
}
const skip = wrtc ? false : "@roamhq/wrtc is not installed";

let it;
const closers = [];
const peer = (opts, ioOpts) => {
  const p = jsPeer(it.url, opts, ioOpts);
  closers.push(p);
  return p;
};
const rtc = () => ({ autoUpgrade: false, iceServers: [], wrtc });

before(async () => {
  it = await Interop.start();
});

after(async () => {
  for (const p of closers) p.close();
  await it?.stop();
});

test("without the wrtc option a Node peer stays on the relay", async () => {
  const rid = await it.rustPeer("nr", { rooms: ["nr"] });
  const js = peer({ rooms: ["nr"] });
  await js.ready;
  assert.equal(js.webrtc, false);
  await assert.rejects(js.upgradePeer(rid), { code: "Unsupported" });
  assert.equal(js.transport(rid), "relay");
  assert.equal(await js.to(rid).emitWithAck("echo", 1), 1);
});

for (const nodeOffers of [true, false]) {
  test(`a Node peer and a Rust peer upgrade (${nodeOffers ? "Node" : "Rust"} offering): events, acks, 1 MiB, kill and re-upgrade`, { skip }, async () => {
    const tag = `nw${nodeOffers ? "n" : "r"}`;
    // The smaller id offers: new Rust peers (and now and then a new Node peer, whose id may
    // be near an end of the alphabet) until the order is the wanted one.
    let js, me, name, rid;
    for (let i = 0; ; i++) {
      assert.ok(i < 60, "no Rust peer id in the wanted order");
      if (i % 5 === 0) {
        js?.close();
        js = peer({ rooms: [tag], ...rtc(), retryBackoff: 100 });
        me = (await js.ready).id;
      }
      name = `${tag}-${i}`;
      rid = await it.rustPeer(name, { rooms: [`${tag}-lobby`] });
      if (me < rid === nodeOffers) break;
      await it.cmd({ cmd: "close", peer: name });
    }
    await it.cmd({ cmd: "join", peer: name, room: tag });
    await until(() => js.peers().some((p) => p.id === rid), 10_000, "the Rust peer");
    const t0 = Date.now();
    await js.upgradePeer(rid);
    console.log(`# node: upgrade with a Rust peer (${nodeOffers ? "node" : "rust"} offers) in ${Date.now() - t0} ms`);
    assert.equal(js.transport(rid), "datachannel");
    assert.equal((await it.cmd({ cmd: "transport", peer: name, to: me })).transport, "DataChannel");
    assert.equal(await js.to(rid).emitWithAck("add", [2, 3]), 5);
    js.on("echo", (d, meta, reply) => reply({ d, transport: meta.transport }));
    const ack2 = await it.cmd({ cmd: "ack", peer: name, to: me, event: "echo", data: "back" });
    assert.deepEqual(ack2.ok, { json: { d: "back", transport: "datachannel" } });
    js.to(rid).emit("bin", pattern(1 << 20));
    const bin = await it.waitLine((l) => l.ev === "event" && l.peer === name && l.name === "bin", 30_000);
    assert.deepEqual([bin.data.bin, bin.data.sha256, bin.transport], [1 << 20, sha256(pattern(1 << 20)), "DataChannel"]);
    // 2,000 numbered events each way across a kill (ours) and the re-upgrade that follows.
    const nums = [];
    js.on("num", (n, meta) => nums.push(n));
    const downgrades = [];
    js.on("downgrade", (d) => downgrades.push(d.reason));
    for (let i = 0; i < 1000; i++) js.to(rid).emit("num", i);
    const sending = it.cmd({ cmd: "emit_n", peer: name, to: me, event: "num", n: 2000 }, 60_000);
    // pc.close() fires no event of its own: dead-channel detection brings both back.
    js.killDataChannel(rid);
    for (let i = 1000; i < 2000; i++) js.to(rid).emit("num", i);
    await until(() => downgrades.length > 0, 10_000, "the downgrade");
    await js.upgradePeer(rid);
    await sending;
    await until(() => it.events(name, "num").length >= 2000 && nums.length >= 2000, 60_000, "2,000 events each way");
    assert.deepEqual(it.events(name, "num").map((l) => l.data.json), [...Array(2000).keys()]);
    assert.deepEqual(nums, [...Array(2000).keys()]);
    assert.equal(js.transport(rid), "datachannel");
    js.to(rid).emit("hi", "after");
    const after = await it.waitLine((l) => l.ev === "event" && l.peer === name && l.name === "hi");
    assert.equal(after.transport, "DataChannel");
  });
}

test("two Node peers upgrade to each other; the Rust peer in the room sees both on the relay", { skip }, async () => {
  const rid = await it.rustPeer("nn", { rooms: ["nn"] });
  const a = peer({ rooms: ["nn"], ...rtc() });
  const b = peer({ rooms: ["nn"], ...rtc() });
  const [ia, ib] = [await a.ready, await b.ready];
  await until(() => a.peers().some((p) => p.id === ib.id), 10_000, "b");
  await a.upgradePeer(ib.id);
  await until(() => b.transport(ia.id) === "datachannel", 10_000, "b's side");
  const seen = new Promise((r) => b.on("hi", (d, meta) => r([d, meta.transport])));
  a.to(ib.id).emit("hi", "over webrtc");
  assert.deepEqual(await seen, ["over webrtc", "datachannel"]);
  // The Rust peer hears of the two Node peers through presences, which the server batches
  // for up to 25 ms: this can all be over before they arrive. Wait for both.
  const end = Date.now() + 10_000;
  let known = [];
  while (Date.now() < end) {
    known = ((await it.cmd({ cmd: "peers", peer: "nn" })).peers ?? []).map((p) => p.id);
    if (known.includes(ia.id) && known.includes(ib.id)) break;
    await new Promise((ok) => setTimeout(ok, 20));
  }
  assert.ok(known.includes(ia.id) && known.includes(ib.id), `the Rust peer knows ${known}`);
  assert.equal((await it.cmd({ cmd: "transport", peer: "nn", to: ia.id })).transport, "Relay");
  assert.equal((await it.cmd({ cmd: "transport", peer: "nn", to: ib.id })).transport, "Relay");
});
