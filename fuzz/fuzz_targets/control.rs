//! Control-message parsing as the server does it (JSON text to a `Request`, through a
//! `RawValue` and a `Value`): never panics; a request that parses serializes to JSON that
//! parses to the same request; signal validation never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socketio_p2p_signaling::protocol::{Op, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = serde_json::value::RawValue::from_string(text.to_owned()) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(raw.get()) else {
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
});
