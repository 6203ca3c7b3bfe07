//! The reliable link fed arbitrary scripts: frames lost, duplicated, reordered, delayed,
//! transports changed, frames and acknowledgements forged (`socketio_p2p::fuzzing::link`
//! panics when delivery breaks its invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    socketio_p2p::fuzzing::link(data);
});
