// The relay suite in headless Chromium (CDP) and Firefox ESR (WebDriver BiDi), against the
// Rust server and Rust peers of the interop program, which also serves the page and the bundle.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { Interop, until, pattern, sha256 } from "../harness.mjs";
import { browsers, grantMedia, launch, openPage } from "./browsers.mjs";

const jsRoot = path.resolve(import.meta.dirname, "../..");

for (const [name, options] of Object.entries(browsers)) {
  describe(`relay suite in ${name}`, { timeout: 300_000 }, () => {
    let it, browser, page;
    const ev = (fn, ...args) => page.evaluate(fn, ...args);
    /** Waits in the page for `pred(got)` (a function source). */
    const pageUntil = async (pred, arg, ms = 30_000) => {
      await page.waitForFunction(pred, { timeout: ms, polling: 20 }, arg);
    };

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

    test("events both ways", async () => {
      const rid = await it.rustPeer("b1", { rooms: ["both"] });
      const r = await ev(() => mk("p1", { rooms: ["both"] }));
      const me = r.ok.id;
      await it.rustSees("b1", [me]);
      assert.deepEqual(await ev(() => peers.p1.peers()), [{ id: rid }]);
      await ev(() => peers.p1.emit("hi", { x: 1, s: "é" }));
      const got = await it.waitLine((l) => l.ev === "event" && l.peer === "b1" && l.name === "hi");
      assert.equal(got.from, me);
      assert.deepEqual(got.data, { json: { x: 1, s: "é" } });
      await it.cmd({ cmd: "emit", peer: "b1", to: me, event: "hi", data: [1, "two"] });
      await pageUntil(() => got.p1.some((e) => e.event === "hi"));
      const seen = await ev(() => got.p1.find((e) => e.event === "hi"));
      assert.deepEqual(seen, { event: "hi", from: rid, transport: "relay", data: [1, "two"] });
    });

    test("10,000 numbered events each way, complete and in order", async () => {
      const rid = await it.rustPeer("b10k", { rooms: ["tenk"] });
      const me = (await ev(() => mk("p10k", { rooms: ["tenk"] }))).ok.id;
      await it.rustSees("b10k", [me]);
      const N = 10_000;
      const t0 = Date.now();
      await ev((rid, N) => { for (let i = 0; i < N; i++) peers.p10k.to(rid).emit("num", i); }, rid, N);
      await it.cmd({ cmd: "emit_n", peer: "b10k", to: me, event: "num", n: N }, 120_000);
      await until(() => it.events("b10k", "num").length >= N, 120_000, "rust to get 10k events");
      await pageUntil((N) => got.p10k.filter((e) => e.event === "num").length >= N, N, 120_000);
      const ms = Date.now() - t0;
      assert.deepEqual(it.events("b10k", "num").map((l) => l.data.json), [...Array(N).keys()]);
      const inPage = await ev(() => got.p10k.filter((e) => e.event === "num").map((e) => e.data));
      assert.deepEqual(inPage, [...Array(N).keys()]);
      console.log(`# ${name}: 2 x ${N} events in ${ms} ms`);
    });

    test("targeted send reaches only its target", async () => {
      const rid = await it.rustPeer("bt", { rooms: ["target"] });
      const a = (await ev(() => mk("ta", { rooms: ["target"] }))).ok.id;
      const b = (await ev(() => mk("tb", { rooms: ["target"] }))).ok.id;
      await pageUntil(() => peers.ta.peers().length === 2 && peers.tb.peers().length === 2);
      await it.rustSees("bt", [a, b]);
      await it.cmd({ cmd: "emit", peer: "bt", to: a, event: "msg", data: "for a" });
      await ev((b, rid) => { peers.ta.to(b).emit("msg", "a to b"); peers.ta.to(rid).emit("msg", "a to rust"); }, b, rid);
      await it.waitLine((l) => l.ev === "event" && l.peer === "bt" && l.name === "msg");
      assert.equal(await ev((rid) => peers.ta.to(rid).emitWithAck("echo", 1), rid), 1);
      assert.equal(await ev((rid) => peers.tb.to(rid).emitWithAck("echo", 2), rid), 2);
      await pageUntil(() => got.ta.some((e) => e.event === "msg") && got.tb.some((e) => e.event === "msg"));
      const msgs = await ev(() => [got.ta, got.tb].map((l) => l.filter((e) => e.event === "msg").map((e) => [e.data, e.from])));
      assert.deepEqual(msgs, [[["for a", rid]], [["a to b", a]]]);
      assert.equal(it.events("bt", "msg").length, 1);
      assert.equal(it.events("bt", "msg")[0].from, a);
    });

    test("acks both ways with reply values and NoHandler", async () => {
      const rid = await it.rustPeer("ba", { rooms: ["acks"] });
      const me = (await ev(() => mk("pa", { rooms: ["acks"] }, {}, false))).ok.id;
      await it.rustSees("ba", [me]);
      const res = await ev(async (rid) => {
        const p = peers.pa;
        const out = {};
        out.echo = await p.to(rid).emitWithAck("echo", { a: [1, 2] });
        out.add = await p.to(rid).emitWithAck("add", [2, 3]);
        out.fail = await p.to(rid).emitWithAck("fail", 1).catch((e) => [e.code, e instanceof P2PError]);
        out.none = await p.to(rid).emitWithAck("nobody", 1).catch((e) => e.code);
        out.timeout = await p.timeout(200).to(rid).emitWithAck("hold", 1).catch((e) => e.code);
        out.cb = await new Promise((r) => p.to(rid).emit("echo", "cb", (err, reply) => r([err, reply])));
        return out;
      }, rid);
      assert.deepEqual(res, { echo: { a: [1, 2] }, add: 5, fail: ["Nope", true], none: "NoHandler", timeout: "Timeout", cb: [null, "cb"] });
      let r = await it.cmd({ cmd: "ack", peer: "ba", to: me, event: "echo", data: { deep: [true] } });
      assert.deepEqual(r.ok, { json: { deep: [true] } });
      r = await it.cmd({ cmd: "ack", peer: "ba", to: me, event: "add", data: [4, 5, 6] });
      assert.deepEqual(r.ok, { json: 15 });
      r = await it.cmd({ cmd: "ack", peer: "ba", to: me, event: "fail", data: 1 });
      assert.equal(r.code, "Nope");
      r = await it.cmd({ cmd: "ack", peer: "ba", to: me, event: "nobody-in-page", data: 1 });
      assert.equal(r.code, "NoHandler");
    });

    test("1 MiB binary each way, byte-exact", async () => {
      const rid = await it.rustPeer("bb", { rooms: ["bin"] });
      const me = (await ev(() => mk("pb", { rooms: ["bin"] }))).ok.id;
      await it.rustSees("bb", [me]);
      const MiB = 1 << 20;
      await ev((rid, n) => {
        peers.pb.to(rid).emit("bin", pattern(n).buffer);
        peers.pb.to(rid).emit("bin", new Blob([pattern(1000)]));
      }, rid, MiB);
      await until(() => it.events("bb", "bin").length === 2, 30_000, "binary at the Rust peer");
      assert.deepEqual(it.events("bb", "bin").map((l) => l.data), [
        { bin: MiB, sha256: sha256(pattern(MiB)) },
        { bin: 1000, sha256: sha256(pattern(1000)) },
      ]);
      await it.cmd({ cmd: "emit_bin", peer: "bb", to: me, event: "bin", len: MiB });
      await pageUntil(() => got.pb.some((e) => e.event === "bin" && e.sha256));
      const rec = await ev(() => got.pb.find((e) => e.event === "bin"));
      assert.deepEqual(rec, { event: "bin", from: rid, transport: "relay", bin: MiB, sha256: sha256(pattern(MiB)) });
    });

    test("pairing by uid in both roles; PeerOffline", async () => {
      const rid = await it.rustPeer("bp1", { uid: `${name}-rust-uid` });
      const r = await ev((u) => mk("pp1", { peerUid: u }), `${name}-rust-uid`);
      assert.equal(r.ok.pair.id, rid);
      assert.equal(await ev((rid) => peers.pp1.to(rid).emitWithAck("echo", "paired"), rid), "paired");
      const me = (await ev((u) => mk("pp2", { uid: u }), `${name}-page-uid`)).ok.id;
      const rid2 = await it.rustPeer("bp2", { peer_uid: `${name}-page-uid` });
      await pageUntil((rid2) => got.pp2.some((e) => e.local === "peer-paired" && e.peer === rid2), rid2);
      await it.cmd({ cmd: "emit", peer: "bp2", to: me, event: "hi", data: 1 });
      await pageUntil(() => got.pp2.some((e) => e.event === "hi"));
      const off = await ev(() => mk("pp3", { peerUid: "nobody-at-all", pairTimeout: 300 }));
      assert.deepEqual(off, { error: { code: "PeerOffline", isP2PError: true } });
      const taken = await ev((u) => mk("pp4", { uid: u }), `${name}-rust-uid`);
      assert.deepEqual(taken, { error: { code: "UidTaken", isP2PError: true } });
    });

    test("presence: joined, left, disconnected", async () => {
      const me = (await ev(() => mk("pr", { rooms: ["pres"] }))).ok.id;
      const rid = await it.rustPeer("bpr", { rooms: ["pres"] });
      await pageUntil((rid) => got.pr.some((e) => e.local === "peer-joined" && e.peer === rid), rid);
      await it.cmd({ cmd: "join", peer: "bpr", room: "pres2" });
      assert.deepEqual(await ev(() => peers.pr.join("pres2")), [{ id: rid }]);
      await it.cmd({ cmd: "leave", peer: "bpr", room: "pres2" });
      await pageUntil((rid) => got.pr.some((e) => e.local === "peer-left" && e.peer === rid && e.room === "pres2"), rid);
      await ev(() => peers.pr.leave("pres2"));
      await it.cmd({ cmd: "close", peer: "bpr" });
      await pageUntil((rid) => got.pr.some((e) => e.local === "peer-disconnected" && e.peer === rid), rid);
      assert.deepEqual(await ev(() => peers.pr.peers()), []);
      assert.ok(me);
    });

    test("a stream of 4 MiB each way with SHA-256, a service call each way, a topic", async () => {
      const rid = await it.rustPeer("bs", { rooms: ["bstream"] });
      const me = (await ev(() => mk("ps", { rooms: ["bstream"] }))).ok.id;
      await it.rustSees("bs", [me]);
      const len = 4 << 20;
      const out = await ev(async (rid, len) => {
        const s = await peers.ps.openStream(rid, `bytes:${len}`);
        const data = pattern(len);
        const w = s.writable.getWriter();
        const writing = (async () => {
          for (let off = 0; off < len; off += 65536) await w.write(data.subarray(off, off + 65536));
          await w.close();
        })();
        const chunks = [];
        let n = 0;
        for await (const c of s.readable) { chunks.push(c); n += c.length; }
        await writing;
        const all = new Uint8Array(n);
        let o = 0;
        for (const c of chunks) { all.set(c, o); o += c.length; }
        return { n, sha: await sha256(all) };
      }, rid, len);
      assert.deepEqual(out, { n: len, sha: sha256(pattern(len)) });
      const r = await it.waitLine((l) => l.ev === "stream" && l.peer === "bs", 60_000);
      assert.deepEqual([r.read, r.sha256], [len, sha256(pattern(len))]);
      await it.cmd({ cmd: "provide", peer: "bs", service: `${name}-calc` });
      assert.equal(await ev((svc) => peers.ps.service(svc).call("add", [2, 3]), `${name}-calc`), 5);
      await ev((svc) => peers.ps.provide(svc, { mul: ([a, b]) => a * b }), `${name}-page`);
      const c = await it.cmd({ cmd: "call", peer: "bs", service: `${name}-page`, method: "mul", args: [6, 7] });
      assert.equal(c.ok, 42);
      const pub = await ev(async (topic) => {
        const sub = await peers.ps.subscribe(topic);
        const n = await peers.ps.publish(topic, { hi: 1 });
        const first = await sub.next();
        await sub.unsubscribe();
        return [n, first.value.data, first.value.from.id];
      }, `${name}-news`);
      assert.deepEqual(pub, [1, { hi: 1 }, me]);
    });

    test("bad input from the page: typed errors; the Rust peer is unaffected", async () => {
      const rid = await it.rustPeer("bbad", { rooms: ["bad"] });
      const me = (await ev(() => mk("pbad", { rooms: ["bad"] }))).ok.id;
      await it.rustSees("bbad", [me]);
      const codes = await ev(async (rid) => {
        const p = peers.pbad;
        const raw = p.socket;
        raw.emit("p2p:f", 42);
        raw.emit("p2p:f", new Uint8Array([5, 1]));
        raw.emit("chat", "hi");
        const local = [];
        try { p.to("ghost").emit("x", 1); } catch (e) { local.push(e.code); }
        try { p.volatile.to(rid).emit("x", new Uint8Array(20000)); } catch (e) { local.push(e.code); }
        return local;
      }, rid);
      assert.deepEqual(codes, ["PeerOffline", "PayloadTooLarge"]);
      await pageUntil(() => got.pbad.filter((e) => e.local === "server-error").length >= 3);
      const errs = await ev(() => got.pbad.filter((e) => e.local === "server-error").map((e) => e.code));
      assert.deepEqual(errs, ["BadRequest", "BadRequest", "UnknownEvent"]);
      assert.equal(await ev((rid) => peers.pbad.to(rid).emitWithAck("echo", "still here"), rid), "still here");
      const r = await it.cmd({ cmd: "ack", peer: "bbad", to: me, event: "echo", data: "fine" });
      assert.deepEqual(r.ok, { json: "fine" });
    });
  });
}

