//! Volatile really is volatile: with 10% of UDP packets dropped (nft `numgen random`, in the
//! test's own network namespace), volatile events over the data channel are lost rather than
//! resent or held back: none arrives later than 2 x RTT + the send interval, while reliable
//! events sent beside them all arrive, in order.
//!
//! One test in this binary on purpose: the drop rule covers every UDP packet on `lo`
//! (webrtc-rs picks its ports itself), and tests of one binary run in parallel.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use socketio_p2p::{Payload, Transport};
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

const TABLE: &str = "p2p_volatile_loss";

/// The nft table that drops 10% of UDP on input; removed on drop.
struct Loss;

impl Loss {
    /// None (with the reason) when nft is missing or not permitted here.
    fn install(percent: u32) -> Result<Loss, String> {
        let script = format!(
            "table inet {TABLE} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n}}\n"
        );
        let out = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(script.as_bytes())?;
                }
                child.wait_with_output()
            })
            .map_err(|e| format!("nft not runnable ({e})"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            // Only a missing permission (or nf_tables) skips; anything else is a bug here.
            assert!(
                why.contains("Operation not permitted") || why.contains("not supported"),
                "nft refused the table: {why}"
            );
            return Err(format!("nft refused the table: {why}"));
        }
        Ok(Loss)
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .status();
    }
}

/// Whether this process runs in a network namespace of its own (only loopback): never
/// install packet drops in the machine's namespace.
fn in_private_namespace() -> bool {
    // /proc/net/dev lists the interfaces of this process's namespace (/sys may not).
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| {
            t.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .all(|name| name.trim() == "lo")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_events_are_dropped_not_delayed_under_loss() {
    if !in_private_namespace() {
        eprintln!(
            "SKIPPED volatile_loss: not in a loopback-only network namespace (run the tests \
             in `unshare -n`); no packet drops are installed outside one"
        );
        return;
    }
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let b = peer(&s, rtc_opts()).await;
    wait_peers(&a, 1).await;
    a.upgrade_peer(b.id()).await.unwrap();
    assert!(
        wait_until(15, || async {
            b.transport(a.id()).await.ok() == Some(Transport::DataChannel)
        })
        .await
    );
    b.on("rtt", |ev| {
        ev.reply(ev.payload().clone());
    });
    // The round trip over the data channel, before any loss but under the same traffic as
    // below (volatile and reliable events every interval): the worst of the probes.
    let interval = Duration::from_millis(20);
    let mut rtt = Duration::ZERO;
    let mut tick = tokio::time::interval(interval);
    for i in 0..100u64 {
        tick.tick().await;
        a.to(b.id()).emit_volatile("w", json!(i)).await.unwrap();
        a.to(b.id()).emit("w", json!(i)).await.unwrap();
        if i % 5 == 0 {
            let t = Instant::now();
            let r = a.to(b.id()).emit_with_ack("rtt", json!(i)).await.unwrap();
            assert_eq!(r, Payload::Json(json!(i)));
            rtt = rtt.max(t.elapsed());
        }
    }
    let base = Instant::now();
    let (vtx, mut vrx) = mpsc::unbounded_channel();
    b.on("v", move |ev| {
        let at = base.elapsed();
        let (i, sent_us): (u64, u64) = ev.decode_json().unwrap();
        let _ = vtx.send((
            i,
            at.saturating_sub(Duration::from_micros(sent_us)),
            ev.transport(),
        ));
    });
    let (rtx, mut rrx) = mpsc::unbounded_channel();
    b.on("r", move |ev| {
        let _ = rtx.send(ev.decode_json::<u64>().unwrap());
    });

    let loss = match Loss::install(10) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED volatile_loss: {why} (scripts/setup installs nftables)");
            return;
        }
    };
    const N: u64 = 300;
    for i in 0..N {
        tick.tick().await;
        let sent_us = base.elapsed().as_micros() as u64;
        a.to(b.id())
            .emit_volatile("v", json!([i, sent_us]))
            .await
            .unwrap();
        a.to(b.id()).emit("r", json!(i)).await.unwrap();
    }
    // Every reliable event arrives, in order (the link and SCTP resend what was lost).
    for i in 0..N {
        let n = tokio::time::timeout(Duration::from_secs(60), rrx.recv())
            .await
            .expect("a reliable event never arrived")
            .unwrap();
        assert_eq!(n, i, "reliable events lost, duplicated or reordered");
    }
    // Anything volatile still on its way has had far longer than any bound by now.
    let t = Instant::now();
    assert!(
        wait_until(5, || async {
            a.to(b.id()).emit_with_ack("rtt", json!(0)).await.is_ok()
        })
        .await
    );
    let drained = t.elapsed();
    drop(loss);
    let mut got = Vec::new();
    while let Ok(v) = vrx.try_recv() {
        got.push(v);
    }
    // A run of lost SCTP packets can silence the reliable channel past `dc_timeout`: the
    // pair then falls back to the relay for a moment and volatile events go there (best
    // effort as well). The claims below are about the data channel's volatile path.
    let via_relay = got
        .iter()
        .filter(|(_, _, t)| *t != Transport::DataChannel)
        .count();
    let bound = rtt * 2 + interval;
    let late: Vec<_> = got
        .iter()
        .filter(|(_, lat, t)| *t == Transport::DataChannel && *lat > bound)
        .collect();
    let worst = got.iter().map(|(_, lat, _)| *lat).max().unwrap_or_default();
    let mut lats: Vec<Duration> = got.iter().map(|(_, lat, _)| *lat).collect();
    lats.sort();
    let p50 = lats.get(lats.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "{}",
        json!({"volatile_loss": {
            "loss_percent": 10,
            "sent": N,
            "volatile_delivered": got.len(),
            "volatile_p50_us": p50.as_micros() as u64,
            "volatile_worst_us": worst.as_micros() as u64,
            "bound_us": bound.as_micros() as u64,
            "rtt_worst_before_us": rtt.as_micros() as u64,
            "reliable_delivered_in_order": N,
            "volatile_via_relay": via_relay,
            "ack_after_reliable_ms": drained.as_millis() as u64,
        }})
    );
    // Each at most once, whatever carried it.
    let mut ids: Vec<u64> = got.iter().map(|(i, _, _)| *i).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "a volatile event arrived twice");
    if via_relay > 0 {
        // The pair fell back to the relay during the run (see above): the figures below
        // would mix both paths. Reliable delivery was checked; the rest needs a clean run.
        eprintln!(
            "volatile_loss: {via_relay} volatile events came over the relay after a fallback; \
             the data-channel bounds are not checked in this run"
        );
        return;
    }
    assert!(
        late.is_empty(),
        "volatile events later than {bound:?}: {late:?}"
    );
    // About 10% were lost, as the packets were: nothing was resent (binomial, 300 draws:
    // 97% delivered is 4 standard deviations above 90%).
    assert!(
        (got.len() as u64) < N * 97 / 100,
        "{} of {N} volatile events arrived with 10% loss: were they resent?",
        got.len()
    );
    assert!(
        got.len() as u64 > N / 2,
        "only {} of {N} volatile events arrived",
        got.len()
    );
    // Each at most once.
    let mut ids: Vec<u64> = got.iter().map(|(i, _, _)| *i).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "a volatile event arrived twice");
}
