//! Several signaling nodes sharing one real redis-server: peers on different nodes relay,
//! pair, share rooms and presence, upgrade to WebRTC; uids are cluster-wide; a dead node's
//! peers are announced gone.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use socketio_p2p::{Error, P2p, Payload, PeerEvent, Transport};
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

fn collect(p: &P2p, event: &str) -> mpsc::UnboundedReceiver<socketio_p2p::Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    p.on(event, move |ev| {
        let _ = tx.send(ev);
    });
    rx
}

async fn next_event<T>(
    pe: &mut socketio_p2p::PeerEventStream,
    f: impl FnMut(PeerEvent) -> Option<T>,
) -> T {
    wait_event(pe, 10, f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_relay_events_acks_binary_in_order() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("relay")).await;
    let n2 = spawn_node(redis.cluster("relay")).await;
    let a = peer(&n1, relay_opts()).await;
    let b = peer(&n2, relay_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    // Both nodes list both peers.
    assert!(wait_until(10, || async { n1.signaling.peers().len() == 2 }).await);
    assert!(wait_until(10, || async { n2.signaling.peers().len() == 2 }).await);

    let mut got = collect(&b, "chat");
    let mut bin = collect(&b, "blob");
    a.emit("chat", json!({"text": "hi"})).await.unwrap();
    a.emit("blob", Bytes::from_static(b"\x00\x01\x02"))
        .await
        .unwrap();
    let ev = recv(&mut got, 10).await;
    assert_eq!(ev.from(), a.id());
    assert_eq!(ev.transport(), Transport::Relay);
    assert_eq!(
        ev.decode_json::<serde_json::Value>().unwrap(),
        json!({"text": "hi"})
    );
    assert_eq!(
        recv(&mut bin, 10).await.bytes().unwrap().as_ref(),
        b"\x00\x01\x02"
    );

    // Acks, JSON and binary, both ways.
    b.on("double", |ev| {
        let n: i64 = ev.decode_json().unwrap_or(0);
        ev.reply(json!(n * 2));
    });
    a.on("rev", |ev| {
        let mut v = ev.bytes().unwrap().to_vec();
        v.reverse();
        ev.reply(Bytes::from(v));
    });
    let r = a
        .to(b.id())
        .emit_with_ack("double", json!(21))
        .await
        .unwrap();
    assert_eq!(r, Payload::Json(json!(42)));
    let r = b
        .to(a.id())
        .emit_with_ack("rev", Bytes::from_static(b"abc"))
        .await
        .unwrap();
    assert_eq!(r.as_bytes().unwrap().as_ref(), b"cba");

    // A large binary message (split into frames) and 5000 events keep their order.
    let big: Vec<u8> = (0..1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let mut at_b = collect(&b, "big");
    a.emit("big", Bytes::from(big.clone())).await.unwrap();
    assert!(recv(&mut at_b, 20).await.bytes().unwrap().as_ref() == big.as_slice());
    let mut seq = collect(&b, "n");
    let t = Instant::now();
    for i in 0..5000u32 {
        a.emit("n", json!(i)).await.unwrap();
    }
    for i in 0..5000u32 {
        assert_eq!(recv(&mut seq, 20).await.decode_json::<u32>().unwrap(), i);
    }
    eprintln!("5000 events across nodes in {:?}", t.elapsed());

    // A peer that does not exist anywhere: the sender's error, as on one node.
    let e = a.to("nobody").emit("x", "y").await.unwrap_err();
    assert!(matches!(e, Error::PeerOffline(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_rooms_and_presence() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("rooms")).await;
    let n2 = spawn_node(redis.cluster("rooms")).await;
    let a = peer(&n1, relay_opts().room("r1")).await;
    let mut pe = a.peer_events();
    let b = peer(&n2, relay_opts().room("r1")).await;
    let c = peer(&n2, relay_opts().room("r2")).await;
    let bid = b.id().to_owned();
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Joined { room, peer } if peer.id == bid => Some(room),
        _ => None,
    })
    .await;
    assert_eq!(a.room_peers("r1").await.unwrap().len(), 1);
    // c (node 2, room r2) is out of a's scope.
    let e = c.to(a.id()).emit("m", "x").await.unwrap_err();
    assert!(matches!(e, Error::PeerOffline(_)), "{e:?}");
    // c joins r1: a hears of it, and c gets a's messages.
    let mut at_c = collect(&c, "m");
    let others = c.join("r1").await.unwrap();
    assert_eq!(others.len(), 2, "{others:?}");
    let cid = c.id().to_owned();
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Joined { peer, .. } if peer.id == cid => Some(()),
        _ => None,
    })
    .await;
    a.emit("m", "now c too").await.unwrap();
    assert_eq!(
        recv(&mut at_c, 10).await.decode_json::<String>().unwrap(),
        "now c too"
    );
    // b leaves r1: a is told, b is out of reach.
    b.leave("r1").await.unwrap();
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Left { peer, room } if peer.id == bid => Some(room),
        _ => None,
    })
    .await;
    let e = a.to(b.id()).emit("m", "x").await.unwrap_err();
    assert!(matches!(e, Error::PeerOffline(_)), "{e:?}");
    // c disconnects: a is told at once.
    let t = Instant::now();
    c.close().await;
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Disconnected { peer } if peer.id == cid => Some(()),
        _ => None,
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_uid_clash_and_release() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("uid")).await;
    let n2 = spawn_node(redis.cluster("uid")).await;
    let a = peer(&n1, relay_opts().uid("alice")).await;
    let e = P2p::connect(&n2.url(), relay_opts().uid("alice"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UidTaken(_)), "{e:?}");
    a.close().await;
    assert!(
        wait_until(10, || async { n2.signaling.peers().is_empty() }).await,
        "node 2 still lists the peer"
    );
    let again = peer(&n2, relay_opts().uid("alice")).await;
    assert_eq!(again.uid(), Some("alice"));
    // And now node 1 refuses it.
    let e = P2p::connect(&n1.url(), relay_opts().uid("alice"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UidTaken(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_pair_by_uid() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("pair")).await;
    let n2 = spawn_node(redis.cluster("pair")).await;
    // c1 (node 1) waits for c2, which registers later on node 2.
    let url = n1.url();
    let a = tokio::spawn(
        async move { P2p::connect(&url, relay_opts().uid("c1").peer_uid("c2")).await },
    );
    assert!(
        wait_until(10, || async {
            n2.signaling
                .peers()
                .iter()
                .any(|p| p.uid.as_deref() == Some("c1"))
        })
        .await
    );
    let b = peer(&n2, relay_opts().uid("c2")).await;
    let a = a.await.unwrap().unwrap();
    let peers = a.peers().await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].uid.as_deref(), Some("c2"));
    wait_peers(&b, 1).await;
    let mut got = collect(&b, "event1");
    a.emit("event1", "hello").await.unwrap();
    assert_eq!(recv(&mut got, 10).await.from_uid(), Some("c1"));
    b.on("event2", |ev| {
        ev.reply("confirmed");
    });
    let r = a
        .to(&peers[0].id)
        .emit_with_ack("event2", "hello")
        .await
        .unwrap();
    assert_eq!(r, Payload::from("confirmed"));
    // The pair is private: a third peer on node 2 cannot reach them.
    let c = peer(&n2, relay_opts()).await;
    assert!(c.peers().await.unwrap().is_empty());
    let e = c.to(a.id()).emit("x", "y").await.unwrap_err();
    assert!(matches!(e, Error::PeerOffline(_)), "{e:?}");
    // b disconnects: a is told.
    let mut pe = a.peer_events();
    let bid = b.id().to_owned();
    b.close().await;
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Disconnected { peer } if peer.id == bid => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_later_sees_existing_peers() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("late")).await;
    let a = peer(&n1, relay_opts()).await;
    let n2 = spawn_node(redis.cluster("late")).await;
    let b = peer(&n2, relay_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let mut got = collect(&a, "m");
    b.emit("m", "from the late node").await.unwrap();
    assert_eq!(
        recv(&mut got, 10).await.decode_json::<String>().unwrap(),
        "from the late node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_webrtc_upgrade() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("rtc")).await;
    let n2 = spawn_node(redis.cluster("rtc")).await;
    let a = peer(&n1, rtc_opts()).await;
    let b = peer(&n2, rtc_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let mut pe = b.peer_events();
    let t = Instant::now();
    a.upgrade_peer(b.id()).await.unwrap();
    eprintln!("cross-node upgrade in {:?}", t.elapsed());
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::DataChannel);
    let aid = a.id().to_owned();
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Upgraded { peer } if peer.id == aid => Some(()),
        _ => None,
    })
    .await;
    assert!(
        wait_until(10, || async {
            b.transport(a.id()).await.ok() == Some(Transport::DataChannel)
        })
        .await
    );
    let mut got = collect(&b, "dc");
    a.emit("dc", json!({"over": "webrtc"})).await.unwrap();
    let ev = recv(&mut got, 10).await;
    assert_eq!(ev.transport(), Transport::DataChannel);
    b.on("ack", |ev| {
        ev.reply("pong");
    });
    let r = a.to(b.id()).emit_with_ack("ack", "ping").await.unwrap();
    assert_eq!(r, Payload::from("pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_death_announces_disconnects_and_frees_uids() {
    let redis = RedisServer::start();
    let cluster = redis.cluster("death").node_timeout(Duration::from_secs(1));
    let n1 = spawn_node(cluster.clone()).await;
    let mut n2 = crashable_node(cluster);
    let a = peer(&n1, relay_opts().room("r")).await;
    let b = P2p::connect(
        &n2.url(),
        relay_opts().uid("bob").room("r").reconnect(false),
    )
    .await
    .unwrap();
    wait_peers(&a, 1).await;
    let mut pe = a.peer_events();
    let bid = b.id().to_owned();
    // The uid is taken cluster-wide while node 2 lives.
    let e = P2p::connect(&n1.url(), relay_opts().uid("bob"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UidTaken(_)), "{e:?}");

    let t = Instant::now();
    n2.kill();
    next_event(&mut pe, |ev| match ev {
        PeerEvent::Disconnected { peer } if peer.id == bid => Some(()),
        _ => None,
    })
    .await;
    let noticed = t.elapsed();
    eprintln!("dead node noticed in {noticed:?}");
    // node_timeout 1 s, heartbeats every 200 ms: noticed after 1.0 to 1.2 s on a quiet machine.
    assert!(noticed < Duration::from_secs(4), "took {noticed:?}");
    assert!(n1.signaling.peers().iter().all(|p| p.id != bid));
    // The uid of the dead node's peer is free again.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(10);
    let again = loop {
        match P2p::connect(&n1.url(), relay_opts().uid("bob")).await {
            Ok(p) => break p,
            Err(e) => {
                assert!(Instant::now() < deadline, "uid never freed: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(again.uid(), Some("bob"));
    eprintln!("uid free {:?} after the death was noticed", t.elapsed());
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_moved_to_another_node_resumes_with_its_id_and_uid() {
    let redis = RedisServer::start();
    let opts = socketio_p2p_signaling::SignalingOptions::default()
        .resume_grace(Duration::from_millis(1500));
    let n1 = spawn_node_with(redis.cluster("move"), opts.clone()).await;
    let n2 = spawn_node_with(redis.cluster("move"), opts).await;
    let lb = Cutter::start(n1.addr).await;
    let a = peer(&n1, relay_opts().room("r")).await;
    let b = P2p::connect(&lb.url(), relay_opts().uid("bob").room("r"))
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let bid = b.id().to_owned();
    let mut a_events = a.peer_events();
    let mut b_events = b.peer_events();
    let mut at_a = collect(&a, "m");
    let mut at_b = collect(&b, "m");

    // The load balancer sends b's next connection to node 2.
    lb.switch(n2.addr);
    let continued = wait_event(&mut b_events, 30, |ev| match ev {
        PeerEvent::Reconnected { continued } => Some(continued),
        _ => None,
    })
    .await;
    assert!(continued, "the resume on another node was refused");
    assert_eq!(b.id(), bid);
    assert!(
        wait_until(10, || async {
            n2.signaling.peers().iter().any(|p| p.id == bid)
        })
        .await
    );
    b.emit("m", "from node 2").await.unwrap();
    assert_eq!(
        recv(&mut at_a, 10).await.decode_json::<String>().unwrap(),
        "from node 2"
    );
    a.to(&bid).emit("m", "to node 2").await.unwrap();
    assert_eq!(
        recv(&mut at_b, 10).await.decode_json::<String>().unwrap(),
        "to node 2"
    );
    // The uid moved with it, and the end of node 1's grace period (1.5 s) announces nothing:
    // a hears of no disconnect for two grace periods.
    let e = P2p::connect(&n1.url(), relay_opts().uid("bob"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UidTaken(_)), "{e:?}");
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(ev) = a_events.next().await {
            if matches!(&ev, PeerEvent::Disconnected { peer } if peer.id == bid) {
                return;
            }
        }
        std::future::pending::<()>().await;
    })
    .await;
    assert!(quiet.is_err(), "a was told b disconnected");
    a.to(&bid).emit("m", "still there").await.unwrap();
    assert_eq!(
        recv(&mut at_b, 10).await.decode_json::<String>().unwrap(),
        "still there"
    );
}

/// A node whose `SocketIo` itself runs on socketioxide-redis's adapter, as an application
/// that broadcasts across nodes would build it.
async fn spawn_adapter_node(
    redis: &RedisServer,
    prefix: &str,
) -> (
    std::net::SocketAddr,
    socketioxide::SocketIo<socketioxide_redis::RedisAdapter<socketioxide::adapter::Emitter>>,
    tokio::task::JoinHandle<()>,
) {
    use socketio_p2p_signaling::{P2pSignaling, SignalingOptions, redis as r};
    use socketioxide_redis::{RedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
    let client = r::Client::open(format!("{}?protocol=resp3", redis.url)).unwrap();
    let config = RedisAdapterConfig::default().with_prefix(format!("sio-{prefix}"));
    let ctr = RedisAdapterCtr::new_with_redis_config(&client, config)
        .await
        .unwrap();
    let (layer, io) = socketioxide::SocketIo::builder()
        .max_buffer_size(4096)
        .with_adapter::<RedisAdapter<_>>(ctr)
        .build_layer();
    let signaling = P2pSignaling::with_redis(SignalingOptions::default(), redis.cluster(prefix))
        .await
        .unwrap();
    signaling.attach(&io).await.unwrap();
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(nodelay(listener), app).await;
    });
    (addr, io, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_built_on_the_socketioxide_redis_adapter() {
    use futures_util::FutureExt;
    let redis = RedisServer::start();
    let (addr1, io1, t1) = spawn_adapter_node(&redis, "adapter").await;
    let (addr2, _io2, t2) = spawn_adapter_node(&redis, "adapter").await;
    let a = P2p::connect(&format!("http://{addr1}"), relay_opts())
        .await
        .unwrap();
    let b = P2p::connect(&format!("http://{addr2}"), relay_opts())
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let mut got = collect(&b, "m");
    a.emit("m", "over the adapter").await.unwrap();
    assert_eq!(
        recv(&mut got, 10).await.decode_json::<String>().unwrap(),
        "over the adapter"
    );
    b.on("q", |ev| {
        ev.reply("a");
    });
    let r = a.to(b.id()).emit_with_ack("q", ()).await.unwrap();
    assert_eq!(r, Payload::from("a"));
    // The application's own broadcast from node 1 reaches a plain client on node 2.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _client = rust_socketio::asynchronous::ClientBuilder::new(format!("http://{addr2}"))
        .on("news", move |p, _| {
            let _ = tx.send(p);
            async {}.boxed()
        })
        .connect()
        .await
        .unwrap();
    let mut seen = false;
    for _ in 0..100 {
        io1.emit("news", "hello all").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(100), rx.recv())
            .await
            .is_ok()
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the adapter broadcast never reached node 2");
    t1.abort();
    t2.abort();
}

fn calc() -> socketio_p2p::Service {
    use socketio_p2p::ServiceError;
    socketio_p2p::Service::new()
        .method("add", |(a, b): (i64, i64)| async move {
            Ok::<_, ServiceError>(a + b)
        })
        .method("fail", |_: ()| async move {
            Err::<(), _>(ServiceError::new("Nope", "always fails"))
        })
        .method("hang", |_: ()| async move {
            std::future::pending::<()>().await;
            Ok::<_, ServiceError>(())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_services_unique_names_and_provider_loss() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("svc")).await;
    let n2 = spawn_node(redis.cluster("svc")).await;
    // Services are not scoped by rooms: the peers share none.
    let provider = peer(&n1, relay_opts().room("p")).await;
    let caller = peer(&n2, relay_opts().room("c")).await;
    let rival = peer(&n2, relay_opts().room("r")).await;
    provider.provide("calc", calc()).await.unwrap();
    // The name is taken cluster-wide.
    assert!(matches!(
        rival.provide("calc", calc()).await,
        Err(Error::ServiceTaken(_))
    ));
    assert!(
        wait_until(10, || async {
            let r: Result<i64, _> = caller.service("calc").call("add", (2, 3)).await;
            r.ok() == Some(5)
        })
        .await,
        "a call from node 2 never reached the provider on node 1"
    );
    match caller.service("calc").call::<()>("fail", ()).await {
        Err(Error::Remote { code, .. }) => assert_eq!(code, "Nope"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    let calls = (0..100i64).map(|i| {
        let caller = caller.clone();
        async move {
            let r: i64 = caller.service("calc").call("add", (i, 1)).await.unwrap();
            assert_eq!(r, i + 1);
        }
    });
    futures_util::future::join_all(calls).await;
    // The provider leaves during a call: the caller on the other node hears at once.
    let c2 = caller.clone();
    let pending = tokio::spawn(async move {
        c2.service("calc")
            .timeout(Duration::from_secs(60))
            .call::<()>("hang", ())
            .await
    });
    let r: i64 = caller.service("calc").call("add", (0, 0)).await.unwrap();
    assert_eq!(r, 0);
    let started = Instant::now();
    provider.close().await;
    match tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the call in flight never failed")
        .unwrap()
    {
        Err(Error::ServiceGone(_)) => {}
        other => panic!("expected ServiceGone, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The name is free again, everywhere.
    assert!(
        wait_until(10, || async { rival.provide("calc", calc()).await.is_ok() }).await,
        "the name of a provider that left stayed taken"
    );
    let r: i64 = caller.service("calc").call("add", (1, 1)).await.unwrap();
    assert_eq!(r, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_topics() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("topics")).await;
    let n2 = spawn_node(redis.cluster("topics")).await;
    let a = peer(&n1, relay_opts().room("a")).await;
    let b = peer(&n2, relay_opts().room("b")).await;
    let mut sa = a.subscribe("news").await.unwrap();
    let mut sb = b.subscribe("news").await.unwrap();
    assert!(wait_until(10, || async { n1.signaling.subscribers("news") == 2 }).await);
    assert!(wait_until(10, || async { n2.signaling.subscribers("news") == 2 }).await);
    for i in 0..50 {
        assert_eq!(a.publish("news", json!(i)).await.unwrap(), 2);
    }
    assert_eq!(n2.signaling.publish("news", json!("server")), 2);
    // Each publisher's publications in order, each once; no order between publishers (the
    // server of node 2 may overtake what a's node 1 is still forwarding).
    for sub in [&mut sa, &mut sb] {
        let mut from_a = Vec::new();
        let mut from_server = 0;
        for _ in 0..51 {
            let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .unwrap()
                .unwrap();
            match p.from {
                Some(f) => {
                    assert_eq!(f.id, a.id());
                    from_a.push(p.data);
                }
                None => {
                    assert_eq!(p.data, json!("server"));
                    from_server += 1;
                }
            }
        }
        assert_eq!(from_a, (0..50).map(|i| json!(i)).collect::<Vec<_>>());
        assert_eq!(from_server, 1);
    }
    drop(sb);
    assert!(wait_until(10, || async { n1.signaling.subscribers("news") == 1 }).await);
    b.close().await;
    assert_eq!(a.publish("news", "only a").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_forwarding_queue_slows_senders_down_without_loss() {
    let redis = RedisServer::start();
    let n1 = spawn_node(redis.cluster("queue").max_queue(64)).await;
    let n2 = spawn_node(redis.cluster("queue").max_queue(64)).await;
    let a = peer(&n1, relay_opts()).await;
    let b = peer(&n2, relay_opts()).await;
    wait_peers(&a, 1).await;
    let mut got = collect(&b, "n");
    const N: u64 = 3000;
    let a2 = a.clone();
    let to = b.id().to_owned();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            a2.to(&to).emit("n", json!(i)).await.unwrap();
        }
    });
    for i in 0..N {
        let ev = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await
            .expect("events stopped arriving")
            .unwrap();
        assert_eq!(ev.decode_json::<u64>().unwrap(), i);
    }
    sender.await.unwrap();
}