describe("the chat page with a Rust chat peer", { timeout: 60_000 }, () => {
  let it, browser, dir;
  before(async () => {
    const { mkdtempSync, copyFileSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    dir = mkdtempSync(path.join(tmpdir(), "p2p-chat-"));
    copyFileSync(path.join(jsRoot, "examples/chat.html"), path.join(dir, "index.html"));
    copyFileSync(path.join(jsRoot, "dist/socketio-p2p.browser.js"), path.join(dir, "socketio-p2p.browser.js"));
    it = await Interop.start(["--static", dir]);
    browser = await launch(browsers.chromium);
  });
  after(async () => {
    await browser?.close().catch(() => {});
    await it?.stop();
    const { rmSync } = await import("node:fs");
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("lines go both ways, each saying who sent it and over which transport", async () => {
    const rid = await it.rustPeer("alice", { rooms: ["chat"], uid: "alice" });
    const page = await browser.newPage();
    await page.goto(`${it.url}/static/index.html?name=web`);
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("you are web"), { timeout: 20_000 });
    const pageId = await page.$eval("#status", (el) => el.textContent.match(/\((.+?)\)/)[1]);
    await it.rustSees("alice", [pageId]);
    await page.type("#line", "hello from the page");
    await page.keyboard.press("Enter");
    const got = await it.waitLine((l) => l.ev === "event" && l.peer === "alice" && l.name === "peer-msg");
    assert.deepEqual(got.data, { json: "hello from the page" });
    await it.cmd({ cmd: "emit", peer: "alice", event: "peer-msg", data: "hi web" });
    await page.waitForFunction(() => document.getElementById("log").textContent.includes("alice (via relay): hi web"), { timeout: 20_000 });
    const log = await page.$eval("#log", (el) => [...el.children].map((li) => li.textContent));
    assert.ok(log.includes("web (me): hello from the page"), JSON.stringify(log));
    assert.ok(log.includes("alice (via relay): hi web"), JSON.stringify(log));
    assert.ok(rid);
  });

  test("go private: everyone moves onto data channels and the lines say so (screenshot)", async () => {
    // alice (Rust, auto_upgrade off) is in the room from the previous case, with the page "web".
    await grantMedia(browser, it.url);
    const open = async (who) => {
      const page = await browser.newPage();
      await page.goto(`${it.url}/static/index.html?name=${who}`);
      await page.waitForFunction(() => window.chatReady && document.getElementById("status").textContent.startsWith("you are"), { timeout: 20_000, polling: 20 });
      return [page, await page.$eval("#status", (el) => el.textContent.match(/\((.+?)\)/)[1])];
    };
    const [p1, id1] = await open("carol");
    const [p2, id2] = await open("dave");
    const alice = await it.rustPeer("alice2", { rooms: ["chat"], uid: "alice2" });
    const everyone = [alice, id1, id2];
    for (const [p, me] of [[p1, id1], [p2, id2]]) {
      await p.waitForFunction((ids) => ids.every((id) => id === p2p.id || p2p.peers().some((q) => q.id === id)), { timeout: 20_000, polling: 20 }, everyone.filter((x) => x !== me));
    }
    await it.rustSees("alice2", [id1, id2]);
    await p1.bringToFront();
    await p1.click("#private");
    // Every pair of the three is on a data channel: the pages started (alice2 answers).
    for (const [p, others] of [[p1, [alice, id2]], [p2, [alice, id1]]]) {
      await p.waitForFunction((ids) => ids.every((id) => p2p.transport(id) === "datachannel"), { timeout: 20_000, polling: 20 }, others);
    }
    assert.equal((await it.cmd({ cmd: "transport", peer: "alice2", to: id1 })).transport, "DataChannel");
    assert.equal((await it.cmd({ cmd: "transport", peer: "alice2", to: id2 })).transport, "DataChannel");
    await it.cmd({ cmd: "emit", peer: "alice2", event: "peer-msg", data: "hello in private" });
    await p2.bringToFront();
    await p2.type("#line", "dave here, privately");
    await p2.keyboard.press("Enter");
    const logHas = (p, text) => p.waitForFunction((t) => document.getElementById("log").textContent.includes(t), { timeout: 20_000, polling: 20 }, text);
    await logHas(p1, "alice2 (via data channel): hello in private");
    await logHas(p1, "dave (via data channel): dave here, privately");
    await logHas(p2, "alice2 (via data channel): hello in private");
    const fromDave = await it.waitLine((l) => l.ev === "event" && l.peer === "alice2" && l.name === "peer-msg" && l.from === id2);
    assert.equal(fromDave.transport, "DataChannel");
    await p2.type("#line", "/peers");
    await p2.keyboard.press("Enter");
    await logHas(p2, "alice2 (via data channel)");
    const { tmpdir } = await import("node:os");
    await p1.bringToFront();
    const shot = path.join(tmpdir(), "socketio-p2p-chat-private.png");
    await p1.screenshot({ path: shot, fullPage: true });
    console.log(`# chat page after going private: ${shot}`);
    const lines = await p1.$eval("#log", (el) => [...el.children].map((li) => li.textContent));
    assert.ok(lines.includes("going private: upgrading everyone to WebRTC data channels"), JSON.stringify(lines));
    assert.ok(lines.filter((l) => l.startsWith("data channel open with")).length >= 2, JSON.stringify(lines));
    await p1.close();
    await p2.close();
  });
});
