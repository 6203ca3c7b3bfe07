//! Golden vectors shared with the JavaScript client, so that both codecs are held to one
//! truth: frames and control messages made here are written to
//! `js/test/fixtures/golden-rust.json`, which the JS tests decode and re-encode byte for
//! byte; frames and requests the JS codec made (`js/test/fixtures/golden-js.json`,
//! committed) are decoded and re-encoded here.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::Bytes;
use serde_json::{Value, json};
use socketio_p2p_signaling::protocol::{
    BatchWriter, Body, CallError, CallOutcome, ErrorBody, ErrorCode, ErrorMsg, Frame,
    FrameEncoding, Msg, Op, PeerInfo, Presence, Publication, Request, Response, Resume, RoomPeers,
    StreamOp, Welcome, WirePayload, batch_from_base64, batch_to_base64, split_batch,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../js/test/fixtures")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A frame as JSON, in the shape the JS codec uses (bytes as hex, u64 nonces as strings).
fn describe(f: &Frame) -> Value {
    fn payload(p: &WirePayload) -> Value {
        json!({"binary": p.is_binary(), "hex": hex(p.bytes())})
    }
    fn msg(m: &Msg) -> Value {
        match m {
            Msg::Event {
                event,
                ack_id,
                payload: p,
            } => {
                json!({"type": "event", "event": event, "ackId": ack_id.map_or(0, std::num::NonZeroU64::get), "payload": payload(p)})
            }
            Msg::Reply { ack_id, payload: p } => {
                json!({"type": "reply", "ackId": ack_id, "payload": payload(p)})
            }
            Msg::ReplyError {
                ack_id,
                code,
                message,
            } => {
                json!({"type": "replyError", "ackId": ack_id, "code": code, "message": message})
            }
            Msg::Continuation { data } => json!({"type": "continuation", "hex": hex(data)}),
            Msg::Stream { id, opener, op } => {
                let op = match op {
                    StreamOp::Open { name } => json!({"op": "open", "name": name}),
                    StreamOp::Accept => json!({"op": "accept"}),
                    StreamOp::Refuse { code, message } => {
                        json!({"op": "refuse", "code": code, "message": message})
                    }
                    StreamOp::Data(d) => json!({"op": "data", "hex": hex(d)}),
                    StreamOp::Credit(n) => json!({"op": "credit", "bytes": n}),
                    StreamOp::Fin => json!({"op": "fin"}),
                    StreamOp::Reset { code, message } => {
                        json!({"op": "reset", "code": code, "message": message})
                    }
                };
                json!({"type": "stream", "id": id, "opener": opener, "op": op})
            }
        }
    }
    let body = match &f.body {
        Body::Data { seq, more, msg: m } => {
            json!({"kind": "data", "seq": seq, "more": more, "msg": msg(m)})
        }
        Body::Volatile { msg: m } => json!({"kind": "volatile", "msg": msg(m)}),
        Body::LinkAck { upto, nack } => json!({"kind": "linkAck", "upto": upto, "nack": nack}),
        Body::Ping { nonce, pong } => {
            json!({"kind": "ping", "nonce": nonce.to_string(), "pong": pong})
        }
    };
    json!({"to": f.to, "from": f.from, "body": body})
}

fn json_payload(s: &str) -> WirePayload {
    WirePayload::Json(Bytes::from(s.to_owned()))
}

fn bin(b: &[u8]) -> WirePayload {
    WirePayload::Binary(Bytes::copy_from_slice(b))
}

fn frame(to: &str, from: &str, body: Body) -> Frame {
    Frame {
        to: to.into(),
        from: from.into(),
        body,
    }
}

fn data(seq: u64, more: bool, msg: Msg) -> Body {
    Body::Data { seq, more, msg }
}

fn stream(id: u64, opener: bool, op: StreamOp) -> Msg {
    Msg::Stream { id, opener, op }
}

fn rust_frames() -> Vec<(&'static str, Frame)> {
    let awkward = [0x00, 0x1d, 0x1e, 0x7f, 0x80, 0xff];
    let big: Vec<u8> = (0..16384u32).map(|i| (i * 31 + 7) as u8).collect();
    vec![
        (
            "event json, protocol example",
            frame(
                "B",
                "",
                data(
                    1,
                    false,
                    Msg::Event {
                        event: "hi".into(),
                        ack_id: None,
                        payload: json_payload(r#"{"x":1}"#),
                    },
                ),
            ),
        ),
        (
            "event relayed with from",
            frame(
                "B",
                "A",
                data(
                    1,
                    false,
                    Msg::Event {
                        event: "hi".into(),
                        ack_id: None,
                        payload: json_payload(r#"{"x":1}"#),
                    },
                ),
            ),
        ),
        (
            "event with ack, unicode name, empty payload",
            frame(
                "Jb2LmP8sQwE4rT6y",
                "Zk3q9aT0cVxB1mQe",
                data(
                    300,
                    false,
                    Msg::Event {
                        event: "héllo ✓".into(),
                        ack_id: std::num::NonZeroU64::new(16384),
                        payload: json_payload(""),
                    },
                ),
            ),
        ),
        (
            "binary event head fragment",
            frame(
                "B",
                "",
                data(
                    7,
                    true,
                    Msg::Event {
                        event: "f".into(),
                        ack_id: std::num::NonZeroU64::new(4),
                        payload: bin(&big),
                    },
                ),
            ),
        ),
        (
            "continuation tail",
            frame(
                "B",
                "",
                data(
                    8,
                    false,
                    Msg::Continuation {
                        data: Bytes::copy_from_slice(&awkward),
                    },
                ),
            ),
        ),
        (
            "reply json",
            frame(
                "A",
                "",
                data(
                    1,
                    false,
                    Msg::Reply {
                        ack_id: 1,
                        payload: json_payload(r#""ok""#),
                    },
                ),
            ),
        ),
        (
            "reply binary",
            frame(
                "A",
                "B",
                data(
                    2,
                    false,
                    Msg::Reply {
                        ack_id: 2,
                        payload: bin(&awkward),
                    },
                ),
            ),
        ),
        (
            "reply error",
            frame(
                "A",
                "",
                data(
                    3,
                    false,
                    Msg::ReplyError {
                        ack_id: 9,
                        code: "NoHandler".into(),
                        message: "no handler for \"x\" ✗".into(),
                    },
                ),
            ),
        ),
        (
            "volatile event",
            frame(
                "B",
                "",
                Body::Volatile {
                    msg: Msg::Event {
                        event: "pos".into(),
                        ack_id: None,
                        payload: bin(&awkward),
                    },
                },
            ),
        ),
        (
            "link ack",
            frame(
                "A",
                "",
                Body::LinkAck {
                    upto: 1,
                    nack: false,
                },
            ),
        ),
        (
            "link ack nack, large upto",
            frame(
                "A",
                "B",
                Body::LinkAck {
                    upto: (1 << 40) + 5,
                    nack: true,
                },
            ),
        ),
        (
            "ping",
            frame(
                "B",
                "",
                Body::Ping {
                    nonce: 5,
                    pong: false,
                },
            ),
        ),
        (
            "pong with a u64 nonce",
            frame(
                "A",
                "B",
                Body::Ping {
                    nonce: u64::MAX - 2,
                    pong: true,
                },
            ),
        ),
        (
            "keepalive ping nonce 0",
            frame(
                "B",
                "",
                Body::Ping {
                    nonce: 0,
                    pong: false,
                },
            ),
        ),
        (
            "stream open",
            frame(
                "B",
                "",
                data(
                    10,
                    false,
                    stream(
                        1,
                        true,
                        StreamOp::Open {
                            name: "photo.jpg".into(),
                        },
                    ),
                ),
            ),
        ),
        (
            "stream accept",
            frame("A", "", data(11, false, stream(1, false, StreamOp::Accept))),
        ),
        (
            "stream refuse",
            frame(
                "A",
                "",
                data(
                    12,
                    false,
                    stream(
                        2,
                        false,
                        StreamOp::Refuse {
                            code: "Refused".into(),
                            message: "only photos".into(),
                        },
                    ),
                ),
            ),
        ),
        (
            "stream data",
            frame(
                "B",
                "",
                data(
                    13,
                    false,
                    stream(1, true, StreamOp::Data(Bytes::copy_from_slice(&awkward))),
                ),
            ),
        ),
        (
            "stream credit",
            frame(
                "A",
                "",
                data(14, false, stream(1, false, StreamOp::Credit(1 << 20))),
            ),
        ),
        (
            "stream fin",
            frame("B", "", data(15, false, stream(1, true, StreamOp::Fin))),
        ),
        (
            "stream reset",
            frame(
                "B",
                "",
                data(
                    16,
                    false,
                    stream(
                        300,
                        true,
                        StreamOp::Reset {
                            code: "Dropped".into(),
                            message: "".into(),
                        },
                    ),
                ),
            ),
        ),
    ]
}

fn control_messages() -> Vec<(&'static str, Value)> {
    let req = |rid, op| serde_json::to_value(Request { rid, op }).unwrap();
    let peer = |id: &str, uid: Option<&str>| PeerInfo {
        id: id.into(),
        uid: uid.map(Into::into),
    };
    vec![
        (
            "request hello with resume",
            req(
                1,
                Op::Hello {
                    version: 2,
                    uid: Some("alice".into()),
                    rooms: vec!["lobby".into()],
                    resume: Some(Resume {
                        id: "Zk3q9aT0cVxB1mQe".into(),
                        token: "inst.9b1f0c7a".into(),
                    }),
                    frames: FrameEncoding::Binary,
                    batch_presence: false,
                },
            ),
        ),
        (
            "request join",
            req(
                2,
                Op::Join {
                    room: "game".into(),
                },
            ),
        ),
        (
            "request pair",
            req(
                5,
                Op::Pair {
                    peer_uid: "bob".into(),
                    timeout_ms: Some(10000),
                },
            ),
        ),
        (
            "request call",
            req(
                9,
                Op::Call {
                    service: "calc".into(),
                    method: "add".into(),
                    args: json!([2, 3]),
                    timeout_ms: Some(10000),
                },
            ),
        ),
        (
            "request call_result",
            req(
                10,
                Op::CallResult {
                    cid: 4,
                    outcome: CallOutcome::Error(CallError {
                        code: "UnknownMethod".into(),
                        message: "no".into(),
                    }),
                },
            ),
        ),
        (
            "response welcome",
            serde_json::to_value(Response {
                rid: 1,
                ok: Some(
                    serde_json::to_value(Welcome {
                        id: "Zk3q9aT0cVxB1mQe".into(),
                        uid: Some("alice".into()),
                        rooms: vec![RoomPeers {
                            room: "lobby".into(),
                            peers: vec![peer("Jb2LmP8sQwE4rT6y", Some("bob"))],
                            more: false,
                        }],
                        max_frame: 262144,
                        token: "inst.9b1f0c7a".into(),
                        continued: false,
                        ice_servers: Vec::new(),
                    })
                    .unwrap(),
                ),
                error: None,
            })
            .unwrap(),
        ),
        (
            "response error",
            serde_json::to_value(Response {
                rid: 5,
                ok: None,
                error: Some(ErrorBody {
                    code: ErrorCode::PeerOffline,
                    message: "no peer".into(),
                }),
            })
            .unwrap(),
        ),
        (
            "presence joined",
            serde_json::to_value(Presence::Joined {
                room: "lobby".into(),
                peer: peer("A", Some("alice")),
            })
            .unwrap(),
        ),
        (
            "presence disconnected",
            serde_json::to_value(Presence::Disconnected {
                peer: peer("A", None),
            })
            .unwrap(),
        ),
        (
            "error busy",
            serde_json::to_value(ErrorMsg {
                error: ErrorBody {
                    code: ErrorCode::Busy,
                    message: "full".into(),
                },
                event: Some("p2p:f".into()),
                to: Some("B".into()),
                seq: Some(42),
            })
            .unwrap(),
        ),
        (
            "publication",
            serde_json::to_value(Publication {
                topic: "news".into(),
                from: None,
                data: json!({"title": "hi"}),
                missed: 0,
            })
            .unwrap(),
        ),
    ]
}

#[test]
fn rust_vectors_for_js() {
    let frames: Vec<Value> = rust_frames()
        .into_iter()
        .map(|(name, f)| {
            let bytes = f.encode().unwrap();
            assert_eq!(Frame::decode(&bytes).unwrap(), f, "{name}");
            json!({"name": name, "hex": hex(&bytes), "frame": describe(&f)})
        })
        .collect();
    // Batches: consecutive runs of the frames above, as one `p2p:f` argument would carry them.
    let encoded: Vec<Bytes> = rust_frames()
        .into_iter()
        .map(|(_, f)| f.encode().unwrap())
        .collect();
    let batches: Vec<Value> = [(0, 1), (0, 3), (9, 14), (3, 5), (0, encoded.len())]
        .into_iter()
        .map(|(a, b)| {
            let mut w = BatchWriter::new();
            for f in &encoded[a..b] {
                w.push(f);
            }
            let batch = w.take();
            let split = split_batch(&batch).unwrap();
            assert_eq!(split, encoded[a..b].to_vec());
            let b64 = batch_to_base64(&batch);
            assert_eq!(batch_from_base64(&b64).unwrap(), batch);
            json!({"frames": (a..b).collect::<Vec<_>>(), "hex": hex(&batch), "base64": b64})
        })
        .collect();
    let control: Vec<Value> = control_messages()
        .into_iter()
        .map(|(name, v)| json!({"name": name, "json": v}))
        .collect();
    let doc = json!({
        "about": "written by tests/tests/golden.rs from the Rust codec; checked by js/test/golden.test.mjs",
        "frames": frames,
        "batches": batches,
        "control": control,
    });
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    let path = fixtures().join("golden-rust.json");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::create_dir_all(fixtures()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
}

#[test]
fn js_vectors_decode_and_reencode() {
    let path = fixtures().join("golden-js.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let frames = doc["frames"].as_array().unwrap();
    assert!(frames.len() >= 10, "too few JS frames");
    for v in frames {
        let name = v["name"].as_str().unwrap();
        let bytes = Bytes::from(unhex(v["hex"].as_str().unwrap()));
        let f = Frame::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(describe(&f), v["frame"], "{name}");
        assert_eq!(f.encode().unwrap(), bytes, "{name}: re-encoded");
    }
    for v in doc["batches"].as_array().unwrap() {
        let batch = Bytes::from(unhex(v["hex"].as_str().unwrap()));
        let split = split_batch(&batch).unwrap();
        let want: Vec<Bytes> = v["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                Bytes::from(unhex(
                    frames[i.as_u64().unwrap() as usize]["hex"]
                        .as_str()
                        .unwrap(),
                ))
            })
            .collect();
        assert_eq!(split, want);
        assert_eq!(batch_to_base64(&batch), v["base64"].as_str().unwrap());
    }
    let requests = doc["requests"].as_array().unwrap();
    assert!(!requests.is_empty());
    for v in requests {
        let name = v["name"].as_str().unwrap();
        let r: Request =
            serde_json::from_value(v["json"].clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let op = serde_json::to_value(&r).unwrap()["op"].clone();
        assert_eq!(op, v["json"]["op"], "{name}");
    }
}
