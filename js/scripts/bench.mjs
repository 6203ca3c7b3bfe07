// Browser benchmarks of the JavaScript client against the Rust interop program (server and
// Rust peers), in headless Chromium and Firefox ESR, on loopback only (inside a fresh network
// namespace when we may create one). `npm run bench` (after `npm run build` and
// `cargo build -p socketio-p2p-examples --example interop`); `-- --json` prints one JSON
// object per scenario, as the Rust bench does; `-- --runs N` (default 100).
//
// Scenarios:
// - browser_upgrade, firefox_upgrade: a page and a Rust peer, `upgradePeer()` to the reply
//   of an `emitWithAck` over the new channel, `runs` times with each side as the offerer.
// - browser_pair_upgrade (two Chromium tabs), chromium_firefox_pair_upgrade: the same between
//   two pages through the Rust server, beside a baseline measured in the same run: the
//   browsers' own RTCPeerConnections, signaled as application events over the same relay
//   (`baseline`, `p50_ratio`).
// - browser_throughput, firefox_throughput: 64 MiB as 16 KiB binary events page -> Rust
//   peer over the data channel, timed until the Rust peer got the last one; the baseline is
//   the browser's bare RTCDataChannel to a bare webrtc-rs peer connection, in the same run.
// P2P_BENCH_SLOW=1 prints, for each upgrade run over 100 ms, its steps and the page's frames
// around the echo (what went out on which transport, and what came back).
// Uses the release build of the interop program when there is one
// (`cargo build --release -p socketio-p2p-examples --example interop`), or INTEROP_BIN.
import { spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const jsRoot = path.resolve(here, "..");
const args = process.argv.slice(2);
const json = args.includes("--json");
const runs = Number(args[args.indexOf("--runs") + 1]) || 100;
const only = args.includes("--only") ? args[args.indexOf("--only") + 1].split(",") : null;

if (!process.env.P2P_BENCH_NS && spawnSync("unshare", ["-n", "true"]).status === 0) {
  // Loopback only: re-run inside a network namespace of our own.
  const r = spawnSync("unshare", ["-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", process.execPath, fileURLToPath(import.meta.url), ...args], {
    stdio: "inherit",
    env: { ...process.env, P2P_BENCH_NS: "1" },
  });
  process.exit(r.status ?? 1);
}
if (!process.env.P2P_BENCH_NS) console.error("bench: cannot create a network namespace; running on the host's loopback");

// The release build of the interop program when there is one (the debug build's WebRTC stack is slow).
if (!process.env.INTEROP_BIN) {
  const { existsSync } = await import("node:fs");
  const target = process.env.CARGO_TARGET_DIR ?? path.resolve(jsRoot, "../target");
  for (const profile of ["release", "debug"]) {
    const bin = path.join(target, profile, "examples/interop");
    if (existsSync(bin)) {
      process.env.INTEROP_BIN = bin;
      break;
    }
  }
}
if (!json) console.error(`bench: ${process.env.INTEROP_BIN}`);
const { Interop } = await import(path.join(jsRoot, "test/harness.mjs"));
const { browsers, launch, openPage } = await import(path.join(jsRoot, "test/browser/browsers.mjs"));

const rtc = { autoUpgrade: false, iceServers: [] };
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};
const r1 = (x) => Math.round(x * 10) / 10;
const stats = (xs) => ({ runs: xs.length, p50_ms: r1(pct(xs, 50)), p99_ms: r1(pct(xs, 99)), min_ms: r1(Math.min(...xs)), max_ms: r1(Math.max(...xs)) });

function report(name, fields) {
  const o = { scenario: name, ...fields };
  if (json) console.log(JSON.stringify(o));
  else console.log(`${name}: ${Object.entries(fields).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ")}`);
}

/** A page peer (autoUpgrade off) in `room`. */
async function pagePeer(page, key, room) {
  const r = await page.evaluate((o) => mk(o.key, { rooms: [o.room], ...o.rtc }, {}, false), { key, room, rtc });
  return r.ok.id;
}

/**
 * One upgrade: `upgradePeer` until the echo came back over the channel, in ms (page clock),
 * with the times (from the start) at which each signal went out or came in and the channel
 * opened: where an upgrade spends its time.
 */
