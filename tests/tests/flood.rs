//! A socket that floods the relay is throttled (`RateLimited`), then disconnected with the
//! reason, while the other peers keep talking.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use socketio_p2p::PeerEvent;
use socketio_p2p_signaling::SignalingOptions;
use socketio_p2p_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_is_throttled_then_disconnected() {
    let opts = SignalingOptions::default()
        .frame_rate(2_000, 2_000)
        .max_strikes(50);
    let s = spawn_server_with(opts).await;
    let b = peer(&s, relay_opts()).await;
    let c = peer(&s, relay_opts()).await;
    wait_peers(&b, 1).await;
    c.on("ping", |ev| {
        ev.reply("pong");
    });
    let mut flood = Raw::connect(&s).await;
    let w = flood.hello(None, &["default"]).await;
    let flood_id = w["id"].as_str().unwrap().to_owned();
    wait_peers(&b, 2).await;
    let mut b_events = b.peer_events();
    // Batches of 500 frames to b, as fast as the socket takes them.
    let batch: Vec<Vec<u8>> = (0..500).map(|_| chat_frame(b.id(), "", "spam")).collect();
    let flooder = tokio::spawn(async move {
        let mut refused = 0;
        let mut told = None;
        for _ in 0..2_000 {
            if flood
                .client
                .emit("p2p:f", batch_payload(&batch))
                .await
                .is_err()
            {
                break;
            }
            while let Some((ev, p)) = flood.next_within(Duration::ZERO).await {
                let text = format!("{p:?}");
                if ev == "p2p:error" && text.contains("RateLimited") {
                    refused += 1;
                    if text.contains("disconnected") {
                        told = Some(text);
                    }
                }
            }
            if told.is_some() {
                break;
            }
        }
        (refused, told)
    });
    // Meanwhile b and c carry on.
    for i in 0..20 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            b.to(c.id()).emit_with_ack("ping", json!(i)),
        )
        .await
        .expect("b and c stalled during the flood")
        .unwrap();
        assert_eq!(r.decode_json::<String>().unwrap(), "pong");
    }
    let (refused, told) = flooder.await.unwrap();
    assert!(refused > 0, "the flood was never throttled");
    assert!(
        told.is_some(),
        "the flooder was never told it is disconnected"
    );
    // The others hear that it left.
    wait_event(&mut b_events, 10, |e| match e {
        PeerEvent::Disconnected { peer } if peer.id == flood_id => Some(()),
        _ => None,
    })
    .await;
    assert!(
        s.signaling
            .stats()
            .errors
            .get("RateLimited")
            .copied()
            .unwrap_or(0)
            > 0
    );
}

fn batch_payload(frames: &[Vec<u8>]) -> serde_json::Value {
    let mut w = socketio_p2p_signaling::protocol::BatchWriter::new();
    for f in frames {
        w.push(f);
    }
    serde_json::Value::String(socketio_p2p_signaling::protocol::batch_to_base64(&w.take()))
}
