// WebRTC in headless Chromium and Firefox ESR: pages upgrade to data channels with Rust
// peers of the interop program and with each other, through the Rust server. Loopback
// only, no STUN or TURN; the Rust peers put every candidate in their SDP.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { Interop, until, pattern, sha256 } from "../harness.mjs";
import { browsers, launch, openPage } from "./browsers.mjs";

const jsRoot = path.resolve(import.meta.dirname, "../..");

const rtc = { autoUpgrade: false, iceServers: [] };

for (const [name, options] of Object.entries(browsers)) {
  describe(`webrtc suite in ${name}`, { timeout: 300_000 }, () => {
    let it, browser, page;
    const ev = (fn, ...args) => page.evaluate(fn, ...args);
    const pageUntil = async (pred, arg, ms = 30_000) => {
      await page.waitForFunction(pred, { timeout: ms, polling: 20 }, arg);
    };
    const rustTransport = async (peer, to) => (await it.cmd({ cmd: "transport", peer, to })).transport;
    const rustUpgraded = (peer, who, after = 0) =>
      it.waitLine((l, i) => l.ev === "presence" && l.peer === peer && l.type === "upgraded" && l.who === who && it.lines.indexOf(l) >= after, 15_000, `${peer} upgraded`);

    before(async () => {
      it = await Interop.start(["--static", jsRoot]);
      browser = await launch(options);
      page = await openPage(browser, it.url);
    });

    after(async () => {
      if (page) await ev(() => Object.values(peers).forEach((p) => p.close())).catch(() => {});
      await browser?.close().catch(() => {});
      await it?.stop();
    });

    test("upgrade from the page: events, acks both ways and 1 MiB binary over the data channel", async () => {
      const rid = await it.rustPeer("w1", { rooms: ["w1"] });
      const me = (await ev((o) => mk("w1", { rooms: ["w1"], ...o }), rtc)).ok.id;
      await it.rustSees("w1", [me]);
      const t0 = Date.now();
      await ev((rid) => peers.w1.upgradePeer(rid), rid);
      console.log(`# ${name}: page-started upgrade in ${Date.now() - t0} ms (${me < rid ? "page offers" : "rust offers"})`);
      assert.equal(await ev((rid) => peers.w1.transport(rid), rid), "datachannel");
      await rustUpgraded("w1", me);
      assert.equal(await rustTransport("w1", me), "DataChannel");
      await ev(() => peers.w1.emit("hi", { x: 1 }));
      const hi = await it.waitLine((l) => l.ev === "event" && l.peer === "w1" && l.name === "hi");
      assert.equal(hi.transport, "DataChannel");
      assert.equal(hi.from, me);
      await it.cmd({ cmd: "emit", peer: "w1", to: me, event: "hi", data: "back" });
      await pageUntil(() => got.w1.some((e) => e.event === "hi"));
      assert.deepEqual(await ev(() => got.w1.find((e) => e.event === "hi")), { event: "hi", from: rid, transport: "datachannel", data: "back" });
      assert.deepEqual(await ev((rid) => peers.w1.to(rid).emitWithAck("echo", { a: 1 }), rid), { a: 1 });
      assert.equal(await ev((rid) => peers.w1.to(rid).emitWithAck("add", [2, 3]), rid), 5);
      const ack = await it.cmd({ cmd: "ack", peer: "w1", to: me, event: "echo", data: [7] });
      assert.deepEqual(ack.ok, { json: [7] });
      await ev((rid) => peers.w1.to(rid).emit("bin", pattern(1 << 20)), rid);
      const bin = await it.waitLine((l) => l.ev === "event" && l.peer === "w1" && l.name === "bin", 30_000);
      assert.equal(bin.data.bin, 1 << 20);
      assert.equal(bin.data.sha256, sha256(pattern(1 << 20)));
      assert.equal(bin.transport, "DataChannel");
      await it.cmd({ cmd: "emit_bin", peer: "w1", to: me, event: "bin", len: 1 << 20 });
      await pageUntil(() => got.w1.some((e) => e.event === "bin" && e.sha256));
      const rec = await ev(() => got.w1.find((e) => e.event === "bin"));
      assert.equal(rec.bin, 1 << 20);
      assert.equal(rec.sha256, sha256(pattern(1 << 20)));
      assert.equal(rec.transport, "datachannel");
      assert.ok(await ev(() => got.w1.some((e) => e.local === "upgrade")));
    });

    test("upgrade started by the Rust peer, and by autoUpgrade on both sides", async () => {
      const rid = await it.rustPeer("w2", { rooms: ["w2"] });
      const me = (await ev((o) => mk("w2", { rooms: ["w2"], ...o }), rtc)).ok.id;
      await it.rustSees("w2", [me]);
      const t0 = Date.now();
      const r = await it.cmd({ cmd: "upgrade", peer: "w2", to: me }, 15_000);
      assert.equal(r.ev, "done", JSON.stringify(r));
      console.log(`# ${name}: rust-started upgrade in ${Date.now() - t0} ms`);
      await pageUntil((rid) => peers.w2.transport(rid) === "datachannel", rid);
      assert.equal(await ev((rid) => peers.w2.to(rid).emitWithAck("echo", 3), rid), 3);
      // autoUpgrade: a page peer with the default options and a Rust peer with auto_upgrade.
      const rid3 = await it.rustPeer("w3", { rooms: ["w3"], auto_upgrade: true });
      const me3 = (await ev(() => mk("w3", { rooms: ["w3"] }))).ok.id;
      await pageUntil((rid) => peers.w3.transport(rid) === "datachannel", rid3).catch((e) => { throw new Error(`w3: ${e.message}`); });
      await rustUpgraded("w3", me3);
      await ev((rid) => peers.w3.to(rid).emit("hi", 1), rid3);
      const hi = await it.waitLine((l) => l.ev === "event" && l.peer === "w3" && l.name === "hi");
      assert.equal(hi.transport, "DataChannel");
    });

    for (const pageOffers of [true, false]) {
      test(`autoUpgrade on the page alone (the Rust peer's auto_upgrade off), ${pageOffers ? "page" : "Rust peer"} offering`, async () => {
        // A Rust peer whose id puts the offer on the wanted side (the smaller id offers); now
        // and then a new page peer too, whose id may be near an end of the alphabet.
        let tag, me, peer, rid;
        for (let i = 0; ; i++) {
          assert.ok(i < 60, "no Rust peer id in the wanted order");
          if (i % 5 === 0) {
            if (tag) await ev((tag) => peers[tag].close(), tag);
            tag = `w4${pageOffers ? "p" : "r"}${i}`;
            me = (await ev((tag) => mk(tag, { rooms: [tag], autoUpgrade: true }), tag)).ok.id;
          }
          peer = `${tag}-${i}`;
          rid = await it.rustPeer(peer, { rooms: [`${tag}-lobby`] });
          if (me < rid === pageOffers) break;
          await it.cmd({ cmd: "close", peer });
        }
        const mark = it.lines.length;
        const t0 = Date.now();
        await it.cmd({ cmd: "join", peer, room: tag });
        await pageUntil((o) => peers[o.tag].transport(o.rid) === "datachannel", { tag, rid }, 15_000);
        console.log(`# ${name}: autoUpgrade (page only, ${pageOffers ? "page" : "rust"} offers) open in ${Date.now() - t0} ms`);
        await rustUpgraded(peer, me, mark);
        assert.equal(await rustTransport(peer, me), "DataChannel");
        await ev((o) => peers[o.tag].to(o.rid).emit("hi", 4), { tag, rid });
        const hi = await it.waitLine((l) => l.ev === "event" && l.peer === peer && l.name === "hi");
        assert.equal(hi.transport, "DataChannel");
        await ev((tag) => peers[tag].close(), tag);
      });
    }

    test("10,000 numbered events each way across upgrade, kills from both sides and re-upgrades", async () => {
      const rid = await it.rustPeer("wk", { rooms: ["wk"] });
      const me = (await ev((o) => mk("wk", { rooms: ["wk"], ...o }), { ...rtc, autoUpgrade: true, retryBackoff: 200 })).ok.id;
      await it.rustSees("wk", [me]);
      const N = 10_000;
      const send = (from, n) => Promise.all([
        ev((rid, from, n) => { for (let i = from; i < from + n; i++) peers.wk.to(rid).emit("num", i); }, rid, from, n),
        it.cmd({ cmd: "emit_n", peer: "wk", to: me, event: "num", n, start: from }, 120_000),
      ]);
      const q = N / 4;
      await send(0, q);
      await pageUntil((rid) => peers.wk.transport(rid) === "datachannel", rid);
      await send(q, q);
      // Browser side kill: pc.close(); dead-channel detection and the close bring both back.
      await ev((rid) => peers.wk.killDataChannel(rid), rid);
      await send(2 * q, q);
      await pageUntil((rid) => got.wk.filter((e) => e.local === "upgrade").length >= 2, rid, 30_000);
      // Rust side kill hook.
      await it.cmd({ cmd: "kill", peer: "wk", to: me });
      await send(3 * q, q);
      await pageUntil((rid) => got.wk.filter((e) => e.local === "upgrade").length >= 3, rid, 30_000);
      await until(() => it.events("wk", "num").length >= N, 120_000, "rust to get 10k events");
      await pageUntil((N) => got.wk.filter((e) => e.event === "num").length >= N, N, 120_000);
      assert.deepEqual(it.events("wk", "num").map((l) => l.data.json), [...Array(N).keys()]);
      const inPage = await ev(() => got.wk.filter((e) => e.event === "num").map((e) => e.data));
      assert.deepEqual(inPage, [...Array(N).keys()]);
      const transports = await ev(() => [...new Set(got.wk.filter((e) => e.event === "num").map((e) => e.transport))]);
      assert.ok(transports.includes("datachannel"), JSON.stringify(transports));
    });

    test("a stream of 16 MiB each way across an upgrade, complete and intact", async () => {
      const rid = await it.rustPeer("ws", { rooms: ["ws"] });
      const me = (await ev((o) => mk("ws", { rooms: ["ws"], ...o }), rtc)).ok.id;
      await it.rustSees("ws", [me]);
      const len = 16 << 20;
      const t0 = Date.now();
      const out = await ev(async (rid, len) => {
        const p = peers.ws;
        const s = await p.openStream(rid, `bytes:${len}`);
        const data = pattern(len);
        let written = 0, read = 0;
        const at = {};
        p.once("upgrade", () => { at.written = written; at.read = read; });
        const w = s.writable.getWriter();
        let upgrading = null;
        const writing = (async () => {
          for (let off = 0; off < len; off += 65536) {
            await w.write(data.subarray(off, off + 65536));
            written = off + 65536;
            // Upgrade once 1 MiB went over the relay; the rest crosses the switch.
            if (written === 1 << 20) upgrading = p.upgradePeer(rid);
          }
          await w.close();
        })();
        const chunks = [];
        for await (const c of s.readable) { chunks.push(c); read += c.length; }
        await writing;
        await upgrading;
        const all = new Uint8Array(read);
        let o = 0;
        for (const c of chunks) { all.set(c, o); o += c.length; }
        return { n: read, sha: await sha256(all), at, transport: p.transport(rid) };
      }, rid, len);
      console.log(`# ${name}: 16 MiB each way across an upgrade in ${Date.now() - t0} ms (upgraded after ${out.at.written} bytes written, ${out.at.read} read)`);
      assert.deepEqual({ n: out.n, sha: out.sha }, { n: len, sha: sha256(pattern(len)) });
      assert.equal(out.transport, "datachannel");
      // The channel opened with bytes still to go both ways.
      assert.ok(out.at.written >= 1 << 20 && out.at.written < len, JSON.stringify(out.at));
      assert.ok(out.at.read < len, JSON.stringify(out.at));
      const r = await it.waitLine((l) => l.ev === "stream" && l.peer === "ws", 60_000);
      assert.deepEqual([r.read, r.sha256, r.error], [len, sha256(pattern(len)), null]);
      assert.equal(await rustTransport("ws", me), "DataChannel");
    });

    test("numClients: the cap refuses one more with bye busy", async () => {
      const ra = await it.rustPeer("wc1", { rooms: ["wc"] });
      const rb = await it.rustPeer("wc2", { rooms: ["wc"] });
      const me = (await ev((o) => mk("wc", { rooms: ["wc"], ...o }), { ...rtc, numClients: 1 })).ok.id;
      await it.rustSees("wc1", [me]);
      await it.rustSees("wc2", [me]);
      await ev((ra) => peers.wc.upgradePeer(ra), ra);
      const err = await ev((rb) => peers.wc.upgradePeer(rb).then(() => "upgraded", (e) => e.code), rb);
      assert.equal(err, "UpgradeFailed");
      const r = await it.cmd({ cmd: "upgrade", peer: "wc2", to: me }, 15_000);
      assert.equal(r.ev, "error");
      const failed = await it.waitLine((l) => l.ev === "presence" && l.peer === "wc2" && l.type === "upgrade_failed");
      assert.match(failed.reason, /busy/);
      assert.equal(await ev((rb) => peers.wc.transport(rb), rb), "relay");
      assert.equal(await ev((rb) => peers.wc.to(rb).emitWithAck("echo", 9), rb), 9);
    });

    test("blocked WebRTC (no usable candidates) falls back to the relay within the upgrade timeout", async () => {
      const rid = await it.rustPeer("wb", { rooms: ["wb"] });
      const me = (await ev((o) => mk("wb", { rooms: ["wb"], ...o }), { ...rtc, upgradeTimeout: 2000, rtcConfig: { iceTransportPolicy: "relay" } })).ok.id;
      await it.rustSees("wb", [me]);
      const t0 = Date.now();
      const err = await ev((rid) => peers.wb.upgradePeer(rid).then(() => "upgraded", (e) => e.code), rid);
      const ms = Date.now() - t0;
      assert.equal(err, "UpgradeFailed");
      assert.ok(ms < 4000, `failed after ${ms} ms`);
      assert.equal(await ev((rid) => peers.wb.transport(rid), rid), "relay");
      assert.equal(await ev((rid) => peers.wb.to(rid).emitWithAck("echo", "still"), rid), "still");
      await it.cmd({ cmd: "emit", peer: "wb", to: me, event: "hi", data: 1 });
      await pageUntil(() => got.wb.some((e) => e.event === "hi" && e.transport === "relay"));
    });

    test("two tabs upgrade to each other; a Rust peer in the room sees the right transport for each", async () => {
      const rid = await it.rustPeer("wt", { rooms: ["wt"] });
      const page2 = await openPage(browser, it.url);
      try {
        const a = (await ev((o) => mk("ta", { rooms: ["wt"], ...o }), rtc)).ok.id;
        const b = (await page2.evaluate((o) => mk("tb", { rooms: ["wt"], ...o }), rtc)).ok.id;
        await pageUntil((b) => peers.ta.peers().some((p) => p.id === b), b);
        await page2.waitForFunction((a) => peers.tb.peers().some((p) => p.id === a), { timeout: 10_000 }, a);
        await it.rustSees("wt", [a, b]);
        const t0 = Date.now();
        await ev((b) => peers.ta.upgradePeer(b), b);
        console.log(`# ${name}: tab pair upgrade in ${Date.now() - t0} ms`);
        await page2.waitForFunction((a) => peers.tb.transport(a) === "datachannel", { timeout: 10_000, polling: 20 }, a);
        assert.equal(await ev((b) => peers.ta.transport(b), b), "datachannel");
        assert.equal(await ev((b) => peers.ta.to(b).emitWithAck("echo", "tab"), b), "tab");
        await page2.evaluate((a) => peers.tb.to(a).emit("hi", "from b"), a);
        await pageUntil((b) => got.ta.some((e) => e.event === "hi" && e.from === b && e.transport === "datachannel"), b);
        // Tab a also upgrades with the Rust peer; tab b stays on the relay with it.
        await ev((rid) => peers.ta.upgradePeer(rid), rid);
        await rustUpgraded("wt", a);
        assert.equal(await ev((rid) => peers.ta.transport(rid), rid), "datachannel");
        assert.equal(await page2.evaluate((rid) => peers.tb.transport(rid), rid), "relay");
        assert.equal(await rustTransport("wt", a), "DataChannel");
        assert.equal(await rustTransport("wt", b), "Relay");
        await ev((rid) => peers.ta.to(rid).emit("hi", "a"), rid);
        await page2.evaluate((rid) => peers.tb.to(rid).emit("hi", "b"), rid);
        const fromA = await it.waitLine((l) => l.ev === "event" && l.peer === "wt" && l.name === "hi" && l.from === a);
        const fromB = await it.waitLine((l) => l.ev === "event" && l.peer === "wt" && l.name === "hi" && l.from === b);
        assert.equal(fromA.transport, "DataChannel");
        assert.equal(fromB.transport, "Relay");
        await it.cmd({ cmd: "emit", peer: "wt", event: "hi", data: "to both" });
        await pageUntil((rid) => got.ta.some((e) => e.event === "hi" && e.from === rid), rid);
        await page2.waitForFunction((rid) => got.tb.some((e) => e.event === "hi" && e.from === rid), { timeout: 10_000 }, rid);
        assert.equal(await ev((rid) => got.ta.find((e) => e.event === "hi" && e.from === rid).transport, rid), "datachannel");
        assert.equal(await page2.evaluate((rid) => got.tb.find((e) => e.event === "hi" && e.from === rid).transport, rid), "relay");
        await page2.evaluate(() => peers.tb.close());
      } finally {
        await page2.close().catch(() => {});
      }
    });

    test("downgrade after heavy data-channel traffic with the page as answerer, repeated", async () => {
      // The page answers when its id is the larger one: make page peers until that holds.
      const rid = await it.rustPeer("wd", { rooms: ["wd"] });
      let me;
      for (let i = 0; ; i++) {
        me = (await ev((o, i) => mk(`wd${i}`, { rooms: ["wd"], ...o }), rtc, i)).ok.id;
        if (me > rid) {
          await ev((i) => (peers.wd = peers[`wd${i}`], got.wd = got[`wd${i}`]), i);
          break;
        }
        await ev((i) => peers[`wd${i}`].close(), i);
        assert.ok(i < 50);
      }
      await it.rustSees("wd", [me]);
      for (let round = 0; round < 5; round++) {
        const mark = it.lines.length;
        await ev((rid) => peers.wd.upgradePeer(rid), rid);
        const before = it.events("wd", "big").length;
        await ev((rid) => { for (let i = 0; i < 200; i++) peers.wd.to(rid).emit("big", pattern(16000)); }, rid);
        await it.cmd({ cmd: "emit_n", peer: "wd", to: me, event: "num", n: 2000 }, 60_000);
        await until(() => it.events("wd", "big").length >= before + 200, 60_000, "rust to get the burst");
        await ev((rid) => peers.wd.downgradePeer(rid), rid);
        await it.waitLine((l) => l.ev === "presence" && l.peer === "wd" && l.type === "downgraded" && it.lines.indexOf(l) >= mark, 10_000, "rust downgraded");
        assert.equal(await ev((rid) => peers.wd.transport(rid), rid), "relay");
        // The Rust peer answers over the relay at once.
        const r = await ev((rid) => peers.wd.timeout(5000).to(rid).emitWithAck("echo", "after"), rid);
        assert.equal(r, "after");
        assert.equal(await rustTransport("wd", me), "Relay");
      }
    });
  });
}

