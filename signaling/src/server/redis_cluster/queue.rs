//! The node's one publishing queue: everything it sends Redis, in order.
use tokio::sync::oneshot;

use crate::server::cluster::ClaimFail;

/// A message for the publishing task.
pub(super) enum Out {
    Publish {
        channel: String,
        payload: Vec<u8>,
        /// Frames in it (counted against `max_queue`).
        frames: usize,
    },
    /// Scripts to run (uid refresh and release), `(script, key, peer)`.
    Eval(Vec<(&'static str, String, String)>),
    /// Claim `key` for `peer`; the outcome goes to `reply`.
    Claim {
        key: String,
        peer: String,
        reply: oneshot::Sender<Result<(), ClaimFail>>,
    },
}
