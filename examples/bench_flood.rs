//! `flood_isolation`: the event rate and ack latency of well-behaved peers, without and then
//! with a socket flooding the relay in the same run (raw batches of 500 frames as fast as
//! its socket takes them; the server throttles it and disconnects it, and it comes back at
//! once). Target: both within 20% of the run without the flood.
//!
//! The rate is that of two sending pairs at once: one socket's relay budget (200,000
//! frames/s by default) is below what the node relays, so a single sender would measure its
//! own budget. The ack round trips run beside one sender, which leaves the node room: beside
//! both, they would measure the senders' queues.
//!
//! The flooder and the raw socket it floods (its sink) run in a child process (this binary
//! with `--flood-only URL`), so that only the server's part of the flood competes with the
//! victims. Where `taskset` can, the child is pinned to the last CPU and this process (the
//! server and the victims) to the others, in both runs: on a 2-core machine the flooder's
//! own sending would otherwise take a core from the victims whatever the server does.
use std::sync::atomic::AtomicBool;

use super::*;
use socketio_p2p_tests::{Raw, chat_frame};

/// Events from each sender to its receiver for the rate (all pairs together) and, with
/// `ping`, sequential ack round trips between its two peers at the same time, for `run` (long
/// enough for the flood to be in full swing: it reconnects after every disconnect).
async fn victims(
    pairs: &[(P2p, P2p)],
    ping: Option<(&P2p, &P2p)>,
    run: Duration,
) -> Res<(f64, Vec<f64>)> {
    let got = Arc::new(AtomicUsize::new(0));
    for (_, b) in pairs {
        let g = got.clone();
        b.off("fl");
        b.on("fl", move |_| {
            g.fetch_add(1, Ordering::AcqRel);
        });
    }
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let send = |a: &P2p, b: &P2p| {
        let (a, bid) = (a.clone(), b.id().to_owned());
        async move {
            let mut sent = 0usize;
            while t0.elapsed() < run {
                for _ in 0..256 {
                    a.to(&bid).emit("fl", json!(sent)).await?;
                    sent += 1;
                }
            }
            Ok::<_, BoxError>(sent)
        }
    };
    let sender = async {
        let sent: usize = futures_util::future::try_join_all(pairs.iter().map(|(a, b)| send(a, b)))
            .await?
            .into_iter()
            .sum();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.load(Ordering::Acquire) < sent {
            if Instant::now() > deadline {
                stop.store(true, Ordering::Release);
                return Err(format!(
                    "flood_isolation: {} of {sent} events",
                    got.load(Ordering::Acquire)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::Release);
        Ok::<_, BoxError>(sent as f64 / t0.elapsed().as_secs_f64())
    };
    let pinger = async {
        let mut rtts = Vec::new();
        let Some((c, d)) = ping else {
            return Ok::<_, BoxError>(rtts);
        };
        let to = c.to(d.id());
        while !stop.load(Ordering::Acquire) {
            let t = Instant::now();
            to.emit_with_ack("ping", json!(rtts.len())).await?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<_, BoxError>(sorted(rtts))
    };
    let (rate, rtts) = tokio::join!(sender, pinger);
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

/// `--flood-only URL`: registers a sink (a raw socket that reads and drops everything) and
/// floods the relay at `URL` with frames for it until stdin closes; prints `flooding` once
/// the first batch went out, and `FRAMES DISCONNECTS` at the end.
pub(super) async fn flood_only(args: &[String]) -> Res<()> {
    let at = args
        .iter()
        .position(|a| a == "--flood-only")
        .ok_or("no --flood-only")?;
    let url = args.get(at + 1).ok_or("usage: --flood-only URL")?.clone();
    let mut sink_raw = Raw::connect_to(&url).await;
    let welcome = sink_raw.hello(None, &["flood"]).await;
    let sink = welcome["id"].as_str().ok_or("no sink id")?.to_owned();
    let drain = tokio::spawn(async move { while sink_raw.rx.recv().await.is_some() {} });
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
    drain.abort();
    println!("{frames} {disconnects}");
    Ok(())
}

/// Pins the threads of process `pid` to `cpus` (a `taskset` list); false where it cannot.
fn pin(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the flooder child; returns it once its first batch went out.
async fn spawn_flooder(
    url: &str,
    cpus: Option<&str>,
) -> Res<(
    tokio::process::Child,
    BufReader<tokio::process::ChildStdout>,
)> {
    let exe = std::env::current_exe()?;
    let mut cmd = match cpus {
        Some(c) => {
            let mut t = tokio::process::Command::new("taskset");
            t.args(["-c", c]).arg(exe);
            t
        }
        None => tokio::process::Command::new(exe),
    };
    let mut child = cmd
        .args(["--flood-only", url])
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
    const RUN: Duration = Duration::from_secs(3);
    const SENDERS: usize = 2;
    // Two sending pairs: each socket's relay budget (200,000 frames/s by default) is below
    // what the node relays, so one sender would measure its own budget, not the node.
    let mut pairs = Vec::new();
    for i in 0..SENDERS {
        pairs.push(pair(url, &format!("fi-rate-{i}"), set).await?);
    }
    let (c, d) = pair(url, "fi-ack", set).await?;
    d.on("ping", |ev| {
        ev.reply(ev.payload().clone());
    });
    // The flooder on the last CPU, the server and the victims on the others, for both runs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let me = std::process::id();
    let pinned = cpus >= 2 && pin(me, &format!("0-{}", cpus - 2));
    let flooder_cpu = format!("{}", cpus - 1);
    // Two runs without the flood, then the same two with it: the node's rate with every
    // sender at once (no pinger), then ack round trips beside one sender, which leaves the
    // node room (with both, the senders' own queues would be the latency measured).
    let ping = Some((&c, &d));
    victims(&pairs, ping, Duration::from_millis(300)).await?;
    let (rate0, _) = victims(&pairs, None, RUN).await?;
    let (one0, rtt0) = victims(&pairs[..1], ping, RUN).await?;
    let (child, out) = spawn_flooder(url, pinned.then_some(flooder_cpu.as_str())).await?;
    let (rate1, _) = victims(&pairs, None, RUN).await?;
    let (one1, rtt1) = victims(&pairs[..1], ping, RUN).await?;
    let (flood_frames, flood_disconnects) = stop_flooder(child, out).await?;
    if pinned {
        pin(me, &format!("0-{}", cpus - 1));
    }
    for (a, b) in &pairs {
        a.close().await;
        b.close().await;
    }
    c.close().await;
    d.close().await;
    let p50 = |v: &[f64]| percentile(v, 50.0);
    let p99 = |v: &[f64]| percentile(v, 99.0);
    Ok(Outcome {
        scenario: "flood_isolation",
        fields: vec![
            ("events_per_s", json!(round(rate0, 0))),
            ("events_per_s_flooded", json!(round(rate1, 0))),
            ("rate_ratio", json!(round(rate1 / rate0, 3))),
            ("one_sender_per_s", json!(round(one0, 0))),
            ("one_sender_per_s_flooded", json!(round(one1, 0))),
            ("ack_p50_us", json!(round(p50(&rtt0), 1))),
            ("ack_p50_us_flooded", json!(round(p50(&rtt1), 1))),
            ("ack_p50_ratio", json!(round(p50(&rtt1) / p50(&rtt0), 3))),
            ("ack_p99_us", json!(round(p99(&rtt0), 1))),
            ("ack_p99_us_flooded", json!(round(p99(&rtt1), 1))),
            ("flood_frames", json!(flood_frames)),
            ("flood_disconnects", json!(flood_disconnects)),
            ("senders", json!(SENDERS)),
            ("pinned", json!(pinned)),
        ],
    })
}
