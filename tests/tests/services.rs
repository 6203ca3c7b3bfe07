//! Services (RPC routed by the server to a peer or run by the server) and topics.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use socketio_p2p::{Error, P2p, Service, ServiceError};
use socketio_p2p_tests::*;
use tokio::sync::Notify;

fn calc() -> Service {
    calc_with(None)
}

/// `calc`, whose `hang` method tells `hang_entered` when a call reached it.
fn calc_with(hang_entered: Option<Arc<Notify>>) -> Service {
    Service::new()
        .method("add", |(a, b): (i64, i64)| async move {
            Ok::<_, ServiceError>(a + b)
        })
        .method("div", |(a, b): (i64, i64)| async move {
            if b == 0 {
                return Err(ServiceError::new("DivByZero", "cannot divide by zero"));
            }
            Ok(a / b)
        })
        .method("hang", move |_: ()| {
            let entered = hang_entered.clone();
            async move {
                if let Some(e) = entered {
                    e.notify_one();
                }
                std::future::pending::<()>().await;
                Ok::<_, ServiceError>(())
            }
        })
        .method_with_caller(
            "whoami",
            |caller: socketio_p2p::PeerInfo, _: ()| async move { Ok::<_, ServiceError>(caller.id) },
        )
}

/// The same checks whoever provides "calc".
async fn check_calc(caller: &P2p) {
    let svc = caller.service("calc");
    let sum: i64 = svc.call("add", (2, 3)).await.unwrap();
    assert_eq!(sum, 5);
    match svc.call::<i64>("div", (1, 0)).await {
        Err(Error::Remote { code, message }) => {
            assert_eq!(code, "DivByZero");
            assert_eq!(message, "cannot divide by zero");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match svc.call::<i64>("nope", ()).await {
        Err(Error::Remote { code, .. }) => assert_eq!(code, "UnknownMethod"),
        other => panic!("expected UnknownMethod, got {other:?}"),
    }
    match svc.call::<i64>("add", "not numbers").await {
        Err(Error::Remote { code, .. }) => assert_eq!(code, "BadArgs"),
        other => panic!("expected BadArgs, got {other:?}"),
    }
    assert!(matches!(
        svc.call::<String>("add", (1, 1)).await,
        Err(Error::Serde(_))
    ));
    let me: String = svc.call("whoami", ()).await.unwrap();
    assert_eq!(me, caller.id());
    match svc
        .clone()
        .timeout(Duration::from_millis(300))
        .call::<()>("hang", ())
        .await
    {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Many calls at once.
    let calls = (0..200i64).map(|i| async move {
        let r: i64 = caller.service("calc").call("add", (i, i)).await.unwrap();
        assert_eq!(r, 2 * i);
    });
    futures_util::future::join_all(calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_provides_and_any_peer_calls() {
    let s = spawn_server().await;
    // Different rooms: services are not scoped by rooms.
    let provider = peer(&s, relay_opts().room("a")).await;
    let caller = peer(&s, relay_opts().room("b")).await;
    provider.provide("calc", calc()).await.unwrap();
    assert_eq!(s.signaling.services(), vec!["calc".to_string()]);
    check_calc(&caller).await;
    // The provider can call itself.
    let sum: i64 = provider.service("calc").call("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_provides_and_callers_cannot_tell() {
    let s = spawn_server().await;
    s.signaling.provide("calc", calc()).unwrap();
    let caller = peer(&s, relay_opts()).await;
    check_calc(&caller).await;
    // Taken by the server: a peer cannot take it.
    assert!(matches!(
        caller.provide("calc", calc()).await,
        Err(Error::ServiceTaken(_))
    ));
    assert!(s.signaling.unprovide("calc"));
    caller.provide("calc", calc()).await.unwrap();
    assert_eq!(
        s.signaling.provide("calc", calc()),
        Err(socketio_p2p::ErrorCode::ServiceTaken)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_are_unique_and_freed_when_the_provider_leaves() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    let c = peer(&s, relay_opts()).await;
    a.provide("calc", calc()).await.unwrap();
    a.provide("calc", calc()).await.unwrap(); // again by the same peer: fine
    match b.provide("calc", calc()).await {
        Err(Error::ServiceTaken(m)) => assert!(m.contains("calc")),
        other => panic!("expected ServiceTaken, got {other:?}"),
    }
    assert!(matches!(
        c.service("nothing").call::<()>("x", ()).await,
        Err(Error::NoSuchService(_))
    ));
    assert!(matches!(
        b.provide("", calc()).await,
        Err(Error::Rejected { .. })
    ));
    // Unprovide frees the name.
    a.unprovide("calc").await.unwrap();
    assert!(matches!(
        c.service("calc").call::<i64>("add", (1, 1)).await,
        Err(Error::NoSuchService(_))
    ));
    let hang_entered = Arc::new(Notify::new());
    b.provide("calc", calc_with(Some(hang_entered.clone())))
        .await
        .unwrap();
    let r: i64 = c.service("calc").call("add", (1, 1)).await.unwrap();
    assert_eq!(r, 2);
    // The provider disconnects: a call in flight fails at once, the name is free again.
    let c2 = c.clone();
    let pending = tokio::spawn(async move {
        c2.service("calc")
            .timeout(Duration::from_secs(60))
            .call::<()>("hang", ())
            .await
    });
    // Let the call reach the provider (the server holds it in flight) before it goes: a
    // later call that came back proves nothing about this one, which may not be sent yet.
    tokio::time::timeout(Duration::from_secs(10), hang_entered.notified())
        .await
        .expect("the call never reached the provider");
    let started = std::time::Instant::now();
    b.close().await;
    match tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the call in flight never failed")
        .unwrap()
    {
        Err(Error::ServiceGone(_)) => {}
        other => panic!("expected ServiceGone, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(wait_until(10, || async { s.signaling.services().is_empty() }).await);
    a.provide("calc", calc()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_deliver_each_publication_once_and_unsubscribe_on_drop_and_disconnect() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().room("x")).await;
    let b = peer(&s, relay_opts().room("y")).await;
    let c = peer(&s, relay_opts().room("z")).await;
    let mut sa = a.subscribe("news").await.unwrap();
    let mut sb = b.subscribe("news").await.unwrap();
    let mut sb2 = b.subscribe("news").await.unwrap(); // two handles on one peer
    let sc = c.subscribe("news").await.unwrap();
    assert_eq!(s.signaling.subscribers("news"), 3);
    for i in 0..100 {
        assert_eq!(a.publish("news", json!({ "n": i })).await.unwrap(), 3);
    }
    assert_eq!(s.signaling.publish("news", json!("from the server")), 3);
    for sub in [&mut sa, &mut sb, &mut sb2] {
        for i in 0..100 {
            let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(p.topic, "news");
            assert_eq!(p.data, json!({ "n": i }), "out of order or duplicated");
            assert_eq!(p.from.as_ref().map(|f| f.id.as_str()), Some(a.id()));
        }
        let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.data, json!("from the server"));
        assert!(p.from.is_none());
    }
    // Dropping the only handle unsubscribes; dropping one of two does not.
    drop(sc);
    assert!(wait_until(10, || async { s.signaling.subscribers("news") == 2 }).await);
    drop(sb2);
    assert_eq!(b.publish("news", "still here").await.unwrap(), 2);
    let p = tokio::time::timeout(Duration::from_secs(10), sb.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.data, json!("still here"));
    // Disconnecting unsubscribes.
    a.close().await;
    assert!(wait_until(10, || async { s.signaling.subscribers("news") == 1 }).await);
    assert_eq!(c.publish("news", "x").await.unwrap(), 1);
    assert_eq!(c.publish("empty", "x").await.unwrap(), 0);
    assert!(matches!(c.subscribe("").await, Err(Error::Rejected { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_and_subscriptions_come_back_after_a_server_restart() {
    let mut server = CrashableServer::start(0);
    let port = server.addr.port();
    let provider = peer_at(&server.url()).await;
    let caller = peer_at(&server.url()).await;
    provider.provide("calc", calc()).await.unwrap();
    let mut sub = caller.subscribe("news").await.unwrap();
    let r: i64 = caller.service("calc").call("add", (1, 2)).await.unwrap();
    assert_eq!(r, 3);
    server.kill();
    let _server2 = CrashableServer::start(port);
    // The new server knows nothing: the peers claim their services and topics again.
    assert!(
        wait_until(30, || async {
            let r: Result<i64, _> = caller.service("calc").call("add", (2, 2)).await;
            r.ok() == Some(4)
        })
        .await,
        "the service never came back"
    );
    assert!(
        wait_until(30, || async {
            provider.publish("news", "back").await.ok() == Some(1)
        })
        .await
    );
    let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.data, json!("back"));
}

async fn peer_at(url: &str) -> P2p {
    tokio::time::timeout(Duration::from_secs(20), P2p::connect(url, relay_opts()))
        .await
        .unwrap()
        .unwrap()
}