const upgradeOnce = (page, key, to) =>
  page.evaluate(async (o) => {
    const p = peers[o.key];
    if (!p.traced) {
      p.traced = true;
      const send = p.sendSignal.bind(p);
      const recv = p.onSignal.bind(p);
      // Only the signals of the pair measured (a bye of an earlier attempt with another peer may cross).
      p.sendSignal = (peer, s) => (peer === p.traceFor && p.trace?.push([`out:${s.type}`, performance.now()]), send(peer, s));
      p.onSignal = (m) => (m?.from === p.traceFor && p.trace?.push([`in:${m?.signal?.type}`, performance.now()]), recv(m));
      p.on("upgrade", () => p.trace?.push(["open", performance.now()]));
    }
    p.trace = [];
    p.traceFor = o.to;
    const t0 = performance.now();
    await p.upgradePeer(o.to);
    const log = [];
    if (o.debug) {
      const st = p["peersById"].get(o.to);
      const send = st.rtc.send.bind(st.rtc);
      st.rtc.send = (f, v) => (log.push([`dc-send ${f.length} open=${st.rtc.isOpen}`, performance.now() - t0]), send(f, v));
      const sb = p.sendBatches.bind(p);
      p.sendBatches = (fs) => (log.push([`relay-send ${fs.length}`, performance.now() - t0]), sb(fs));
      const dl = p.deliver.bind(p);
      p.deliver = (a, d, v, via) => (log.push([`deliver ${d.type} via ${via}`, performance.now() - t0]), dl(a, d, v, via));
      const cf = p.onChannelFrame.bind(p);
      p.onChannelFrame = (a, b) => (log.push([`dc-in ${b.length}`, performance.now() - t0]), cf(a, b));
      log.push([`echo rto=${st.link.rto} srtt=${st.link.srtt} rtoAt=${st.link.rtoAt === null ? null : Math.round(st.link.rtoAt - performance.now())}`, performance.now() - t0]);
    }
    await p.to(o.to).emitWithAck("echo", 1);
    const ms = performance.now() - t0;
    if (o.debug) {
      const st = p["peersById"].get(o.to);
      delete st.rtc.send;
      delete p.sendBatches;
      delete p.deliver;
      delete p.onChannelFrame;
    }
    if (p.transport(o.to) !== "datachannel") throw new Error("not on the data channel");
    const trace = {};
    for (const [what, t] of p.trace) if (!(what in trace)) trace[what] = Math.round((t - t0) * 10) / 10;
    p.trace = null;
    p.downgradePeer(o.to);
    return { ms, trace, log };
  }, { key, to, debug: !!process.env.P2P_BENCH_SLOW });

/** The median time of each step of the traces. */
function phases(traces) {
  const keys = new Set(traces.flatMap((t) => Object.keys(t)));
  const out = {};
  for (const k of keys) {
    const xs = traces.map((t) => t[k]).filter((x) => x !== undefined);
    out[k] = r1(pct(xs, 50));
  }
  return Object.fromEntries(Object.entries(out).sort((a, b) => a[1] - b[1]));
}

