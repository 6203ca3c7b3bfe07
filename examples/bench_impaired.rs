//! `impaired`: the relay, acks, data channel and upgrades on a network with a 50 ms round
//! trip and 1 % loss (the test harness's [`ImpairedNet`]: three namespaces, peer A, peer B
//! and the servers, around a router that holds every packet 25 ms and drops 1 % of them),
//! each beside the bare socketioxide forwarder or a bare webrtc-rs data channel on the same
//! network in the same run. Every path between two namespaces crosses the router once, so a
//! relayed event crosses it twice (A → server → B) and a relayed ack four times.
//!
//! Building the network needs root, network namespaces and /dev/net/tun; where that fails
//! the scenario reports `"skipped":true` and why, and the other scenarios run.
use rust_socketio::Payload;
use socketio_p2p_tests::impair::{End, ImpairedNet};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

use super::*;

const DELAY: Duration = Duration::from_millis(25);
const LOSS_PERCENT: f64 = 1.0;
/// Relayed events A → B.
const RELAY_EVENTS: usize = 20_000;
/// Sequential round trips (acks, or small messages echoed).
const ROUND_TRIPS: usize = 100;
/// The larger send window of the second relay run (frames).
const WIDE_WINDOW: usize = 4096;
/// Fresh pairs upgraded.
const UPGRADES: usize = 20;
/// Bytes sent over the data channel, in 16 KiB messages.
const DC_BYTES: usize = 4 << 20;
/// How long one step may take before it counts as failed.
const STEP: Duration = Duration::from_secs(15);

