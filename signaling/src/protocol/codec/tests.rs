//! Round trips and malformed input for the frame and batch codecs.
use super::*;
use crate::protocol::{BatchWriter, batch_from_base64, batch_to_base64, split_batch};
use proptest::prelude::*;

fn arb_payload() -> impl Strategy<Value = WirePayload> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|v| WirePayload::Binary(Bytes::from(v))),
        ".{0,40}".prop_map(|s| WirePayload::Json(Bytes::from(s))),
    ]
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        // Any id, 0 included: the type cannot hold an ack id 0 (on the wire, 0 is "none").
        (".{0,20}", proptest::option::of(any::<u64>()), arb_payload()).prop_map(
            |(event, ack_id, payload)| Msg::Event {
                event,
                ack_id: ack_id.and_then(std::num::NonZeroU64::new),
                payload
            }
        ),
        (any::<u64>(), arb_payload()).prop_map(|(ack_id, payload)| Msg::Reply { ack_id, payload }),
        (any::<u64>(), "[A-Za-z]{0,20}", ".{0,40}").prop_map(|(ack_id, code, message)| {
            Msg::ReplyError {
                ack_id,
                code,
                message,
            }
        }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| Msg::Continuation {
            data: Bytes::from(v)
        }),
        (any::<u64>(), any::<bool>(), arb_stream_op()).prop_map(|(id, opener, op)| Msg::Stream {
            id,
            opener,
            op
        }),
    ]
}

fn arb_stream_op() -> impl Strategy<Value = StreamOp> {
    prop_oneof![
        ".{0,20}".prop_map(|name| StreamOp::Open { name }),
        Just(StreamOp::Accept),
        ("[a-zA-Z]{0,20}", ".{0,40}")
            .prop_map(|(code, message)| StreamOp::Refuse { code, message }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| StreamOp::Data(Bytes::from(v))),
        any::<u64>().prop_map(StreamOp::Credit),
        Just(StreamOp::Fin),
        ("[a-zA-Z]{0,20}", ".{0,40}").prop_map(|(code, message)| StreamOp::Reset { code, message }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let body = prop_oneof![
        (any::<u64>(), any::<bool>(), arb_msg()).prop_map(|(seq, more, msg)| Body::Data {
            seq,
            more,
            msg
        }),
        arb_msg().prop_map(|msg| Body::Volatile { msg }),
        (any::<u64>(), any::<bool>()).prop_map(|(upto, nack)| Body::LinkAck { upto, nack }),
        (any::<u64>(), any::<bool>()).prop_map(|(nonce, pong)| Body::Ping { nonce, pong }),
    ];
    ("[a-zA-Z0-9_-]{0,30}", "[a-zA-Z0-9_-]{0,30}", body).prop_map(|(to, from, body)| Frame {
        to,
        from,
        body,
    })
}

proptest! {
    #[test]
    fn roundtrip(frame in arb_frame()) {
        let bytes = frame.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = Frame::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, frame.clone());
        let route = peek_route(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(route.to, frame.to.as_str());
        let seq = match frame.body { Body::Data { seq, .. } => Some(seq), _ => None };
        prop_assert_eq!(route.seq(), seq);
        let stamped = stamp_from(&route, "server-set").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = Frame::decode(&stamped).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.from.as_str(), "server-set");
        prop_assert_eq!(back.body, frame.body);
    }

    #[test]
    fn batch_roundtrip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..20)) {
        let mut w = BatchWriter::new();
        for f in &frames {
            w.push(f);
        }
        prop_assert_eq!(w.count(), frames.len());
        let batch = w.take();
        prop_assert!(w.is_empty());
        let text = batch_to_base64(&batch);
        prop_assert!(!text.bytes().any(|b| b == 0x1e || b == 0x1d));
        let back = batch_from_base64(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &batch);
        let split = split_batch(&back).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let split: Vec<Vec<u8>> = split.iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(split, frames);
    }

    #[test]
    fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let b = Bytes::from(data);
        let _ = split_batch(&b);
        let _ = Frame::decode(&b);
        if let Ok(route) = peek_route(&b) {
            let _ = stamp_from(&route, "x");
        }
    }

    #[test]
    fn never_panics_on_mutated_frames(frame in arb_frame(), idx in any::<usize>(), byte in any::<u8>()) {
        let bytes = frame.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut v = bytes.to_vec();
        let i = idx % v.len();
        v[i] = byte;
        let _ = Frame::decode(&Bytes::from(v.clone()));
        v.truncate(i);
        let _ = Frame::decode(&Bytes::from(v));
    }
}

#[test]
fn bad_batches_are_refused() {
    assert_eq!(split_batch(&Bytes::new()), Err(CodecError::Batch));
    assert_eq!(
        split_batch(&Bytes::from_static(&[0])),
        Err(CodecError::Batch)
    );
    assert_eq!(
        split_batch(&Bytes::from_static(&[3, 1, 2])),
        Err(CodecError::Truncated)
    );
    assert_eq!(batch_from_base64("not base64!"), Err(CodecError::Base64));
    let two = split_batch(&Bytes::from_static(&[1, 9, 2, 7, 8])).unwrap_or_default();
    assert_eq!(
        two,
        vec![Bytes::from_static(&[9]), Bytes::from_static(&[7, 8])]
    );
}

#[test]
fn rejects_long_ids() {
    let f = Frame {
        to: "x".repeat(300),
        from: String::new(),
        body: Body::LinkAck {
            upto: 1,
            nack: false,
        },
    };
    assert_eq!(f.encode(), Err(CodecError::TooLong("to")));
}

#[test]
fn rejects_bad_version_and_kind() {
    assert_eq!(
        Frame::decode(&Bytes::from_static(&[9, 1, 0, 0, 0])),
        Err(CodecError::Version(9))
    );
    assert_eq!(
        Frame::decode(&Bytes::from_static(&[1, 7, 0, 0, 0])),
        Err(CodecError::Kind(7))
    );
    assert_eq!(
        Frame::decode(&Bytes::from_static(&[1, 1])),
        Err(CodecError::Truncated)
    );
}
