//! The properties the fuzz targets check (fuzz/fuzz_targets/), as property tests for CI:
//! the frame decoder, the batch codec and control-message parsing never panic on arbitrary
//! input, and whatever they accept goes back and forth unchanged.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use proptest::prelude::*;
use socketio_p2p_signaling::protocol::{
    BatchWriter, Body, Frame, Op, Request, batch_from_base64, batch_to_base64, peek_route,
    split_batch, stamp_from,
};

/// The `frame_decode` fuzz target.
fn check_frame(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    let route = peek_route(data);
    if let Ok(route) = &route {
        let _ = route.seq();
        if let Ok(stamped) = stamp_from(route, "stamped")
            && let (Ok(a), Ok(b)) = (Frame::decode(&bytes), Frame::decode(&stamped))
        {
            assert_eq!(b.from, "stamped");
            assert_eq!((a.to, a.body), (b.to, b.body));
        }
    }
    let Ok(frame) = Frame::decode(&bytes) else {
        return;
    };
    let route = route.expect("a frame that decodes has a route");
    assert_eq!(route.to, frame.to);
    let seq = match frame.body {
        Body::Data { seq, .. } => Some(seq),
        _ => None,
    };
    assert_eq!(route.seq(), seq);
    let again = frame.encode().expect("a decoded frame encodes");
    assert_eq!(Frame::decode(&again).expect("decodes"), frame);
}

/// The `batch` fuzz target.
fn check_batch(batch: &Bytes) {
    let Ok(frames) = split_batch(batch) else {
        return;
    };
    let mut w = BatchWriter::new();
    for f in &frames {
        assert!(!f.is_empty());
        w.push(f);
    }
    let rebuilt = w.take();
    assert_eq!(
        split_batch(&rebuilt).expect("a rebuilt batch splits"),
        frames
    );
    if rebuilt.len() == batch.len() {
        assert_eq!(&rebuilt, batch);
    }
    let text = batch_to_base64(&rebuilt);
    assert_eq!(batch_from_base64(&text).expect("own base64"), rebuilt);
}

/// The `control` fuzz target.
fn check_control(text: &str) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let Ok(req) = serde_json::from_value::<Request>(value) else {
        return;
    };
    if let Op::Signal { signal, .. } = &req.op {
        let _ = signal.validate();
    }
    let json = serde_json::to_string(&req).expect("a request serializes");
    let back: Request = serde_json::from_str(&json).expect("own JSON parses");
    assert_eq!(back, req);
}

/// Frames shaped like real ones (version 1, a known kind), with arbitrary bodies.
fn framish() -> impl Strategy<Value = Vec<u8>> {
    (
        1u8..5,
        0u8..16,
        "[a-z]{0,8}",
        "[a-z]{0,8}",
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(kind, flags, to, from, body)| {
            let mut v = vec![1, kind, flags, to.len() as u8];
            v.extend_from_slice(to.as_bytes());
            v.push(from.len() as u8);
            v.extend_from_slice(from.as_bytes());
            v.extend(body);
            v
        })
}

/// JSON requests with every op and arbitrary field values.
fn requestish() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        Just("hello"),
        Just("join"),
        Just("leave"),
        Just("peers"),
        Just("pair"),
        Just("signal"),
        Just("provide"),
        Just("unprovide"),
        Just("call"),
        Just("call_result"),
        Just("subscribe"),
        Just("unsubscribe"),
        Just("publish"),
    ];
    let value = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        "[a-z]{0,6}".prop_map(|s| format!("{s:?}")),
        Just(r#"{"type":"offer","sdp":"v=0\nm=x"}"#.to_owned()),
        Just(r#"{"type":"candidate","candidate":"candidate:1","sdpMLineIndex":0}"#.to_owned()),
        Just(r#"{"ok":[1,2]}"#.to_owned()),
        Just(r#"["r1","r2"]"#.to_owned()),
    ];
    let field = prop_oneof![
        Just("version"),
        Just("uid"),
        Just("rooms"),
        Just("room"),
        Just("peer_uid"),
        Just("timeout_ms"),
        Just("to"),
        Just("signal"),
        Just("service"),
        Just("method"),
        Just("args"),
        Just("cid"),
        Just("outcome"),
        Just("topic"),
        Just("data"),
        Just("frames"),
    ];
    (
        any::<u32>(),
        op,
        proptest::collection::vec((field, value), 0..5),
    )
        .prop_map(|(rid, op, fields)| {
            let mut s = format!(r#"{{"rid":{rid},"op":"{op}""#);
            for (k, v) in fields {
                s.push_str(&format!(r#","{k}":{v}"#));
            }
            s.push('}');
            s
        })
}

proptest! {
    #[test]
    fn frame_decoder_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_frame(&data);
    }

    #[test]
    fn frame_decoder_on_framish_bytes(data in framish()) {
        check_frame(&data);
    }

    #[test]
    fn batches_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_batch(&Bytes::from(data));
    }

    #[test]
    fn batches_from_arbitrary_text(text in "[A-Za-z0-9+/=]{0,64}") {
        if let Ok(batch) = batch_from_base64(&text) {
            check_batch(&batch);
        }
    }

    #[test]
    fn batch_round_trip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 1..10)) {
        let mut w = BatchWriter::new();
        for f in &frames {
            w.push(f);
        }
        let batch = w.take();
        check_batch(&batch);
        let back = batch_from_base64(&batch_to_base64(&batch)).unwrap();
        let split: Vec<Vec<u8>> = split_batch(&back).unwrap().iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(split, frames);
    }

    #[test]
    fn control_on_arbitrary_text(text in ".{0,128}") {
        check_control(&text);
    }

    #[test]
    fn control_on_request_shapes(text in requestish()) {
        check_control(&text);
    }
}

/// Inputs the fuzzers found interesting, kept as regressions.
#[test]
fn regressions() {
    for f in [
        &b""[..],
        &[1],
        &[1, 1, 0, 0, 0],
        &[1, 1, 1, 0, 0, 1, 1, 0, 0],
    ] {
        check_frame(f);
        check_batch(&Bytes::copy_from_slice(f));
    }
    check_control(r#"{"rid":1,"op":"hello","version":2}"#);
    // Found by the `control` fuzz target: a number too large for u64 and a duplicate key.
    check_control(
        r#"{"rid": 14, "op": "publish", "topic": "news", "data": {"n": 18446744073709554674407370955161509554674, "f": -1.5e-301615, "f": -1.5e-300}}"#,
    );
}