describe("a Chromium tab and a Firefox tab through the Rust server", { timeout: 120_000 }, () => {
  let it, chromium, firefox, pc, pf;
  before(async () => {
    it = await Interop.start(["--static", jsRoot]);
    [chromium, firefox] = await Promise.all([launch(browsers.chromium), launch(browsers.firefox)]);
    [pc, pf] = await Promise.all([openPage(chromium, it.url), openPage(firefox, it.url)]);
  });
  after(async () => {
    for (const p of [pc, pf]) await p?.evaluate(() => Object.values(peers).forEach((p) => p.close())).catch(() => {});
    await chromium?.close().catch(() => {});
    await firefox?.close().catch(() => {});
    await it?.stop();
  });

  test("they upgrade to each other from either side; a Rust peer in the room sees each on its transport", async () => {
    const rid = await it.rustPeer("xb", { rooms: ["xb"] });
    const c = (await pc.evaluate((o) => mk("x", { rooms: ["xb"], ...o }), rtc)).ok.id;
    const f = (await pf.evaluate((o) => mk("x", { rooms: ["xb"], ...o }), rtc)).ok.id;
    const wait = (page, fn, arg, ms = 15_000) => page.waitForFunction(fn, { timeout: ms, polling: 20 }, arg);
    await wait(pc, (f) => peers.x.peers().some((p) => p.id === f), f);
    await wait(pf, (c) => peers.x.peers().some((p) => p.id === c), c);
    for (const [from, to, toId, fromId, round] of [[pc, pf, f, c, 0], [pf, pc, c, f, 1]]) {
      const t0 = Date.now();
      await from.evaluate((id) => peers.x.upgradePeer(id), toId);
      console.log(`# chromium-firefox: upgrade started by ${from === pc ? "chromium" : "firefox"} (${fromId < toId ? "it offers" : "it answers"}) in ${Date.now() - t0} ms`);
      await wait(to, (id) => peers.x.transport(id) === "datachannel", fromId);
      assert.equal(await from.evaluate((id) => peers.x.to(id).emitWithAck("echo", "across"), toId), "across");
      await to.evaluate((o) => peers.x.to(o.id).emit("hi", o.round), { id: fromId, round });
      await wait(from, (o) => got.x.some((e) => e.event === "hi" && e.data === o.round && e.from === o.id && e.transport === "datachannel"), { id: toId, round });
      await from.evaluate((id) => peers.x.downgradePeer(id), toId);
      await wait(to, (id) => peers.x.transport(id) === "relay", fromId);
    }
    // Firefox also upgrades with the Rust peer; Chromium stays on the relay with it.
    await pf.evaluate((id) => peers.x.upgradePeer(id), rid);
    assert.equal((await it.cmd({ cmd: "transport", peer: "xb", to: f })).transport, "DataChannel");
    assert.equal((await it.cmd({ cmd: "transport", peer: "xb", to: c })).transport, "Relay");
    await it.cmd({ cmd: "emit", peer: "xb", event: "hi", data: "rust" });
    await wait(pf, (id) => got.x.some((e) => e.event === "hi" && e.from === id && e.transport === "datachannel"), rid);
    await wait(pc, (id) => got.x.some((e) => e.event === "hi" && e.from === id && e.transport === "relay"), rid);
  });
});
