//! The WebRTC transport: upgrade, auto-upgrade, num_clients, identical API on both
//! transports, glare, ICE failure fallback, garbage SDP, downgrade and leak-free teardown.
//! Loopback candidates only, no STUN, no mDNS.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use socketio_p2p::{Error, P2p, Payload, PeerEvent, Transport};
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

async fn wait_transport(p: &P2p, peer: &str, t: Transport) {
    assert!(
        wait_until(15, || async { p.transport(peer).await.ok() == Some(t) }).await,
        "{} never reached {t} with {peer}",
        p.id()
    );
}

/// The same checks, whatever the transport: JSON, binary, large binary, acks, remote errors,
/// targeting, sender filter, order of 10k events.
async fn battery(a: &P2p, b: &P2p, t: Transport) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.on("m", move |ev| {
        let _ = tx.send(ev);
    });
    a.emit("m", json!({"k": [1, 2, 3]})).await.unwrap();
    let ev = recv(&mut rx, 10).await;
    assert_eq!(ev.transport(), t);
    assert_eq!(ev.from(), a.id());
    assert_eq!(
        ev.decode_json::<serde_json::Value>().unwrap(),
        json!({"k": [1, 2, 3]})
    );
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i| (i % 253) as u8).collect();
    a.to(b.id())
        .emit("m", Bytes::from(big.clone()))
        .await
        .unwrap();
    let ev = recv(&mut rx, 30).await;
    assert_eq!(ev.transport(), t);
    assert!(ev.bytes().unwrap().as_ref() == big.as_slice());
    b.on("echo", |ev| {
        ev.reply(ev.payload().clone());
    });
    let r = a
        .to(b.id())
        .emit_with_ack("echo", Bytes::from_static(b"bin"))
        .await
        .unwrap();
    assert_eq!(r, Payload::Binary(Bytes::from_static(b"bin")));
    let r = a
        .to(b.id())
        .emit_with_ack("echo", json!("txt"))
        .await
        .unwrap();
    assert_eq!(r, Payload::from("txt"));
    let e = a.to(b.id()).emit_with_ack("nobody", ()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Remote { code, .. } if code == "NoHandler"),
        "{e:?}"
    );
    let (ftx, mut frx) = mpsc::unbounded_channel();
    b.from(a.id()).on("order", move |ev| {
        let _ = ftx.send(ev.decode_json::<u64>().unwrap());
    });
    for i in 0..10_000u64 {
        a.to(b.id()).emit("order", json!(i)).await.unwrap();
    }
    for i in 0..10_000u64 {
        assert_eq!(recv(&mut frx, 30).await, i);
    }
    b.off("m");
    b.off("echo");
    b.from(a.id()).off("order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_api_over_relay_and_data_channel() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let b = peer(&s, rtc_opts()).await;
    wait_peers(&a, 1).await;
    battery(&a, &b, Transport::Relay).await;
    let mut pe = b.peer_events();
    a.upgrade_peer(b.id()).await.unwrap();
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::DataChannel);
    wait_transport(&b, a.id(), Transport::DataChannel).await;
    match tokio::time::timeout(Duration::from_secs(10), pe.next())
        .await
        .unwrap()
        .unwrap()
    {
        PeerEvent::Upgraded { peer } => {
            assert_eq!(peer.id, a.id());
        }
        other => panic!("unexpected {other:?}"),
    }
    battery(&a, &b, Transport::DataChannel).await;
    battery(&b, &a, Transport::DataChannel).await;
    // Volatile events go over the data channel too.
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.on("pos", move |ev| {
        let _ = tx.send(ev.transport());
    });
    // Best effort: send a few, expect at least one.
    for _ in 0..20 {
        a.emit_volatile("pos", json!([1, 2])).await.unwrap();
    }
    assert_eq!(recv(&mut rx, 10).await, Transport::DataChannel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_upgrade_when_peers_meet() {
    let s = spawn_server().await;
    // Trickled candidates (the default off loopback) work too.
    let a = peer(&s, rtc_opts().auto_upgrade(true).trickle(true)).await;
    let b = peer(&s, rtc_opts().auto_upgrade(true).trickle(true)).await;
    wait_transport(&a, b.id(), Transport::DataChannel).await;
    wait_transport(&b, a.id(), Transport::DataChannel).await;
    // A pair (uid + peer_uid) upgrades too.
    let c = peer(&s, rtc_opts().auto_upgrade(true).uid("c"));
    let d = peer(&s, rtc_opts().auto_upgrade(true).uid("d").peer_uid("c"));
    let (c, d) = tokio::join!(c, d);
    wait_transport(&d, c.id(), Transport::DataChannel).await;
    wait_transport(&c, d.id(), Transport::DataChannel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn num_clients_caps_data_channels_and_the_rest_stays_on_the_relay() {
    let s = spawn_server().await;
    let mut peers = Vec::new();
    for _ in 0..4 {
        peers.push(peer(&s, rtc_opts().num_clients(2)).await);
    }
    for p in &peers {
        wait_peers(p, 3).await;
    }
    // Every peer starts its upgrades at once.
    for p in &peers {
        let p = p.clone();
        tokio::spawn(async move { p.upgrade().await });
    }
    // Let every attempt finish (success or refusal): no attempt may be pending.
    let settled = wait_until(20, || async {
        let mut ok = true;
        for p in &peers {
            let mut dc = 0;
            for q in p.peers().await.unwrap() {
                if p.transport(&q.id).await.unwrap() == Transport::DataChannel {
                    dc += 1;
                }
            }
            ok &= dc == p.webrtc_connections().await.unwrap();
        }
        ok
    })
    .await;
    assert!(settled, "upgrade attempts never settled");
    let mut total = 0;
    for p in &peers {
        let n = p.webrtc_connections().await.unwrap();
        assert!(n <= 2, "{} has {n} data channels", p.id());
        total += n;
    }
    assert!(total >= 2, "some data channels must exist ({total})");
    // Everyone still reaches everyone, whatever the transport.
    for (i, p) in peers.iter().enumerate() {
        for (j, q) in peers.iter().enumerate() {
            if i == j {
                continue;
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            let id = q.from(p.id()).once("hi", move |ev| {
                let _ = tx.send(ev.decode_json::<usize>().unwrap());
            });
            let _ = id;
            p.to(q.id()).emit("hi", json!(i)).await.unwrap();
            assert_eq!(recv(&mut rx, 10).await, i);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_upgrading_at_once_is_resolved() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let b = peer(&s, rtc_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let (ra, rb) = tokio::join!(a.upgrade_peer(b.id()), b.upgrade_peer(a.id()));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(a.webrtc_connections().await.unwrap(), 1);
    assert_eq!(b.webrtc_connections().await.unwrap(), 1);
    battery(&a, &b, Transport::DataChannel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_failure_falls_back_to_the_relay() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts().upgrade_timeout(Duration::from_secs(3))).await;
    // b gathers no candidate at all: ICE cannot succeed, for real.
    let b = peer(
        &s,
        rtc_opts()
            .upgrade_timeout(Duration::from_secs(3))
            .block_all_candidates(),
    )
    .await;
    wait_peers(&a, 1).await;
    let mut pe = a.peer_events();
    let t = std::time::Instant::now();
    let e = a.upgrade_peer(b.id()).await.unwrap_err();
    assert!(matches!(e, Error::WebRtc(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    match tokio::time::timeout(Duration::from_secs(10), pe.next())
        .await
        .unwrap()
        .unwrap()
    {
        PeerEvent::UpgradeFailed { peer, reason } => {
            assert_eq!(peer.id, b.id());
            assert!(!reason.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::Relay);
    battery(&a, &b, Transport::Relay).await;
    assert!(
        wait_until(10, || async {
            a.webrtc_connections().await.unwrap() == 0 && b.webrtc_connections().await.unwrap() == 0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sdp_from_a_peer_is_its_error() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts().room("r")).await;
    let b = peer(&s, rtc_opts().room("r")).await;
    let mut raw = Raw::connect(&s).await;
    let w = raw.hello(None, &["r"]).await;
    let _raw_id = w["id"].as_str().unwrap().to_owned();
    wait_peers(&a, 2).await;
    // Passes the server's shape check, but is not a usable SDP.
    let sdp = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nthis is not sdp\r\n";
    raw.emit(
        "p2p:req",
        json!({"rid": 1, "op": "signal", "to": a.id(), "signal": {"type": "offer", "sdp": sdp}}),
    )
    .await;
    // a answers with a bye that says why; a and b keep working.
    let sig = raw.expect("p2p:sig").await;
    assert_eq!(sig["from"].as_str(), Some(a.id()));
    assert_eq!(sig["signal"]["type"].as_str(), Some("bye"), "{sig}");
    a.upgrade_peer(b.id()).await.unwrap();
    battery(&a, &b, Transport::DataChannel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_and_upgrade_again() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let b = peer(&s, rtc_opts()).await;
    wait_peers(&a, 1).await;
    a.upgrade_peer(b.id()).await.unwrap();
    wait_transport(&b, a.id(), Transport::DataChannel).await;
    let mut pe = a.peer_events();
    b.downgrade_peer(a.id()).await.unwrap();
    loop {
        if let PeerEvent::Downgraded { peer, .. } =
            tokio::time::timeout(Duration::from_secs(10), pe.next())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!(peer.id, b.id());
            break;
        }
    }
    wait_transport(&a, b.id(), Transport::Relay).await;
    wait_transport(&b, a.id(), Transport::Relay).await;
    battery(&a, &b, Transport::Relay).await;
    b.upgrade_peer(a.id()).await.unwrap();
    wait_transport(&a, b.id(), Transport::DataChannel).await;
    battery(&b, &a, Transport::DataChannel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_upgrade_leave_cycles_leak_nothing() {
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    for i in 0..50 {
        let b = peer(&s, rtc_opts()).await;
        wait_peers(&a, 1).await;
        a.upgrade_peer(b.id())
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        b.once("x", move |ev| {
            let _ = tx.send(ev.transport());
        });
        a.emit("x", json!(i)).await.unwrap();
        assert_eq!(recv(&mut rx, 10).await, Transport::DataChannel);
        b.close().await;
        drop(b);
        wait_peers(&a, 0).await;
        assert!(wait_until(10, || async { a.webrtc_connections().await.unwrap() == 0 }).await);
    }
    assert!(
        wait_until(20, || async {
            socketio_p2p::live_webrtc_connections() == 0
        })
        .await,
        "{} peer connections still alive",
        socketio_p2p::live_webrtc_connections()
    );
    let settled = wait_until(20, || async {
        metrics.num_alive_tasks() <= tasks_before + 5
    })
    .await;
    assert!(
        settled,
        "tasks before {tasks_before}, after {}",
        metrics.num_alive_tasks()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_webrtc_stack_stalls_nobody() {
    let s = spawn_server().await;
    // Every offer and answer of `h` hangs for 10 s, as a stuck ICE gathering would.
    let h = peer(&s, rtc_opts().hang_webrtc(Duration::from_secs(10))).await;
    let b = peer(&s, rtc_opts()).await;
    let c = peer(&s, rtc_opts()).await;
    for p in [&h, &b, &c] {
        wait_peers(p, 2).await;
    }
    b.on("ping", |ev| {
        ev.reply("pong");
    });
    h.on("ping", |ev| {
        ev.reply("pong");
    });
    let hung = h.clone();
    tokio::spawn(async move { hung.upgrade().await });
    let started = tokio::time::Instant::now();
    let within = Duration::from_secs(5);
    // Meanwhile: the other peers upgrade with each other...
    tokio::time::timeout(within, b.upgrade_peer(c.id()))
        .await
        .expect("b and c could not upgrade while h hangs")
        .unwrap();
    // ...and h answers and is answered over the relay, and answers its own handle.
    let r = tokio::time::timeout(within, h.to(b.id()).emit_with_ack("ping", ()))
        .await
        .expect("h's relay stalled")
        .unwrap();
    assert_eq!(r.decode_json::<String>().unwrap(), "pong");
    let r = tokio::time::timeout(within, b.to(h.id()).emit_with_ack("ping", ()))
        .await
        .expect("h stopped answering")
        .unwrap();
    assert_eq!(r.decode_json::<String>().unwrap(), "pong");
    assert_eq!(h.transport(b.id()).await.unwrap(), Transport::Relay);
    assert_eq!(h.peers().await.unwrap().len(), 2);
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    battery(&b, &c, Transport::DataChannel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_say_what_a_peer_is_on() {
    use socketio_p2p::{CandidateKind, Path, UpgradeFailure};
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let b = peer(&s, rtc_opts()).await;
    wait_peers(&a, 1).await;
    let mut events = a.peer_events();
    let st = a.stats(b.id()).await.unwrap();
    assert_eq!((st.transport, st.path), (Transport::Relay, Path::Relay));
    a.upgrade_peer(b.id()).await.unwrap();
    // The path is known once ICE reports the selected pair.
    let path = wait_event(&mut events, 10, |e| match e {
        PeerEvent::PathChanged { peer, path } if peer.id == b.id() => Some(path),
        _ => None,
    })
    .await;
    assert_eq!(path, Path::Direct);
    battery(&a, &b, Transport::DataChannel).await;
    let st = a.stats(b.id()).await.unwrap();
    assert_eq!(st.transport, Transport::DataChannel);
    let pair = st.candidates.expect("candidates");
    assert_eq!(
        (pair.local, pair.remote),
        (CandidateKind::Host, CandidateKind::Host)
    );
    assert!(st.frames_sent > 10_000 && st.frames_received > 0, "{st:?}");
    assert!(st.bytes_sent > st.frames_sent && st.rtt.is_some(), "{st:?}");
    assert_eq!(st.upgrades, 1);
    a.downgrade_peer(b.id()).await.unwrap();
    let st = a.stats(b.id()).await.unwrap();
    assert_eq!(st.path, Path::Relay);
    assert_eq!(st.last_upgrade_failure, Some(UpgradeFailure::Application));
    assert!(matches!(
        a.stats("nobody").await,
        Err(Error::PeerOffline(_))
    ));
}
