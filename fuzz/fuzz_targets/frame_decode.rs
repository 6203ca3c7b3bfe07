//! The frame decoder on arbitrary bytes: never panics; whatever decodes encodes back to a
//! frame that decodes the same; the route peeked without decoding agrees with the frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use socketio_p2p_signaling::protocol::{Body, Frame, peek_route, stamp_from};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let route = peek_route(data);
    if let Ok(route) = &route {
        let _ = route.seq();
        if let Ok(stamped) = stamp_from(route, "stamped") {
            // Stamping changes `from` and nothing else.
            if let (Ok(a), Ok(b)) = (Frame::decode(&bytes), Frame::decode(&stamped)) {
                assert_eq!(b.from, "stamped");
                assert_eq!(a.to, b.to);
                assert_eq!(a.body, b.body);
            }
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
    let back = Frame::decode(&again).expect("an encoded frame decodes");
    assert_eq!(back, frame);
});