/// Runs the scenario on a thread of its own: the network's runtimes are started, used and
/// dropped from there, outside this runtime.
pub(super) async fn impaired(set: Settings) -> Res<Outcome> {
    let set = Settings {
        impaired: true,
        ..set
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("impaired".into())
        .spawn(move || {
            let _ = tx.send(run(set));
        })?;
    rx.await.map_err(|_| "impaired: the scenario thread died")?
}

fn run(set: Settings) -> Res<Outcome> {
    let net = match ImpairedNet::new(3, DELAY, LOSS_PERCENT) {
        Ok(net) => net,
        Err(reason) => {
            eprintln!("impaired: skipped: {reason}");
            return Ok(Outcome {
                scenario: "impaired",
                fields: vec![("skipped", json!(true)), ("reason", json!(reason))],
            });
        }
    };
    let [a_end, b_end, s_end] = &net.ends[..] else {
        return Err("impaired: expected three ends".into());
    };
    let s_ip = IpAddr::V4(s_end.addr);
    let port = s_end.run(start_signaling_at(s_ip, set.nodelay))?;
    let url = format!("http://{s_ip}:{port}");

    // Relay: events A → B, both peers beside each other, the server across the router.
    let u = url.clone();
    let ours = a_end.run(async move { relay_ours(&u, set, 1, 1, RELAY_EVENTS).await })?;
    let fwd = s_end.run(start_forwarder_at(s_ip, set.nodelay))?;
    let base = a_end.run(relay_bare_via(fwd, 1, 1, RELAY_EVENTS))?;
    // The same with a larger send window: a window of frames per round trip bounds the
    // rate of one pair, and the round trip of a relayed ack is 100 ms here.
    let (u, wide) = (
        url.clone(),
        Settings {
            window: Some(WIDE_WINDOW),
            ..set
        },
    );
    let wide = a_end.run(async move { relay_ours(&u, wide, 1, 1, RELAY_EVENTS).await })?;
    eprintln!(
        "impaired: relay {:.0} events/s ({:.0} with a window of {WIDE_WINDOW}) vs {:.0} bare",
        ours.rate, wide.rate, base.rate
    );

    // Acks over the relay, then over the data channel, then throughput, on one pair.
    let (a, b) = split_pair(a_end, b_end, &url, "imp-ack", set)?;
    b.on("ping", |ev| {
        ev.reply(ev.payload().clone());
    });
    let (a2, bid) = (a.clone(), b.id().to_owned());
    let relay_acks = ms(a_end.run(async move { ack_rtts(&a2, &bid, ROUND_TRIPS).await })?);
    let fwd = s_end.run(start_forwarder_at(s_ip, set.nodelay))?;
    let bare_acks = bare_relay_round_trips(a_end, b_end, &fwd)?;
    eprintln!(
        "impaired: relay ack p50 {:.1} ms vs {:.1} bare",
        percentile(&relay_acks, 50.0),
        percentile(&bare_acks, 50.0)
    );
    let (a2, bid) = (a.clone(), b.id().to_owned());
    a_end.run(async move {
        a2.upgrade_peer(&bid).await?;
        match a2.transport(&bid).await? {
            Transport::DataChannel => Ok::<_, BoxError>(()),
            _ => Err("impaired: the upgrade did not switch to the data channel".into()),
        }
    })?;
    let (a2, bid) = (a.clone(), b.id().to_owned());
    let dc_rtts = ms(a_end.run(async move { ack_rtts(&a2, &bid, ROUND_TRIPS).await })?);
    let (a2, b2) = (a.clone(), b.clone());
    let dc_secs = a_end
        .run(async move { p2p_binary(&a2, &b2, "chunk", DC_BYTES / DC_CHUNK, DC_CHUNK).await })?;
    a_end.run(async move { a.close().await });
    b_end.run(async move { b.close().await });
    let (bare_secs, bare_rtts) = bare_dc(a_end, b_end)?;
    let mb = DC_BYTES as f64 / 1e6;
    eprintln!(
        "impaired: data channel {:.2} MB/s vs {:.2} bare",
        mb / dc_secs,
        mb / bare_secs
    );

    // Upgrades of fresh pairs, and bare webrtc-rs pairs signaled through the forwarder.
    let (up, up_failed) = upgrades(a_end, b_end, &url, set);
    let fwd = s_end.run(start_forwarder_at(s_ip, set.nodelay))?;
    let (bare_up, bare_up_failed) = bare_upgrades(a_end, b_end, &fwd);
    let p = |v: &[f64], q: f64| json!(round(percentile(v, q), 1));
    let forwarded = net.stats.packets.load(Ordering::Relaxed);
    Ok(Outcome {
        scenario: "impaired",
        fields: vec![
            ("rtt_ms", json!(2 * DELAY.as_millis())),
            ("loss_percent", json!(LOSS_PERCENT)),
            ("relay_events_per_s", json!(ours.rate.round())),
            ("baseline_relay_events_per_s", json!(base.rate.round())),
            ("relay_ratio", json!(round(ours.rate / base.rate, 3))),
            ("relay_lost", json!(ours.lost)),
            ("relay_wide_window_events_per_s", json!(wide.rate.round())),
            ("relay_wide_window_lost", json!(wide.lost)),
            ("baseline_relay_lost", json!(base.lost)),
            ("ack_p50_ms", p(&relay_acks, 50.0)),
            ("ack_p99_ms", p(&relay_acks, 99.0)),
            ("baseline_ack_p50_ms", p(&bare_acks, 50.0)),
            ("baseline_ack_p99_ms", p(&bare_acks, 99.0)),
            ("dc_mb_per_s", json!(round(mb / dc_secs, 2))),
            ("baseline_dc_mb_per_s", json!(round(mb / bare_secs, 2))),
            ("dc_ratio", json!(round(bare_secs / dc_secs, 3))),
            ("dc_rtt_p50_ms", p(&dc_rtts, 50.0)),
            ("dc_rtt_p99_ms", p(&dc_rtts, 99.0)),
            ("baseline_dc_rtt_p50_ms", p(&bare_rtts, 50.0)),
            ("baseline_dc_rtt_p99_ms", p(&bare_rtts, 99.0)),
            ("upgrade_p50_ms", p(&up, 50.0)),
            ("upgrade_p99_ms", p(&up, 99.0)),
            ("upgrade_failed", json!(up_failed)),
            ("baseline_upgrade_p50_ms", p(&bare_up, 50.0)),
            ("baseline_upgrade_p99_ms", p(&bare_up, 99.0)),
            ("baseline_upgrade_failed", json!(bare_up_failed)),
            ("forwarded_packets", json!(forwarded)),
        ],
    })
}

/// Microseconds to milliseconds (still sorted).
fn ms(us: Vec<f64>) -> Vec<f64> {
    us.into_iter().map(|x| x / 1e3).collect()
}

/// A peer in `a_end` and one in `b_end`, in `room`, each seeing the other.
fn split_pair(a_end: &End, b_end: &End, url: &str, room: &str, set: Settings) -> Res<(P2p, P2p)> {
    let (u, r) = (url.to_owned(), room.to_owned());
    let a = a_end.run(async move { peer(&u, &r, set).await })?;
    let (u, r) = (url.to_owned(), room.to_owned());
    let b = b_end.run(async move { peer(&u, &r, set).await })?;
    let (a2, b2) = (a.clone(), b.clone());
    a_end.run(async move {
        let deadline = Instant::now() + STEP;
        for (me, other) in [(&a2, b2.id()), (&b2, a2.id())] {
            while !me.peers().await?.iter().any(|p| p.id == other) {
                if Instant::now() > deadline {
                    return Err::<(), BoxError>("impaired: peers never saw each other".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    })?;
    Ok((a, b))
}

/// A raw rust_socketio client in `room` of the forwarder at `url`, passing the first
/// argument of every `event` it receives to `tx`.
async fn raw_listener(
    url: String,
    room: String,
    event: &'static str,
    tx: UnboundedSender<Value>,
) -> Res<Client> {
    ClientBuilder::new(url)
        .transport_type(TransportType::Websocket)
        .auth(json!({ "room": room }))
        .reconnect(false)
        .on(event, move |payload, _| {
            if let Payload::Text(args) = payload {
                let _ = tx.send(args.into_iter().next().unwrap_or(Value::Null));
            }
            async {}.boxed()
        })
        .connect()
        .await
        .map_err(|e| e.to_string().into())
}

/// Waits until the forwarder has `n` clients.
async fn connected(fwd_connected: &AtomicUsize, n: usize) -> Res<()> {
    let deadline = Instant::now() + STEP;
    while fwd_connected.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err("impaired: forwarder clients never connected".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Sequential round trips through the bare forwarder: A emits `ping`, B answers `pong`
/// (the forwarder's clients cannot ack each other, so the answer is an event); in ms.
fn bare_relay_round_trips(a_end: &End, b_end: &End, fwd: &Forwarder) -> Res<Vec<f64>> {
    let url = &fwd.url;
    let (ping_tx, mut ping_rx) = unbounded_channel();
    let b = b_end.run(raw_listener(url.into(), "acks".into(), "ping", ping_tx))?;
    b_end.rt.spawn(async move {
        while ping_rx.recv().await.is_some() {
            if b.emit("pong", json!(0)).await.is_err() {
                return;
            }
        }
    });
    let (pong_tx, mut pong_rx) = unbounded_channel();
    let (u, joined) = (url.to_owned(), fwd.connected.clone());
    a_end.run(async move {
        let a = raw_listener(u, "acks".into(), "pong", pong_tx).await?;
        connected(&joined, 2).await?;
        let mut rtts = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..20 + ROUND_TRIPS {
            let t = Instant::now();
            a.emit("ping", json!(i)).await?;
            tokio::time::timeout(STEP, pong_rx.recv())
                .await?
                .ok_or("impaired: forwarder client gone")?;
            if i >= 20 {
                rtts.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let _ = a.disconnect().await;
        Ok(sorted(rtts))
    })
}

/// The SettingEngine of `peer/src/rtc.rs` for a peer with real host candidates (its
/// namespace's veth), mDNS disabled, no ICE servers.
fn lan_api() -> webrtc::api::API {
    let mut se = SettingEngine::default();
    se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    se.set_network_types(vec![NetworkType::Udp4]);
    se.set_ice_timeouts(
        Some(Duration::from_secs(5)),
        Some(Duration::from_secs(3)),
        Some(Duration::from_secs(2)),
    );
    se.set_host_acceptance_min_wait(Some(Duration::ZERO));
    se.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
    se.set_ip_filter(Box::new(|ip: IpAddr| !ip.is_loopback()));
    APIBuilder::new().with_setting_engine(se).build()
}

/// The offering side of a bare pair: a data channel, the offer (all candidates in the SDP)
/// out, the answer in; returns once the channel is open. Messages that come back go to
/// `echoes` as arrival times.
async fn bare_offerer(
    out: UnboundedSender<String>,
    mut inbox: UnboundedReceiver<String>,
    echoes: UnboundedSender<Instant>,
) -> Res<(Arc<RTCPeerConnection>, Arc<RTCDataChannel>)> {
    let pc = Arc::new(
        lan_api()
            .new_peer_connection(RTCConfiguration::default())
            .await?,
    );
    let dc = pc.create_data_channel("bench", None).await?;
    let open = Arc::new(Notify::new());
    let o = open.clone();
    dc.on_open(Box::new(move || {
        o.notify_one();
        Box::pin(async {})
    }));
    dc.on_message(Box::new(move |_msg: DataChannelMessage| {
        let _ = echoes.send(Instant::now());
        Box::pin(async {})
    }));
    let offer = pc.create_offer(None).await?;
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(offer).await?;
    let _ = gathered.recv().await;
    let offer = pc.local_description().await.ok_or("no local offer")?;
    out.send(serde_json::to_string(&offer)?)?;
    let answer = tokio::time::timeout(STEP, inbox.recv())
        .await?
        .ok_or("bare webrtc: no answer")?;
    pc.set_remote_description(serde_json::from_str::<RTCSessionDescription>(&answer)?)
        .await?;
    tokio::time::timeout(STEP, open.notified()).await?;
    Ok((pc, dc))
}

/// The answering side: counts the bytes it receives in `counter`, sends the time of each
/// arrival to `arrivals`, and echoes messages of 64 bytes or less.
async fn bare_answerer(
    out: UnboundedSender<String>,
    mut inbox: UnboundedReceiver<String>,
    counter: Arc<Counter>,
    arrivals: UnboundedSender<Instant>,
) -> Res<Arc<RTCPeerConnection>> {
    let pc = Arc::new(
        lan_api()
            .new_peer_connection(RTCConfiguration::default())
            .await?,
    );
    pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        let (c, at, echo) = (counter.clone(), arrivals.clone(), dc.clone());
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            c.add(msg.data.len());
            let _ = at.send(Instant::now());
            let echo = echo.clone();
            Box::pin(async move {
                if msg.data.len() <= 64 {
                    let _ = echo.send(&msg.data).await;
                }
            })
        }));
        Box::pin(async {})
    }));
    let offer = tokio::time::timeout(STEP, inbox.recv())
        .await?
        .ok_or("bare webrtc: no offer")?;
    pc.set_remote_description(serde_json::from_str::<RTCSessionDescription>(&offer)?)
        .await?;
    let answer = pc.create_answer(None).await?;
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(answer).await?;
    let _ = gathered.recv().await;
    let answer = pc.local_description().await.ok_or("no local answer")?;
    out.send(serde_json::to_string(&answer)?)?;
    Ok(pc)
}

/// A bare pair, signaled in memory: seconds for `DC_BYTES` in 16 KiB messages (with
/// `buffered_amount` backpressure), then echoed 32-byte round trips in ms.
fn bare_dc(a_end: &End, b_end: &End) -> Res<(f64, Vec<f64>)> {
    let (to_b, b_in) = unbounded_channel();
    let (to_a, a_in) = unbounded_channel();
    let (arr_tx, _arrivals) = unbounded_channel();
    let counter = Counter::new(DC_BYTES);
    let answerer = b_end
        .rt
        .spawn(bare_answerer(to_a, b_in, counter.clone(), arr_tx));
    let (echo_tx, mut echoes) = unbounded_channel();
    let (pa, dc) = a_end.run(bare_offerer(to_b, a_in, echo_tx))?;
    let pb = b_end.rt.block_on(answerer)??;
    let result = a_end.run(async move {
        let t0 = paced_send(&dc, DC_BYTES, Some(Duration::from_millis(100))).await?;
        let got = counter.wait(Duration::from_secs(10)).await;
        if got < DC_BYTES {
            return Err::<_, BoxError>(
                format!("bare webrtc: only {got} of {DC_BYTES} bytes arrived").into(),
            );
        }
        let secs = counter.elapsed_since(t0).as_secs_f64();
        let small = Bytes::from(vec![0x5au8; 32]);
        let mut rtts = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..20 + ROUND_TRIPS {
            let t = Instant::now();
            dc.send(&small).await?;
            let back = tokio::time::timeout(STEP, echoes.recv())
                .await?
                .ok_or("bare webrtc: echo channel closed")?;
            if i >= 20 {
                rtts.push(back.saturating_duration_since(t).as_secs_f64() * 1e3);
            }
        }
        Ok((secs, sorted(rtts)))
    });
    a_end.run(async move { pa.close().await })?;
    b_end.run(async move { pb.close().await })?;
    result
}

/// `UPGRADES` fresh pairs: `upgrade_peer` → first data-channel event at B, in ms; and how
/// many did not get there.
fn upgrades(a_end: &End, b_end: &End, url: &str, set: Settings) -> (Vec<f64>, usize) {
    let mut times = Vec::with_capacity(UPGRADES);
    let mut failed = 0;
    for i in 0..UPGRADES {
        let (a, b) = match split_pair(a_end, b_end, url, &format!("imp-up-{i}"), set) {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("impaired: upgrade {i}: {e}");
                failed += 1;
                continue;
            }
        };
        let (tx, mut rx) = unbounded_channel();
        b.on("hello", move |ev| {
            if ev.transport() == Transport::DataChannel {
                let _ = tx.send(Instant::now());
            }
        });
        let (a2, bid) = (a.clone(), b.id().to_owned());
        let got = a_end.run(async move {
            let t0 = Instant::now();
            a2.upgrade_peer(&bid).await?;
            a2.to(&bid).emit("hello", ()).await?;
            let at = tokio::time::timeout(STEP, rx.recv())
                .await?
                .ok_or("no data-channel event")?;
            Ok::<_, BoxError>(at.saturating_duration_since(t0).as_secs_f64() * 1e3)
        });
        match got {
            Ok(ms) => times.push(ms),
            Err(e) => {
                eprintln!("impaired: upgrade {i}: {e}");
                failed += 1;
            }
        }
        a_end.run(async move { a.close().await });
        b_end.run(async move { b.close().await });
    }
    (sorted(times), failed)
}

/// `UPGRADES` bare webrtc-rs pairs whose offer and answer go through the bare forwarder
/// (candidates in the SDP): offer created → first message at B, in ms; and how many failed.
fn bare_upgrades(a_end: &End, b_end: &End, fwd: &Forwarder) -> (Vec<f64>, usize) {
    let mut times = Vec::with_capacity(UPGRADES);
    let mut failed = 0;
    for i in 0..UPGRADES {
        match bare_upgrade(a_end, b_end, fwd, i) {
            Ok(ms) => times.push(ms),
            Err(e) => {
                eprintln!("impaired: bare upgrade {i}: {e}");
                failed += 1;
            }
        }
    }
    (sorted(times), failed)
}

/// Carries strings from `rx` to the forwarder as `sdp` events from `client`.
fn bridge(end: &End, client: Client, mut rx: UnboundedReceiver<String>) {
    end.rt.spawn(async move {
        while let Some(s) = rx.recv().await {
            if client.emit("sdp", json!(s)).await.is_err() {
                break;
            }
        }
        let _ = client.disconnect().await;
    });
}

/// Strings out of `sdp` events.
fn strings(mut rx: UnboundedReceiver<Value>) -> UnboundedReceiver<String> {
    let (tx, out) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            if let Some(s) = v.as_str() {
                let _ = tx.send(s.to_owned());
            }
        }
    });
    out
}

