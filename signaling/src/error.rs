//! The error type of this crate.
use std::time::Duration;

/// What can go wrong when a signaling server is set up (today: joining a cluster).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cluster store (the redis-server of a cluster) refused or failed a request.
    #[error("cluster store: {context}")]
    Cluster {
        /// What the server was doing.
        context: &'static str,
        /// What the store's client said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cluster store did not answer in time.
    #[error("cluster store: {context}: no answer in {after:?}")]
    Timeout {
        /// What the server was doing.
        context: &'static str,
        /// How long it waited.
        after: Duration,
    },
}
