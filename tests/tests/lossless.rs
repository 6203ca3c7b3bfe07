//! Reliable events arrive exactly once and in order while the transport under them changes.
//! 100k numbered events each way, at the same time.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use socketio_p2p::{P2p, PeerEvent, Transport};
use socketio_p2p_tests::*;

const N: u64 = 100_000;

fn send_all(from: &P2p, to: &str, sent: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let from = from.clone();
    let to = to.to_owned();
    tokio::spawn(async move {
        for i in 0..N {
            // While the server connection is down and the backlog is full, an emit says
            // `QueueFull` at once (nothing was queued): send the same number again.
            loop {
                match from.to(&to).emit("n", json!(i)).await {
                    Ok(()) => break,
                    Err(socketio_p2p::Error::QueueFull(_)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("emit {i} failed: {e}"),
                }
            }
            sent.store(i + 1, Ordering::SeqCst);
        }
    })
}

async fn finish(ca: &Counter, cb: &Counter) {
    let done = wait_until(240, || async {
        ca.next.load(Ordering::SeqCst) >= N && cb.next.load(Ordering::SeqCst) >= N
    })
    .await;
    assert!(
        done,
        "a got {}, b got {}",
        ca.next.load(Ordering::SeqCst),
        cb.next.load(Ordering::SeqCst)
    );
    // Nothing extra shows up (no duplicates): give stragglers a moment, then check the count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in [ca, cb] {
        assert_eq!(c.next.load(Ordering::SeqCst), N, "duplicates delivered");
        assert_eq!(c.bad.load(Ordering::SeqCst), 0, "events out of order");
    }
}

