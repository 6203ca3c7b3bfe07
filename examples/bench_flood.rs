//! `flood_isolation`: the event rate and ack latency of well-behaved peers, without and then
//! with a socket flooding the relay in the same run (raw batches of 500 frames as fast as
//! its socket takes them; the server throttles it and disconnects it, and it comes back at
//! once). Target: both within 20% of the run without the flood.
use std::sync::atomic::AtomicBool;

use super::*;
use socketio_p2p_tests::{Raw, chat_frame};

/// Events from `a` to `b` for the rate, ack round trips from `c` to `d` for the latency, at
/// the same time.
async fn victims(a: &P2p, b: &P2p, c: &P2p, d: &P2p, n: usize) -> Res<(f64, Vec<f64>)> {
    let got = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (g, dn) = (got.clone(), done.clone());
    b.off("fl");
    b.on("fl", move |_| {
        if g.fetch_add(1, Ordering::AcqRel) + 1 == n {
            dn.notify_one();
        }
    });
    let t0 = Instant::now();
    let bid = b.id().to_owned();
    let sender = async {
        for i in 0..n {
            a.to(&bid).emit("fl", json!(i)).await?;
        }
        tokio::time::timeout(Duration::from_secs(60), done.notified())
            .await
            .map_err(|_| {
                format!(
                    "flood_isolation: {} of {n} events",
                    got.load(Ordering::Acquire)
                )
            })?;
        Ok::<_, BoxError>(n as f64 / t0.elapsed().as_secs_f64())
    };
    let (rate, rtts) = tokio::join!(sender, ack_rtts(c, d.id(), 500));
    Ok((rate?, rtts?))
}

/// Floods until `stop`: returns (frames sent, disconnects).
async fn flooder(url: String, sink: String, stop: Arc<AtomicBool>) -> (u64, u64) {
    let batch: Vec<Vec<u8>> = (0..500).map(|_| chat_frame(&sink, "", "spam")).collect();
    let mut w = socketio_p2p_signaling::protocol::BatchWriter::new();
    for f in &batch {
        w.push(f);
    }
    let payload = Value::String(socketio_p2p_signaling::protocol::batch_to_base64(&w.take()));
    let (mut frames, mut disconnects) = (0u64, 0u64);
    while !stop.load(Ordering::Acquire) {
        let mut raw = Raw::connect_to(&url).await;
        raw.hello(None, &["flood"]).await;
        while !stop.load(Ordering::Acquire) {
            if raw.client.emit("p2p:f", payload.clone()).await.is_err() {
                break;
            }
            frames += batch.len() as u64;
            let mut gone = false;
            while let Some((ev, p)) = raw.next_within(Duration::ZERO).await {
                if ev == "p2p:error" && format!("{p:?}").contains("disconnected") {
                    gone = true;
                }
            }
            if gone {
                break;
            }
        }
        disconnects += 1;
        let _ = raw.client.disconnect().await;
    }
    (frames, disconnects)
}

pub(super) async fn flood_isolation(url: &str, set: Settings) -> Res<Outcome> {
    const N: usize = 20_000;
    let (a, b) = pair(url, "fi-rate", set).await?;
    let (c, d) = pair(url, "fi-ack", set).await?;
    d.on("ping", |ev| {
        ev.reply(ev.payload().clone());
    });
    let sink = peer(url, "flood", set).await?;
    // Warm-up, then the run without the flood.
    victims(&a, &b, &c, &d, 2_000).await?;
    let (rate0, rtt0) = victims(&a, &b, &c, &d, N).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn(flooder(url.to_owned(), sink.id().to_owned(), stop.clone()));
    // Let the flood get going (its first batches are in flight) before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rate1, rtt1) = victims(&a, &b, &c, &d, N).await?;
    stop.store(true, Ordering::Release);
    let (flood_frames, flood_disconnects) = flood.await?;
    for p in [&a, &b, &c, &d, &sink] {
        p.close().await;
    }
    let p50 = |v: &[f64]| percentile(v, 50.0);
    let p99 = |v: &[f64]| percentile(v, 99.0);
    Ok(Outcome {
        scenario: "flood_isolation",
        fields: vec![
            ("events_per_s", json!(round(rate0, 0))),
            ("events_per_s_flooded", json!(round(rate1, 0))),
            ("rate_ratio", json!(round(rate1 / rate0, 3))),
            ("ack_p50_us", json!(round(p50(&rtt0), 1))),
            ("ack_p50_us_flooded", json!(round(p50(&rtt1), 1))),
            ("ack_p50_ratio", json!(round(p50(&rtt1) / p50(&rtt0), 3))),
            ("ack_p99_us", json!(round(p99(&rtt0), 1))),
            ("ack_p99_us_flooded", json!(round(p99(&rtt1), 1))),
            ("flood_frames", json!(flood_frames)),
            ("flood_disconnects", json!(flood_disconnects)),
        ],
    })
}
