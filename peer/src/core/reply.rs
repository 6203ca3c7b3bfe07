//! How answers leave the core: callbacks that the handles make from their channels, so
//! the core needs no channel type of its own.
use socketio_p2p_signaling::protocol::Publication;

use crate::error::Result;

/// Where the answer to one command goes. The core calls it exactly once (or drops it when
/// the `P2p` shuts down without an answer, which the waiting side sees as `Closed`).
pub(crate) type Reply<T> = Box<dyn FnOnce(Result<T>) + Send>;

/// Where publications of a topic go; returns false once the subscriber is gone.
pub(crate) type TopicSink = Box<dyn FnMut(Publication) -> bool + Send>;