async fn pair(s: &Server, opts: socketio_p2p::P2pOptions) -> (P2p, P2p) {
    let a = peer(s, opts.clone()).await;
    let b = peer(s, opts).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_mid_stream() {
    let s = spawn_server().await;
    let (a, b) = pair(&s, rtc_opts()).await;
    let (ca, cb) = (count(&a, b.id()), count(&b, a.id()));
    let (sa, sb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ta = send_all(&a, b.id(), sa.clone());
    let tb = send_all(&b, a.id(), sb.clone());
    assert!(wait_until(60, || async { sa.load(Ordering::SeqCst) > N / 5 }).await);
    a.upgrade_peer(b.id()).await.unwrap();
    assert!(
        sa.load(Ordering::SeqCst) < N,
        "the upgrade must happen mid-stream"
    );
    ta.await.unwrap();
    tb.await.unwrap();
    finish(&ca, &cb).await;
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::DataChannel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_channel_killed_mid_stream() {
    let s = spawn_server().await;
    let (a, b) = pair(&s, rtc_opts().dc_timeout(Duration::from_secs(1))).await;
    a.upgrade_peer(b.id()).await.unwrap();
    let mut b_events = b.peer_events();
    let (ca, cb) = (count(&a, b.id()), count(&b, a.id()));
    let (sa, sb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ta = send_all(&a, b.id(), sa.clone());
    let tb = send_all(&b, a.id(), sb.clone());
    assert!(wait_until(60, || async { sa.load(Ordering::SeqCst) > N / 3 }).await);
    a.kill_data_channel(b.id()).unwrap();
    assert!(
        sa.load(Ordering::SeqCst) < N,
        "the channel must die mid-stream"
    );
    // b notices by itself (closed channel or silence) and falls back.
    let downgraded = async {
        loop {
            if let Some(PeerEvent::Downgraded { peer, .. }) = b_events.next().await {
                assert_eq!(peer.id, a.id());
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), downgraded)
        .await
        .expect("b never noticed the dead channel");
    ta.await.unwrap();
    tb.await.unwrap();
    finish(&ca, &cb).await;
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::Relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_channel_is_replaced_by_a_new_one_with_auto_upgrade() {
    let s = spawn_server().await;
    let opts = rtc_opts()
        .auto_upgrade(true)
        .dc_timeout(Duration::from_secs(1))
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(2));
    let (a, b) = pair(&s, opts).await;
    assert!(
        wait_until(15, || async {
            a.transport(b.id()).await.ok() == Some(Transport::DataChannel)
        })
        .await
    );
    let mut pe = a.peer_events();
    a.kill_data_channel(b.id()).unwrap();
    let mut saw_down = false;
    let reup = async {
        loop {
            match pe.next().await {
                Some(PeerEvent::Downgraded { .. }) => saw_down = true,
                Some(PeerEvent::Upgraded { peer }) if saw_down => return peer,
                _ => {}
            }
        }
    };
    let peer = tokio::time::timeout(Duration::from_secs(20), reup)
        .await
        .expect("never upgraded again");
    assert_eq!(peer.id, b.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receivers_both_ways() {
    let s = spawn_server().await;
    let (a, b) = pair(&s, rtc_opts().events_capacity(16)).await;
    let to_a = a.from(b.id()).events();
    let to_b = b.from(a.id()).events();
    let (sa, sb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ta = send_all(&a, b.id(), sa.clone());
    let tb = send_all(&b, a.id(), sb.clone());
    let read = |mut st: socketio_p2p::EventStream| {
        tokio::spawn(async move {
            for i in 0..N {
                let ev = tokio::time::timeout(Duration::from_secs(60), st.next())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(ev.decode_json::<u64>().unwrap(), i);
                if i % 1000 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await; // slow on purpose
                }
            }
        })
    };
    let (ra, rb) = (read(to_a), read(to_b));
    ta.await.unwrap();
    tb.await.unwrap();
    ra.await.unwrap();
    rb.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream() {
    let mut server = CrashableServer::start(0);
    let port = server.addr.port();
    let connect = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(20), P2p::connect(&url, relay_opts()))
            .await
            .unwrap()
            .unwrap()
    };
    let a = connect(server.url()).await;
    let b = connect(server.url()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let mut a_events = a.peer_events();
    let (ca, cb) = (count(&a, b.id()), count(&b, a.id()));
    let (sa, sb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ta = send_all(&a, b.id(), sa.clone());
    let tb = send_all(&b, a.id(), sb.clone());
    assert!(wait_until(60, || async { sa.load(Ordering::SeqCst) > N / 3 }).await);
    server.kill();
    assert!(
        sa.load(Ordering::SeqCst) < N,
        "the restart must happen mid-stream"
    );
    let server2 = CrashableServer::start(port);
    let continued = wait_event(&mut a_events, 30, |ev| match ev {
        PeerEvent::Reconnected { continued } => Some(continued),
        _ => None,
    })
    .await;
    assert!(continued, "a fresh server must let the peers carry on");
    ta.await.unwrap();
    tb.await.unwrap();
    finish(&ca, &cb).await;
    drop(server2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_channels_keep_talking_while_the_server_is_down() {
    let mut server = CrashableServer::start(0);
    let port = server.addr.port();
    let a = P2p::connect(&server.url(), rtc_opts()).await.unwrap();
    let b = P2p::connect(&server.url(), rtc_opts()).await.unwrap();
    wait_peers(&a, 1).await;
    a.upgrade_peer(b.id()).await.unwrap();
    let cb = count(&b, a.id());
    server.kill();
    for i in 0..1000u64 {
        a.to(b.id()).emit("n", json!(i)).await.unwrap();
    }
    assert!(
        wait_until(30, || async { cb.next.load(Ordering::SeqCst) == 1000 }).await,
        "the data channel stopped with the server"
    );
    assert_eq!(cb.bad.load(Ordering::SeqCst), 0);
    // The server comes back: both resume, and the relay works again.
    let _server2 = CrashableServer::start(port);
    let c = P2p::connect(&_server2.url(), relay_opts()).await.unwrap();
    assert!(
        wait_until(30, || async {
            c.peers().await.map(|p| p.len()).unwrap_or(0) == 2
        })
        .await,
        "a and b never came back"
    );
    let cc = count(&a, c.id());
    c.to(a.id()).emit("n", json!(0)).await.unwrap();
    assert!(wait_until(10, || async { cc.next.load(Ordering::SeqCst) == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_reconnecting_after_the_timeout_and_queues_are_bounded() {
    let mut server = CrashableServer::start(0);
    let opts = relay_opts()
        .reconnect_timeout(Duration::from_secs(2))
        .window(8);
    let a = P2p::connect(&server.url(), opts.clone()).await.unwrap();
    let b = P2p::connect(&server.url(), opts).await.unwrap();
    wait_peers(&a, 1).await;
    let mut pe = a.peer_events();
    server.kill();
    // Emits while reconnecting are queued up to a bound, then refused with a typed error.
    let mut refused = None;
    for i in 0..10_000u64 {
        match a.to(b.id()).emit("n", json!(i)).await {
            Ok(()) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(
            refused,
            Some(socketio_p2p::Error::QueueFull(_)) | Some(socketio_p2p::Error::Closed)
        ),
        "{refused:?}"
    );
    let closed = async {
        loop {
            if let Some(PeerEvent::Closed { reason }) = pe.next().await {
                return reason;
            }
        }
    };
    let reason = tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("never gave up");
    assert!(reason.contains("reconnect"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_client_connection_resumes_and_nobody_notices() {
    let s = spawn_server().await;
    let cutter = Cutter::start(s.addr).await;
    let a = tokio::time::timeout(
        Duration::from_secs(20),
        P2p::connect(&cutter.url(), rtc_opts()),
    )
    .await
    .unwrap()
    .unwrap();
    let b = peer(&s, rtc_opts()).await;
    let c = peer(&s, rtc_opts()).await;
    wait_peers(&a, 2).await;
    // a talks to c over a data channel, and to b over the relay.
    a.upgrade_peer(c.id()).await.unwrap();
    let mut a_events = a.peer_events();
    let b_saw_leave = Arc::new(AtomicU64::new(0));
    let flag = b_saw_leave.clone();
    b.on_peer_event(move |ev| {
        if matches!(ev, PeerEvent::Disconnected { .. } | PeerEvent::Left { .. }) {
            flag.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (ca, cb) = (count(&a, b.id()), count(&b, a.id()));
    let cc = count(&c, a.id());
    let (sa, sb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ta = send_all(&a, b.id(), sa.clone());
    let tb = send_all(&b, a.id(), sb.clone());
    assert!(wait_until(60, || async { sa.load(Ordering::SeqCst) > N / 3 }).await);
    cutter.cut();
    assert!(
        sa.load(Ordering::SeqCst) < N,
        "the cut must happen mid-stream"
    );
    // The data channel keeps working while a is away from the server.
    for i in 0..100u64 {
        a.to(c.id()).emit("n", json!(i)).await.unwrap();
    }
    assert!(wait_until(10, || async { cc.next.load(Ordering::SeqCst) == 100 }).await);
    let continued = wait_event(&mut a_events, 30, |ev| match ev {
        PeerEvent::Reconnected { continued } => Some(continued),
        _ => None,
    })
    .await;
    assert!(continued, "within the grace period the session carries on");
    ta.await.unwrap();
    tb.await.unwrap();
    finish(&ca, &cb).await;
    assert_eq!(cc.bad.load(Ordering::SeqCst), 0);
    assert_eq!(
        b_saw_leave.load(Ordering::SeqCst),
        0,
        "b was told that a left"
    );
}
