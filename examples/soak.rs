//! Soak: six peers exchange numbered events, acks, binary and byte streams for `--minutes`
//! while data channels are killed, client connections are cut and the server is restarted,
//! then every number is checked: nothing lost, duplicated or reordered. Prints one JSON
//! object (`{"soak": {...}}`) and exits non-zero if any check fails.
//!
//! `cargo run --release -p socketio-p2p-examples --example soak -- --minutes 2`
//!
//! `--impaired`: every Socket.IO connection goes through a forwarder that holds data 20 ms in
//! each direction, and 2% of UDP packets (the data channels) are dropped by an nft table
//! (only inside a network namespace of its own: run it in `unshare -n`; elsewhere the loss
//! is left out, and the JSON says so).
//!
//! Loopback only (127.0.0.1), no STUN, no mDNS.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use socketio_p2p::{Error, P2p, P2pOptions, Payload};
use socketio_p2p_tests::{CrashableServer, Cutter, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PEERS: usize = 6;

/// What the receivers saw, per (sender, receiver) pair.
#[derive(Default)]
struct Seen {
    /// Next number expected from each sender.
    next: HashMap<(usize, usize), u64>,
    duplicated: u64,
    reordered: u64,
    bad_binary: u64,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acks: AtomicU64,
    ack_failures: AtomicU64,
    ack_kinds: Mutex<HashMap<&'static str, u64>>,
    streams: AtomicU64,
    stream_failures: AtomicU64,
    dc_killed: AtomicU64,
    cuts: AtomicU64,
    restarts: AtomicU64,
    upgrades: AtomicU64,
    downgrades: AtomicU64,
    /// Reconnections that came back as a new peer (resume not granted).
    fresh_reconnects: AtomicU64,
    /// Peers reported gone (`PeerEvent::Disconnected`) to one of ours.
    peers_gone: AtomicU64,
}

fn opts() -> P2pOptions {
    P2pOptions::default()
        .loopback_only()
        .auto_upgrade(true)
        .room("soak")
        .reconnect_delay(Duration::from_millis(50), Duration::from_millis(500))
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(2))
}

/// A small deterministic generator (no dependency, same run every time).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Least-squares slope of (minutes, KiB) samples.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

fn wire_receiver(i: usize, p: &P2p, index: Arc<HashMap<String, usize>>, seen: Arc<Mutex<Seen>>) {
    p.on("n", move |ev| {
        let Some(from) = index.get(ev.from()).copied() else {
            return;
        };
        let n = match ev.payload() {
            Payload::Json(v) => v.as_u64(),
            Payload::Binary(b) if b.len() >= 40 => {
                let (head, body) = b.split_at(8);
                let sum = Sha256::digest(&body[32..]);
                if sum.as_slice() != &body[..32] {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).bad_binary += 1;
                }
                head.try_into().ok().map(u64::from_be_bytes)
            }
            _ => None,
        };
        let Some(n) = n else { return };
        let mut guard = seen.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let next = s.next.entry((from, i)).or_insert(0);
        if n == *next {
            *next += 1;
        } else if n < *next {
            s.duplicated += 1;
        } else {
            s.reordered += 1;
            *next = n + 1;
        }
    });
    p.on("ask", |ev| {
        let v = ev.decode_json::<u64>().unwrap_or(0);
        ev.reply(json!(v + 1));
    });
}

fn binary(n: u64, len: usize) -> Payload {
    let body: Vec<u8> = (0..len).map(|k| (k as u64 ^ n) as u8).collect();
    let mut out = n.to_be_bytes().to_vec();
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Payload::Binary(Bytes::from(out))
}

