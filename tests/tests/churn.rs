//! Churn, small: 100 connect -> upgrade -> disconnect cycles against one long-lived peer leave
//! no RTCPeerConnection, no task, no handler and no server-side peer behind (the 10,000-cycle
//! run with memory figures is the `churn` example).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use serde_json::json;
use socketio_p2p::Transport;
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_churn_cycles_leave_nothing_behind() {
    const CYCLES: u64 = 100;
    let s = spawn_server().await;
    let a = peer(&s, rtc_opts()).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let t = Instant::now();
    for i in 0..CYCLES {
        let b = peer(&s, rtc_opts()).await;
        wait_peers(&a, 1).await;
        a.upgrade_peer(b.id())
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A handler on each side, gone with its peer (b) or removed (a).
        b.once("x", move |ev| {
            let _ = tx.send(ev.transport());
        });
        let h = a.on("y", |_| {});
        a.to(b.id()).emit("x", json!(i)).await.unwrap();
        assert_eq!(recv(&mut rx, 10).await, Transport::DataChannel);
        a.off_handler(h);
        b.close().await;
        drop(b);
        wait_peers(&a, 0).await;
        assert!(wait_until(10, || async { a.webrtc_connections().await.unwrap() == 0 }).await);
    }
    eprintln!("{CYCLES} churn cycles in {:?}", t.elapsed());
    assert!(
        wait_until(20, || async {
            socketio_p2p::live_webrtc_connections() == 0
        })
        .await,
        "{} peer connections still alive",
        socketio_p2p::live_webrtc_connections()
    );
    assert!(
        wait_until(10, || async { s.signaling.peers().len() == 1 }).await,
        "the server still lists {:?}",
        s.signaling.peers()
    );
    let settled = wait_until(20, || async { metrics.num_alive_tasks() <= tasks_before }).await;
    assert!(
        settled,
        "tasks before {tasks_before}, after {}",
        metrics.num_alive_tasks()
    );
    // Nothing of the cycles is left on the side of a.
    assert!(a.peers().await.unwrap().is_empty());
}
