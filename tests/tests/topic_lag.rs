//! A topic subscriber that never reads, while a million publications go by: a bounded queue,
//! and a count of what it missed. Alone in its binary, so that the memory it measures is
//! the server's and not that of other tests running beside it.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use socketio_p2p_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_misses_publications_and_learns_how_many() {
    let s = spawn_server().await;
    let p = peer(&s, relay_opts()).await;
    let mut sub = p.subscribe("firehose").await.unwrap();
    let base = rss_kib();
    // A million publications go by while the subscriber reads nothing.
    const N: u64 = 1_000_000;
    for i in 0..N {
        s.signaling.publish("firehose", i);
        if i % 10_000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let grew_mib = rss_kib().saturating_sub(base) / 1024;
    // Then it reads: what it missed is counted in what it gets, and nothing is counted twice.
    let mut got = 0u64;
    let mut missed = 0u64;
    let mut last = None;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            Ok(Some(pb)) => {
                let n = pb.data.as_u64().unwrap();
                assert!(
                    last.is_none_or(|l| n > l),
                    "out of order: {n} after {last:?}"
                );
                last = Some(n);
                got += 1;
                missed += pb.missed;
            }
            Ok(None) => panic!("subscription closed"),
            Err(_) => break,
        }
    }
    // The last one tells how many went by since the one before it.
    s.signaling.publish("firehose", N);
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.data.as_u64(), Some(N));
    missed += end.missed;
    assert!(got < N, "nothing was missed: the queue is not bounded");
    assert!(missed > 0);
    assert_eq!(got + missed, N, "got {got}, told of {missed} missed");
    assert!(grew_mib < 200, "memory grew by {grew_mib} MiB");
    // The peer still works.
    p.publish("firehose", json!("after")).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.data, json!("after"));
}
