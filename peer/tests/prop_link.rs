//! The reliable link fed arbitrary scripts of loss, duplication, reordering, delays,
//! transport changes and forged frames (the same driver the `link` fuzz target runs): it
//! delivers in order, without duplicates, exactly what was sent, and drains once the wire
//! is perfect again.
#![allow(missing_docs)]

use proptest::prelude::*;

/// Ops that a script is made of (see `socketio_p2p::fuzzing`): sends, deliveries, losses,
/// duplicates, swaps, acks, lost acks, time, transport changes (no forged frames).
fn honest_op() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (0u8..2, any::<u8>()).prop_map(|(op, len)| vec![op, len % 200]),
        1 => Just(vec![0, 251]),
        6 => (2u8..10).prop_map(|op| vec![op, 0]),
        2 => (10u8..12, any::<u8>()).prop_map(|(op, arg)| vec![op, arg]),
    ]
}

proptest! {
    #[test]
    fn honest_wire_delivers_everything_in_order(
        window in any::<u8>(),
        ops in proptest::collection::vec(honest_op(), 0..200),
    ) {
        let mut script = vec![window];
        script.extend(ops.into_iter().flatten());
        socketio_p2p::fuzzing::link(&script);
    }

    #[test]
    fn arbitrary_scripts_never_break_order(script in proptest::collection::vec(any::<u8>(), 0..600)) {
        socketio_p2p::fuzzing::link(&script);
    }
}

#[test]
fn regression_scripts() {
    // Empty, one byte, and a script that only forges.
    for s in [&[][..], &[7], &[0, 12, 5, 1, 1, 0, 0, 0, 13, 9]] {
        socketio_p2p::fuzzing::link(s);
    }
}