fn bare_upgrade(a_end: &End, b_end: &End, fwd: &Forwarder, i: usize) -> Res<f64> {
    let (url, before) = (&fwd.url, fwd.connected.load(Ordering::Relaxed));
    let room = format!("bare-up-{i}");
    let (a_sdp_tx, a_sdp_rx) = unbounded_channel();
    let (b_sdp_tx, b_sdp_rx) = unbounded_channel();
    let (u, r) = (url.to_owned(), room.clone());
    let (ra, a_in) = a_end.run(async move {
        let c = raw_listener(u, r, "sdp", a_sdp_tx).await?;
        Ok::<_, BoxError>((c, strings(a_sdp_rx)))
    })?;
    let (u, r) = (url.to_owned(), room);
    let (rb, b_in) = b_end.run(async move {
        let c = raw_listener(u, r, "sdp", b_sdp_tx).await?;
        Ok::<_, BoxError>((c, strings(b_sdp_rx)))
    })?;
    let (a_out, a_out_rx) = unbounded_channel();
    let (b_out, b_out_rx) = unbounded_channel();
    bridge(a_end, ra, a_out_rx);
    bridge(b_end, rb, b_out_rx);
    // Both clients must be in the room before the offer goes out.
    let joined = fwd.connected.clone();
    a_end.run(async move { connected(&joined, before + 2).await })?;
    let (arrivals_tx, mut arrivals) = unbounded_channel();
    let (echo_tx, _echoes) = unbounded_channel();
    let t0 = Instant::now();
    let answerer = b_end.rt.spawn(bare_answerer(
        b_out,
        b_in,
        Counter::new(usize::MAX),
        arrivals_tx,
    ));
    let offered = a_end.run(async move {
        let (pc, dc) = bare_offerer(a_out, a_in, echo_tx).await?;
        dc.send(&Bytes::from_static(b"hello")).await?;
        Ok::<_, BoxError>(pc)
    });
    let at = offered.as_ref().ok().and_then(|_| {
        b_end
            .rt
            .block_on(async { tokio::time::timeout(STEP, arrivals.recv()).await.ok() })
            .flatten()
    });
    if let Ok(pc) = offered.as_ref() {
        let pc = pc.clone();
        let _ = a_end.run(async move { pc.close().await });
    }
    if let Ok(Ok(pc)) = b_end.rt.block_on(answerer) {
        let _ = b_end.run(async move { pc.close().await });
    }
    offered?;
    let at = at.ok_or("no message at B")?;
    Ok(at.saturating_duration_since(t0).as_secs_f64() * 1e3)
}