async function browserRust(it, browserName, scenario) {
  const browser = await launch(browsers[browserName]);
  try {
    const page = await openPage(browser, it.url);
    const room = `${scenario}-room`;
    let me = await pagePeer(page, "b", room);
    // One Rust peer of each role: the smaller id offers.
    const rust = {};
    for (let i = 0; !(rust.page && rust.rust); i++) {
      if (i > 60) throw new Error("no Rust peer ids of both orders");
      if (i % 10 === 9) {
        // Our id may be near an end of the alphabet: start over with a new page peer.
        for (const r of Object.values(rust)) await it.cmd({ cmd: "close", peer: r.name });
        for (const k of Object.keys(rust)) delete rust[k];
        await page.evaluate(() => peers.b.close());
        me = await pagePeer(page, "b", room);
      }
      const name = `${scenario}-${i}`;
      const id = await it.rustPeer(name, { rooms: [`${room}-lobby`] });
      const role = me < id ? "page" : "rust";
      if (rust[role]) await it.cmd({ cmd: "close", peer: name });
      else {
        rust[role] = { name, id };
        await it.cmd({ cmd: "join", peer: name, room });
      }
    }
    await page.waitForFunction((ids) => ids.every((id) => peers.b.peers().some((p) => p.id === id)), { timeout: 10_000 }, [rust.page.id, rust.rust.id]);
    const times = { page: [], rust: [] };
    const traces = { page: [], rust: [] };
    for (let i = 0; i < runs; i++) {
      for (const role of ["page", "rust"]) {
        const { name, id } = rust[role];
        const mark = it.lines.length;
        const r = await upgradeOnce(page, "b", id);
        if (process.env.P2P_BENCH_SLOW && r.ms > 100) console.error(`bench: slow run ${role} ${r.ms} ms ending ${new Date().toISOString()} ${JSON.stringify(r.trace)} ${JSON.stringify(r.log.map(([w, t]) => `${w}@${Math.round(t * 10) / 10}`))}`);
        times[role].push(r.ms);
        traces[role].push(r.trace);
        // The Rust peer is back on the relay before the next attempt.
        await it.waitLine((l) => l.ev === "presence" && l.peer === name && l.type === "downgraded" && it.lines.indexOf(l) >= mark, 10_000, "downgraded");
      }
    }
    const all = [...times.page, ...times.rust];
    // Runs over 100 ms by role, and the steps of the slow and the fast runs (Rust offering).
    const slow = (role) => times[role].filter((x) => x > 100).length;
    const split = (pred) => phases(traces.rust.filter((_, i) => pred(times.rust[i])));
    report(scenario, {
      ...stats(all),
      page_offers: { ...stats(times.page), over_100_ms: slow("page"), steps_ms: phases(traces.page) },
      rust_offers: { ...stats(times.rust), over_100_ms: slow("rust"), steps_ms: split(() => true) },
      ...(slow("rust") ? { rust_offers_slow_steps_ms: split((x) => x > 100), rust_offers_fast_steps_ms: split((x) => x <= 100) } : {}),
    });
    await page.evaluate(() => Object.values(peers).forEach((p) => p.close()));
  } finally {
    await browser.close();
  }
}

/**
 * The baseline of a pair upgrade: the browsers' own RTCPeerConnections with nothing of ours
 * on the WebRTC side, the SDP and trickled candidates carried as application events over the
 * same Socket.IO relay; from `createOffer` to a reply over the new channel, in ms.
 */
const bareSignaling = (page, key) =>
  page.evaluate((key) => {
    const p = peers[key];
    if (p.bare) return;
    p.bare = { pcs: new Map() };
    const send = (to, m) => p.to(to).emit("bare-sig", m);
    const mkPc = (to) => {
      p.bare.pcs.get(to)?.close();
      const pc = new RTCPeerConnection({ iceServers: [] });
      pc.onicecandidate = (e) => e.candidate && send(to, { c: e.candidate.toJSON() });
      p.bare.pcs.set(to, pc);
      return pc;
    };
    p.on("bare-sig", async (m, meta) => {
      const from = meta.from;
      if (m.offer) {
        const pc = mkPc(from);
        pc.ondatachannel = (e) => {
          p.bare.channel = e.channel;
          e.channel.onmessage = () => e.channel.send("pong");
        };
        await pc.setRemoteDescription({ type: "offer", sdp: m.offer });
        for (const c of p.bare.early?.get(from) ?? []) await pc.addIceCandidate(c);
        p.bare.early?.delete(from);
        await pc.setLocalDescription(await pc.createAnswer());
        send(from, { answer: pc.localDescription.sdp });
      } else if (m.answer) {
        await p.bare.pcs.get(from)?.setRemoteDescription({ type: "answer", sdp: m.answer });
      } else if (m.c) {
        const pc = p.bare.pcs.get(from);
        if (pc?.remoteDescription) await pc.addIceCandidate(m.c);
        else {
          p.bare.early ??= new Map();
          p.bare.early.set(from, [...(p.bare.early.get(from) ?? []), m.c]);
        }
      }
    });
  }, key);

