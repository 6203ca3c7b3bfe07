//! The relay wire: batched `p2p:f` events, binary for socket.io-client-style clients and
//! base64 text for rust_socketio peers, converted by the server per recipient.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use socketio_p2p::{Payload, Transport};
use socketio_p2p_signaling::protocol::{BatchWriter, Body, Frame, Msg, WirePayload, split_batch};
use socketio_p2p_tests::sio::{Arg, BinaryClient};
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

/// Every byte value, 0x1d and 0x1e many times over (what broke rust_socketio's binary path).
fn nasty_bytes(len: usize) -> Bytes {
    (0..len)
        .map(|i| match i % 5 {
            0 => 0x1e,
            1 => 0x1d,
            _ => (i % 256) as u8,
        })
        .collect::<Vec<u8>>()
        .into()
}

fn data(to: &str, seq: u64, msg: Msg) -> Bytes {
    Frame {
        to: to.into(),
        from: String::new(),
        body: Body::Data {
            seq,
            more: false,
            msg,
        },
    }
    .encode()
    .unwrap()
}

/// Registers a binary-mode client in `room`; returns its peer id.
async fn hello_binary(c: &mut BinaryClient, room: &str) -> String {
    c.emit(
        "p2p:req",
        &[json!({"rid": 1, "op": "hello", "version": 2, "rooms": [room], "frames": "binary"})],
    )
    .await;
    let res = c.expect("p2p:res").await;
    let Some(Arg::Json(v)) = res.first() else {
        panic!("bad response {res:?}")
    };
    v["ok"]["id"].as_str().expect("welcome id").to_owned()
}

/// Reads `p2p:f` batches (which must arrive as binary) until `want` picks something out of
/// a frame; acknowledges every Data frame, as a real peer must.
async fn read_until<T>(
    c: &mut BinaryClient,
    me_to: &str,
    mut want: impl FnMut(&Frame) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing wanted came"
        );
        let args = c.expect("p2p:f").await;
        let [Arg::Binary(batch)] = args.as_slice() else {
            panic!("a binary-mode client must get one binary argument, got {args:?}")
        };
        let mut acks = BatchWriter::new();
        let mut found = None;
        for f in split_batch(batch).unwrap() {
            let frame = Frame::decode(&f).unwrap();
            if let Body::Data { seq, .. } = frame.body {
                acks.push(
                    &Frame {
                        to: me_to.into(),
                        from: String::new(),
                        body: Body::LinkAck {
                            upto: seq,
                            nack: false,
                        },
                    }
                    .encode()
                    .unwrap(),
                );
            }
            if found.is_none() {
                found = want(&frame);
            }
        }
        if !acks.is_empty() {
            c.emit_binary("p2p:f", acks.take()).await;
        }
        if let Some(v) = found {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_room_of_binary_and_base64_clients() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().room("mix")).await;
    let mut r = BinaryClient::connect(s.addr).await;
    let r_id = hello_binary(&mut r, "mix").await;
    wait_peers(&a, 1).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    a.on("from-r", move |ev| {
        let _ = tx.send((ev.from().to_owned(), ev.payload().clone(), ev.transport()));
    });
    a.on("double", |ev| {
        let n: i64 = ev.decode_json().unwrap_or(0);
        ev.reply(json!(n * 2));
    });

    // One binary batch with two frames: an event with every byte value, and an ack request.
    let payload = nasty_bytes(3000);
    let mut batch = BatchWriter::new();
    batch.push(&data(
        a.id(),
        1,
        Msg::Event {
            event: "from-r".into(),
            ack_id: None,
            payload: WirePayload::Binary(payload.clone()),
        },
    ));
    batch.push(&data(
        a.id(),
        2,
        Msg::Event {
            event: "double".into(),
            ack_id: std::num::NonZeroU64::new(7),
            payload: WirePayload::Json(Bytes::from_static(b"21")),
        },
    ));
    r.emit_binary("p2p:f", batch.take()).await;
    let (from, got, via) = recv(&mut rx, 10).await;
    assert_eq!(from, r_id);
    assert_eq!(got, Payload::Binary(payload.clone()));
    assert_eq!(via, Transport::Relay);
    let reply = read_until(&mut r, a.id(), |f| match &f.body {
        Body::Data {
            msg: Msg::Reply { ack_id: 7, payload },
            ..
        } => Some(payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reply, WirePayload::Json(Bytes::from_static(b"42")));

    // The other way: the Rust peer's base64 batch reaches the binary client as binary.
    a.to(&r_id)
        .emit("to-r", Payload::Binary(payload.clone()))
        .await
        .unwrap();
    let (from, got) = read_until(&mut r, a.id(), |f| match &f.body {
        Body::Data {
            msg: Msg::Event {
                event, payload: p, ..
            },
            ..
        } if event == "to-r" => Some((f.from.clone(), p.clone())),
        _ => None,
    })
    .await;
    assert_eq!(from, a.id(), "the server stamps the sender");
    assert_eq!(got, WirePayload::Binary(payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_separator_bytes_survive_the_text_path() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().room("rs")).await;
    let b = peer(&s, relay_opts().room("rs")).await;
    wait_peers(&a, 1).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let name = "ev\u{1d}\u{1e}";
    b.on(name, move |ev| {
        let _ = tx.send(ev.payload().clone());
    });
    b.on("echo\u{1e}", |ev| {
        ev.reply(ev.payload().clone());
    });
    // Small, fragmented (three 16 KiB frames) and JSON text with the separators in it.
    let sent = [
        Payload::Binary(nasty_bytes(64)),
        Payload::Binary(nasty_bytes(40 * 1024)),
        Payload::Json(json!({"k\u{1e}": "v\u{1d}\u{1e}\u{1e}"})),
    ];
    for p in &sent {
        a.to(b.id()).emit(name, p.clone()).await.unwrap();
    }
    for p in &sent {
        assert_eq!(&recv(&mut rx, 10).await, p);
    }
    let back = a
        .to(b.id())
        .emit_with_ack("echo\u{1e}", Payload::Binary(nasty_bytes(20_000)))
        .await
        .unwrap();
    assert_eq!(back, Payload::Binary(nasty_bytes(20_000)));
    let separators = back
        .as_bytes()
        .map_or(0, |b| b.iter().filter(|x| **x == 0x1e).count());
    assert!(separators >= 4000, "{separators} record separators");
}