/// Sends numbered events from `i` to `j` until `stop`; returns how many went out.
async fn sender(
    i: usize,
    j: usize,
    peers: Arc<Vec<P2p>>,
    stop: Instant,
    counts: Arc<Counts>,
) -> u64 {
    let to = peers[j].id().to_owned();
    let mut n = 0u64;
    let mut rng = Rng(0x9E37_79B9 ^ ((i * 31 + j) as u64) << 3 | 1);
    while Instant::now() < stop {
        let payload = if rng.below(10) == 0 {
            binary(n, 1 + rng.below(40_000) as usize)
        } else {
            Payload::Json(json!(n))
        };
        match peers[i].to(&to).emit("n", payload).await {
            Ok(()) => {
                n += 1;
                counts.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Reconnecting: the same number goes again a moment later.
            Err(Error::QueueFull(_)) | Err(Error::PeerOffline(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                eprintln!("soak: {i}->{j} emit failed: {e}");
                return n;
            }
        }
        if rng.below(50) == 0 {
            let r = peers[i]
                .to(&to)
                .timeout(Duration::from_secs(5))
                .emit_with_ack("ask", json!(n))
                .await;
            match r.map(|p| p.decode_json::<u64>()) {
                Ok(Ok(v)) if v == n + 1 => {
                    counts.acks.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    counts.ack_failures.fetch_add(1, Ordering::Relaxed);
                    let kind = match other {
                        Err(Error::Timeout(_)) => "timeout",
                        Err(Error::PeerOffline(_)) => "peer_offline",
                        Err(Error::QueueFull(_)) => "queue_full",
                        Err(_) => "other",
                        Ok(_) => "wrong_answer",
                    };
                    let mut k = counts.ack_kinds.lock().unwrap_or_else(|e| e.into_inner());
                    *k.entry(kind).or_insert(0) += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
    }
    n
}

/// Opens a stream from `i` to `j`, sends `len` bytes and checks the other side's hash.
async fn stream_once(i: usize, j: usize, peers: &[P2p], len: usize, counts: &Counts) {
    let data: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
    let want = Sha256::digest(&data);
    let run = async {
        let mut s = peers[i].open_stream(peers[j].id(), "soak").await?;
        s.write_all(&data).await.map_err(|e| Error::Remote {
            code: "io".into(),
            message: e.to_string(),
        })?;
        s.shutdown().await.map_err(|e| Error::Remote {
            code: "io".into(),
            message: e.to_string(),
        })?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.map_err(|e| Error::Remote {
            code: "io".into(),
            message: e.to_string(),
        })?;
        Ok::<_, Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(back)) if back == want.as_slice() => counts.streams.fetch_add(1, Ordering::Relaxed),
        _ => counts.stream_failures.fetch_add(1, Ordering::Relaxed),
    };
}

/// Every peer hashes what a stream brings and sends the hash back.
fn serve_streams(p: &P2p) {
    let p = p.clone();
    tokio::spawn(async move {
        while let Some(inc) = p.accept_stream().await {
            tokio::spawn(async move {
                let Ok(mut s) = inc.accept() else { return };
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&Sha256::digest(&data)).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
}

/// Injects one random fault every `every`.
async fn faults(
    peers: Arc<Vec<P2p>>,
    cutter: Arc<Cutter>,
    server: Arc<Mutex<CrashableServer>>,
    port: u16,
    stop: Instant,
    counts: Arc<Counts>,
) {
    let mut rng = Rng(0xDEAD_BEEF);
    let every = Duration::from_secs(3);
    while Instant::now() + every < stop {
        tokio::time::sleep(every).await;
        let (i, j) = (
            rng.below(PEERS as u64) as usize,
            rng.below(PEERS as u64) as usize,
        );
        if i == j {
            continue;
        }
        match rng.below(10) {
            0..=3 => {
                let _ = peers[i].kill_data_channel(peers[j].id());
                counts.dc_killed.fetch_add(1, Ordering::Relaxed);
            }
            4..=5 => {
                if verbose() {
                    eprintln!("soak: cutting every connection");
                }
                cutter.cut();
                counts.cuts.fetch_add(1, Ordering::Relaxed);
            }
            6 => {
                let restarted = tokio::task::spawn_blocking({
                    let server = server.clone();
                    move || {
                        let t = Instant::now();
                        let mut s = server.lock().unwrap_or_else(|e| e.into_inner());
                        s.kill();
                        *s = CrashableServer::start(port);
                        eprintln!("soak: server restarted in {:?}", t.elapsed());
                    }
                })
                .await;
                if restarted.is_ok() {
                    counts.restarts.fetch_add(1, Ordering::Relaxed);
                }
            }
            7 => {
                if peers[i].downgrade_peer(peers[j].id()).await.is_ok() {
                    counts.downgrades.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                let (p, id) = (peers[i].clone(), peers[j].id().to_owned());
                counts.upgrades.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move { p.upgrade_peer(&id).await });
            }
        }
    }
}

/// `--verbose`: say when each fault comes.
fn verbose() -> bool {
    std::env::args().any(|a| a == "--verbose")
}

fn minutes_arg() -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0)
}

/// A forwarder to `target` that holds every chunk `delay` long, in each direction (there
/// is no netem on every kernel). Returns its URL.
async fn delaying_forwarder(
    target: std::net::SocketAddr,
    delay: Duration,
) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed_pipe(cr, sw, delay));
            tokio::spawn(delayed_pipe(sr, cw, delay));
        }
    });
    Ok(url)
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (order kept).
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

const LOSS_TABLE: &str = "p2p_soak_loss";

/// An nft table dropping `percent`% of UDP packets in this network namespace; removed on drop.
struct UdpLoss;

impl UdpLoss {
    fn install(percent: u32) -> Result<UdpLoss, String> {
        let private = std::fs::read_to_string("/proc/net/dev")
            .map(|t| {
                t.lines()
                    .skip(2)
                    .filter_map(|l| l.split(':').next())
                    .all(|n| n.trim() == "lo")
            })
            .unwrap_or(false);
        if !private {
            return Err("not in a loopback-only network namespace".into());
        }
        let script = format!(
            "table inet {LOSS_TABLE} {{\n chain input {{\n  type filter hook input priority 0; \
             policy accept;\n  meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n}}\n"
        );
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(UdpLoss)
    }
}

impl Drop for UdpLoss {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", LOSS_TABLE])
            .status();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let minutes = minutes_arg();
    let impaired = std::env::args().any(|a| a == "--impaired");
    let server = CrashableServer::start(0);
    let port = server.addr.port();
    let server = Arc::new(Mutex::new(server));
    let cutter = Arc::new(Cutter::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await);
    let (url, loss) = if impaired {
        let cut_addr: std::net::SocketAddr = cutter
            .url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()?;
        let url = delaying_forwarder(cut_addr, Duration::from_millis(20)).await?;
        let loss = UdpLoss::install(2);
        if let Err(why) = &loss {
            eprintln!("soak: no UDP loss ({why})");
        }
        (url, loss.ok())
    } else {
        (cutter.url(), None)
    };
    let mut peers = Vec::new();
    for _ in 0..PEERS {
        peers.push(P2p::connect(&url, opts()).await?);
    }
    let index: Arc<HashMap<String, usize>> = Arc::new(
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id().to_owned(), i))
            .collect(),
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    for (i, p) in peers.iter().enumerate() {
        wire_receiver(i, p, index.clone(), seen.clone());
        serve_streams(p);
        // None of these may happen: every peer stays, under its first id.
        let c = counts.clone();
        p.on_peer_event(move |ev| match ev {
            socketio_p2p::PeerEvent::Reconnected { continued: false } => {
                c.fresh_reconnects.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "soak: {:.1}s: peer {i} came back as a new peer",
                    started.elapsed().as_secs_f64()
                );
            }
            socketio_p2p::PeerEvent::Disconnected { peer } => {
                c.peers_gone.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "soak: {:.1}s: peer {i} was told {} is gone",
                    started.elapsed().as_secs_f64(),
                    peer.id
                );
            }
            _ => {}
        });
    }
    let peers = Arc::new(peers);
    let stop = started + Duration::from_secs_f64(minutes * 60.0);

    let mut senders = Vec::new();
    for i in 0..PEERS {
        for j in 0..PEERS {
            if i != j {
                let (p, c) = (peers.clone(), counts.clone());
                senders.push(tokio::spawn(async move {
                    ((i, j), sender(i, j, p, stop, c).await)
                }));
            }
        }
    }
    let no_faults = std::env::args().any(|a| a == "--no-faults");
    let fault_stop = if no_faults { started } else { stop };
    let fault_task = tokio::spawn(faults(
        peers.clone(),
        cutter.clone(),
        server.clone(),
        port,
        fault_stop,
        counts.clone(),
    ));
    let stream_task = {
        let (peers, counts) = (peers.clone(), counts.clone());
        tokio::spawn(async move {
            let mut rng = Rng(0xC0FFEE);
            while Instant::now() < stop {
                let (i, j) = (
                    rng.below(PEERS as u64) as usize,
                    rng.below(PEERS as u64) as usize,
                );
                if i != j {
                    let len = 1 + rng.below(512 * 1024) as usize;
                    stream_once(i, j, &peers, len, &counts).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut rss = Vec::new();
    while Instant::now() < stop {
        rss.push((started.elapsed().as_secs_f64() / 60.0, rss_kib() as f64));
        tokio::time::sleep(
            Duration::from_secs(10).min(stop.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let mut sent: HashMap<(usize, usize), u64> = HashMap::new();
    for s in senders {
        let (pair, n) = s.await?;
        sent.insert(pair, n);
    }
    fault_task.await?;
    stream_task.await?;
    // Everything sent must arrive: wait for the stragglers (resends after the last fault).
    let all_in = |seen: &Seen| {
        sent.iter()
            .all(|(&(i, j), &n)| seen.next.get(&(i, j)).copied().unwrap_or(0) >= n)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all_in(&seen.lock().unwrap_or_else(|e| e.into_inner())) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (lost, duplicated, reordered, bad_binary) = {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        let lost: u64 = sent
            .iter()
            .map(|(&(i, j), &n)| n.saturating_sub(s.next.get(&(i, j)).copied().unwrap_or(0)))
            .sum();
        (lost, s.duplicated, s.reordered, s.bad_binary)
    };
    let c = &counts;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = json!({"soak": {
        "minutes": minutes,
        "impaired": if impaired {
            json!({"tcp_delay_ms_each_way": 20, "udp_loss_percent": if loss.is_some() { 2 } else { 0 }})
        } else {
            json!(false)
        },
        "peers": PEERS,
        "events": load(&c.sent),
        "lost": lost,
        "duplicated": duplicated,
        "reordered": reordered,
        "bad_binary": bad_binary,
        "acks": load(&c.acks),
        "ack_failures": load(&c.ack_failures),
        "ack_failures_by_kind": json!(*c.ack_kinds.lock().unwrap_or_else(|e| e.into_inner())),
        "fresh_reconnects": load(&c.fresh_reconnects),
        "peers_gone": load(&c.peers_gone),
        "streams": load(&c.streams),
        "stream_failures": load(&c.stream_failures),
        // After the first third of the run (connections, first upgrades, buffers).
        "rss_slope_kib_per_min": (slope(&rss[rss.len() / 3..]) * 10.0).round() / 10.0,
        // The same over the second half only: a slope that stays is growth, not warm-up.
        "rss_slope_kib_per_min_second_half": (slope(&rss[rss.len() / 2..]) * 10.0).round() / 10.0,
        "rss_kib_end": rss_kib(),
        "live_webrtc_connections": socketio_p2p::live_webrtc_connections(),
        "faults": {
            "data_channels_killed": load(&c.dc_killed),
            "connections_cut": load(&c.cuts),
            "server_restarts": load(&c.restarts),
            "downgrades": load(&c.downgrades),
            "upgrades": load(&c.upgrades),
        },
    }});
    drop(loss);
    println!("{report}");
    let ok = lost == 0 && duplicated == 0 && reordered == 0 && bad_binary == 0;
    for p in peers.iter() {
        p.close().await;
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