const bareOnce = (page, key, to) =>
  page.evaluate(async (o) => {
    const p = peers[o.key];
    const t0 = performance.now();
    const pc = new RTCPeerConnection({ iceServers: [] });
    pc.onicecandidate = (e) => e.candidate && p.to(o.to).emit("bare-sig", { c: e.candidate.toJSON() });
    p.bare.pcs.set(o.to, pc);
    const dc = pc.createDataChannel("bare");
    p.bare.dc = dc;
    const pong = new Promise((r) => (dc.onmessage = r));
    dc.onopen = () => dc.send("ping");
    await pc.setLocalDescription(await pc.createOffer());
    p.to(o.to).emit("bare-sig", { offer: pc.localDescription.sdp });
    const late = new Promise((_, no) => setTimeout(() => no(new Error(`bare pair: no reply in 10 s (${pc.signalingState}, ice ${pc.iceConnectionState}, channel ${dc.readyState})`)), 10_000));
    await Promise.race([pong, late]);
    const ms = performance.now() - t0;
    // The answerer closes its side when the next offer comes.
    pc.close();
    p.bare.pcs.delete(o.to);
    return ms;
  }, { key, to });

async function pagePair(it, names, scenario) {
  const opened = await Promise.all(names.map((n) => launch(browsers[n])));
  try {
    const [pa, pb] = await Promise.all(opened.map((b) => openPage(b, it.url)));
    const room = `${scenario}-room`;
    const a = await pagePeer(pa, "a", room);
    const b = await pagePeer(pb, "b", room);
    await pa.waitForFunction((b) => peers.a.peers().some((p) => p.id === b), { timeout: 10_000 }, b);
    await pb.waitForFunction((a) => peers.b.peers().some((p) => p.id === a), { timeout: 10_000 }, a);
    // Count the byes each page receives: a downgrade's bye goes through the server, slower
    // than the channel's close, and a late one would end the next attempt (a bye names no
    // attempt), so each run waits for it.
    for (const [p, key] of [[pa, "a"], [pb, "b"]]) {
      await p.evaluate((key) => {
        const q = peers[key];
        const recv = q.onSignal.bind(q);
        q.byes = 0;
        q.onSignal = (m) => (m?.signal?.type === "bye" && q.byes++, recv(m));
      }, key);
    }
    const times = [];
    const traces = [];
    for (let i = 0; i < runs; i++) {
      // Alternate the side that starts; the smaller id offers either way.
      const [p, key, to, other, okey, from] = i % 2 ? [pb, "b", a, pa, "a", b] : [pa, "a", b, pb, "b", a];
      const byes = await other.evaluate((okey) => peers[okey].byes, okey);
      const r = await upgradeOnce(p, key, to);
      times.push(r.ms);
      traces.push(r.trace);
      await other.waitForFunction((o) => peers[o.okey].byes > o.byes && peers[o.okey].transport(o.from) === "relay" && !peers[o.okey]["peersById"].get(o.from)?.neg?.active, { timeout: 10_000, polling: 5 }, { okey, from, byes });
    }
    if (!names.every((n) => n === "chromium")) {
      report(scenario, { ...stats(times), steps_ms: phases(traces) });
      return;
    }
    // The baseline in the same run: Chromium's own stack, the same pages and relay.
    await bareSignaling(pa, "a");
    await bareSignaling(pb, "b");
    const bare = [];
    for (let i = 0; i < runs; i++) {
      const [p, key, to] = i % 2 ? [pb, "b", a] : [pa, "a", b];
      bare.push(await bareOnce(p, key, to));
    }
    const base = stats(bare);
    report(scenario, { ...stats(times), steps_ms: phases(traces), baseline: base, p50_ratio: Math.round((pct(times, 50) / base.p50_ms) * 100) / 100 });
    for (const p of [pa, pb]) await p.evaluate(() => Object.values(peers).forEach((p) => p.close()));
  } finally {
    await Promise.all(opened.map((b) => b.close()));
  }
}

