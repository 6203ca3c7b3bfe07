//! Churn: `--cycles N` (default 10,000) times, a peer connects, upgrades to a data channel
//! with a long-lived peer, exchanges one event over it and disconnects. Prints one JSON object
//! (`{"churn": {...}}`): cycles per second, the process's RSS after a warm-up and at the end
//! (server and peers share the process), tokio tasks, live RTCPeerConnections and the
//! server's peers at the end. Exits non-zero if anything is left over or memory grew by more
//! than 5%.
//!
//! `cargo run --release -p socketio-p2p-examples --example churn -- --cycles 10000`
//!
//! Loopback only (127.0.0.1), no STUN, no mDNS.
use std::time::{Duration, Instant};

use serde_json::json;
use socketio_p2p::{P2p, P2pOptions, Transport};
use socketio_p2p_tests::{rss_kib, spawn_server, wait_until};

fn opts() -> P2pOptions {
    P2pOptions::default().loopback_only().auto_upgrade(false)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One cycle: connect, upgrade, one event over the data channel, disconnect, gone.
async fn cycle(url: &str, a: &P2p, i: u64) -> Result<(), Box<dyn std::error::Error>> {
    let b = P2p::connect(url, opts()).await?;
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cycles = arg("--cycles", 10_000);
    let warmup = arg("--warmup", 200.min(cycles / 10));
    let s = spawn_server().await;
    let url = s.url();
    let a = P2p::connect(&url, opts()).await?;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_idle = metrics.num_alive_tasks();
    for i in 0..warmup {
        cycle(&url, &a, i).await?;
    }
    let rss_start = rss_kib();
    let tasks_start = metrics.num_alive_tasks();
    let started = Instant::now();
    let mut rss_max = rss_start;
    for i in 0..cycles {
        cycle(&url, &a, i).await?;
        if i % 500 == 0 {
            rss_max = rss_max.max(rss_kib());
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let live = || socketio_p2p::live_webrtc_connections();
    let drained = wait_until(20, || async {
        live() == 0 && metrics.num_alive_tasks() <= tasks_start
    })
    .await;
    let rss_end = rss_kib();
    let growth = rss_end as f64 / rss_start.max(1) as f64 - 1.0;
    let server_peers = s.signaling.peers().len();
    let ok = drained && live() == 0 && server_peers == 1 && growth <= 0.05;
    println!(
        "{}",
        json!({"churn": {
            "cycles": cycles,
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
