//! `flood_isolation`: the event rate and ack latency of well-behaved peers, without and then
//! with a socket flooding the relay in the same run (raw batches of 500 frames as fast as
//! its socket takes them; the server throttles it and disconnects it, and it comes back at
//! once). Target: both within 20% of the run without the flood.
//!
//! The flooder runs in a child process (this binary with `--flood-only URL SINK`), so that
//! its own work is not the victims' process's: only the server's part of the flood competes
//! with them there (on a 2-core machine, the child still competes for the cores).
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

/// Floods until `stop`: returns (frames sent, disconnects). `started` is told once the
/// first batch went out.
async fn flooder(
    url: String,
    sink: String,
    stop: Arc<AtomicBool>,
    started: Arc<Notify>,
) -> (u64, u64) {
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
            if frames == 0 {
                started.notify_one();
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

/// `--flood-only URL SINK`: floods the relay at `URL` with frames for `SINK` until stdin
/// closes, prints `flooding` once the first batch went out, and `FRAMES DISCONNECTS` at the end.
pub(super) async fn flood_only(args: &[String]) -> Res<()> {
    let at = args
        .iter()
        .position(|a| a == "--flood-only")
        .ok_or("no --flood-only")?;
    let (url, sink) = match (args.get(at + 1), args.get(at + 2)) {
        (Some(u), Some(s)) => (u.clone(), s.clone()),
        _ => return Err("usage: --flood-only URL SINK".into()),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Notify::new());
    let flood = tokio::spawn(flooder(url, sink, stop.clone(), started.clone()));
    started.notified().await;
    println!("flooding");
    std::io::stdout().flush()?;
    // Until the parent closes our stdin (or dies).
    let mut sink_buf = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink_buf).await;
    stop.store(true, Ordering::Release);
    let (frames, disconnects) = flood.await?;
    println!("{frames} {disconnects}");
    Ok(())
}

/// Starts the flooder child; returns it once its first batch went out.
async fn spawn_flooder(
    url: &str,
    sink: &str,
) -> Res<(
    tokio::process::Child,
    BufReader<tokio::process::ChildStdout>,
)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--flood-only", url, sink])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no flooder stdout")?);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut line)).await??;
    if line.trim() != "flooding" {
        return Err(format!("flooder did not start: {line:?}").into());
    }
    Ok((child, out))
}

/// Stops the flooder child: (frames sent, disconnects).
async fn stop_flooder(
    mut child: tokio::process::Child,
    mut out: BufReader<tokio::process::ChildStdout>,
) -> Res<(u64, u64)> {
    drop(child.stdin.take());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut line)).await??;
    let _ = child.wait().await;
    let mut it = line.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(f)), Some(Ok(d))) => Ok((f, d)),
        _ => Err(format!("flooder said {line:?}").into()),
    }
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
    let (child, out) = spawn_flooder(url, sink.id()).await?;
    let (rate1, rtt1) = victims(&a, &b, &c, &d, N).await?;
    let (flood_frames, flood_disconnects) = stop_flooder(child, out).await?;
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