async function throughput(it, browserName, scenario) {
  const browser = await launch(browsers[browserName]);
  try {
    const page = await openPage(browser, it.url);
    const total = 64 << 20;
    const size = 16 << 10;
    const n = total / size;
    // Ours: binary events over an upgraded P2P, counted by the Rust peer (no other handler).
    const room = `${scenario}-room`;
    const rname = `${scenario}-rust`;
    const rid = await it.rustPeer(rname, { rooms: [room], handle: [] });
    await it.cmd({ cmd: "count", peer: rname, event: "tp", bytes: total });
    await pagePeer(page, "t", room);
    await page.waitForFunction((rid) => peers.t.peers().some((p) => p.id === rid), { timeout: 10_000 }, rid);
    await page.evaluate((rid) => peers.t.upgradePeer(rid), rid);
    let t0 = Date.now();
    await page.evaluate((o) => {
      const chunk = pattern(o.size);
      for (let i = 0; i < o.n; i++) peers.t.to(o.rid).emit("tp", chunk);
    }, { rid, n, size });
    const counted = await it.waitLine((l) => l.ev === "counted" && l.peer === rname, 600_000, "the last message");
    const ours = total / 1e6 / ((Date.now() - t0) / 1000);
    if (counted.transport !== "DataChannel") throw new Error(`last message came over ${counted.transport}`);
    await page.evaluate(() => Object.values(peers).forEach((p) => p.close()));
    // Baseline: the browser's bare RTCDataChannel to a bare webrtc-rs peer connection,
    // 16 KiB messages with bufferedAmount backpressure (1 MiB high, 256 KiB low).
    const offer = await page.evaluate(async () => {
      const pc = new RTCPeerConnection({ iceServers: [] });
      const dc = pc.createDataChannel("bench");
      dc.binaryType = "arraybuffer";
      window.raw = { pc, dc, open: new Promise((r) => (dc.onopen = r)) };
      await pc.setLocalDescription(await pc.createOffer());
      if (pc.iceGatheringState !== "complete") {
        await new Promise((r) => pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && r()));
      }
      return pc.localDescription.sdp;
    });
    const tag = `${scenario}-raw`;
    const ans = await it.cmd({ cmd: "raw_answer", sdp: offer, bytes: total, tag }, 30_000);
    if (ans.ev !== "done") throw new Error(`raw answer: ${JSON.stringify(ans)}`);
    await page.evaluate(async (sdp) => {
      await raw.pc.setRemoteDescription({ type: "answer", sdp });
      await raw.open;
    }, ans.sdp);
    t0 = Date.now();
    await page.evaluate(async (o) => {
      const { dc } = raw;
      const chunk = pattern(o.size);
      dc.bufferedAmountLowThreshold = 256 << 10;
      for (let i = 0; i < o.n; i++) {
        if (dc.bufferedAmount > 1 << 20) await new Promise((r) => (dc.onbufferedamountlow = r));
        dc.send(chunk);
      }
    }, { n, size });
    await it.waitLine((l) => l.ev === "raw_counted" && l.tag === tag, 600_000, "the baseline's last message");
    const base = total / 1e6 / ((Date.now() - t0) / 1000);
    await page.evaluate(() => raw.pc.close());
    report(scenario, { mb_per_s: r1(ours), baseline_mb_per_s: r1(base), ratio: Math.round((ours / base) * 100) / 100, messages: n, message_bytes: size });
  } finally {
    await browser.close();
  }
}

const scenarios = {
  browser_upgrade: (it) => browserRust(it, "chromium", "browser_upgrade"),
  firefox_upgrade: (it) => browserRust(it, "firefox", "firefox_upgrade"),
  browser_pair_upgrade: (it) => pagePair(it, ["chromium", "chromium"], "browser_pair_upgrade"),
  chromium_firefox_pair_upgrade: (it) => pagePair(it, ["chromium", "firefox"], "chromium_firefox_pair_upgrade"),
  browser_throughput: (it) => throughput(it, "chromium", "browser_throughput"),
  firefox_throughput: (it) => throughput(it, "firefox", "firefox_throughput"),
};

const it = await Interop.start(["--static", jsRoot]);
try {
  for (const [name, run] of Object.entries(scenarios)) {
    if (only && !only.includes(name)) continue;
    await run(it);
  }
} finally {
  await it.stop();
}
