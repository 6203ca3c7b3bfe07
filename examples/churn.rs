//! Churn: `--cycles N` (default 10,000) times, a peer connects, upgrades to a data channel
//! with a long-lived peer, exchanges one event over it and disconnects. `--parallel K`
//! (default 16) lanes run at once, each with its own long-lived peer and its cycles one after
//! the other, so that every cycle still checks that its peer and its RTCPeerConnection are
//! gone before the next starts. Prints one JSON object (`{"churn": {...}}`): cycles per
//! second, the process's RSS after a warm-up and at the end (server and peers share the
//! process), tokio tasks, live RTCPeerConnections and the server's peers at the end. Exits
//! non-zero if anything is left over or memory grew by more than 5%.
//!
//! `cargo run --release -p socketio-p2p-examples --example churn -- --cycles 10000`
//!
//! Loopback only (127.0.0.1), no STUN, no mDNS.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use socketio_p2p::{P2p, P2pOptions, Transport};
use socketio_p2p_tests::{rss_kib, spawn_server, wait_until};

/// Options of the peers of lane `lane` (a room of its own: they meet only each other).
fn opts(lane: u64) -> P2pOptions {
    P2pOptions::default()
        .loopback_only()
        .auto_upgrade(false)
        .room(format!("lane-{lane}"))
        // On a loaded machine (2 cores shared with other work) an upgrade can take more
        // than the default 5 s: that is slowness, not the leak this run looks for.
        .upgrade_timeout(Duration::from_secs(30))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One cycle: connect, upgrade, one event over the data channel, disconnect, gone (from
/// `a`, the lane's long-lived peer, which meets no one else).
async fn cycle(url: &str, lane: u64, a: &P2p, i: u64) -> Result<(), Box<dyn std::error::Error>> {
    let b = P2p::connect(url, opts(lane)).await?;
    let bid = b.id().to_owned();
    if !wait_until(10, || async {
        a.peers().await.is_ok_and(|p| p.iter().any(|p| p.id == bid))
    })
    .await
    {
        return Err(format!("cycle {i}: the new peer never showed up").into());
    }
    a.upgrade_peer(&bid).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    b.once("x", move |ev| {
        let _ = tx.send(ev.transport());
    });
    a.to(&bid).emit("x", json!(i)).await?;
    let t = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
    if t != Some(Transport::DataChannel) {
        return Err(format!("cycle {i}: event over {t:?}").into());
    }
    b.close().await;
    drop(b);
    if !wait_until(10, || async {
        a.peers().await.is_ok_and(|p| p.is_empty())
            && a.webrtc_connections().await.is_ok_and(|n| n == 0)
    })
    .await
    {
        return Err(format!("cycle {i}: the peer or its connection never went away").into());
    }
    Ok(())
}

/// Runs cycles `first, first + lanes, ...` below `end` in the lane of `a`.
async fn lane(url: String, a: P2p, first: u64, lanes: u64, end: u64) -> Result<(), String> {
    let mut i = first;
    while i < end {
        cycle(&url, first % lanes, &a, i)
            .await
            .map_err(|e| e.to_string())?;
        i += lanes;
    }
    Ok(())
}

/// Runs cycles `from..to` in every lane at once; the first failure stops the run.
async fn run_lanes(
    url: &str,
    lanes: &[P2p],
    from: u64,
    to: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let k = lanes.len() as u64;
    let mut set = tokio::task::JoinSet::new();
    for (n, a) in lanes.iter().enumerate() {
        set.spawn(lane(url.to_owned(), a.clone(), from + n as u64, k, to));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cycles = arg("--cycles", 10_000);
    let parallel = arg("--parallel", 16).max(1);
    let warmup = arg("--warmup", 200.min(cycles / 10));
    let s = spawn_server().await;
    let url = s.url();
    let mut lanes = Vec::new();
    for n in 0..parallel {
        lanes.push(P2p::connect(&url, opts(n)).await?);
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_idle = metrics.num_alive_tasks();
    run_lanes(&url, &lanes, 0, warmup).await?;
    // Start and end are both measured once the cycles' last tasks have ended.
    wait_until(20, || async { metrics.num_alive_tasks() <= tasks_idle }).await;
    let rss_start = rss_kib();
    let tasks_start = metrics.num_alive_tasks();
    let started = Instant::now();
    let rss_max = Arc::new(AtomicU64::new(rss_start));
    let sampler = tokio::spawn({
        let rss_max = rss_max.clone();
        async move {
            loop {
                rss_max.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    });
    let result = run_lanes(&url, &lanes, 0, cycles).await;
    sampler.abort();
    result?;
    let rss_max = rss_max.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let live = || socketio_p2p::live_webrtc_connections();
    // Every task a cycle started is gone: back to the count before the first cycle.
    let drained = wait_until(20, || async {
        live() == 0 && metrics.num_alive_tasks() <= tasks_idle
    })
    .await;
    let rss_end = rss_kib();
    let growth = rss_end as f64 / rss_start.max(1) as f64 - 1.0;
    let server_peers = s.signaling.peers().len();
    let ok = drained && live() == 0 && server_peers == parallel as usize && growth <= 0.05;
    println!(
        "{}",
        json!({"churn": {
            "cycles": cycles,
            "parallel": parallel,
            "warmup_cycles": warmup,
            "secs": (secs * 10.0).round() / 10.0,
            "cycles_per_sec": (cycles as f64 / secs * 10.0).round() / 10.0,
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_kib_max": rss_max.max(rss_end),
            "rss_growth_percent": (growth * 1000.0).round() / 10.0,
            "tasks_idle": tasks_idle,
            "tasks_start": tasks_start,
            "tasks_end": metrics.num_alive_tasks(),
            "live_webrtc_connections_end": live(),
            "server_peers_end": server_peers,
            "ok": ok,
        }})
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
