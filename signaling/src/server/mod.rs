//! `P2pSignaling`: the socketioxide middleware.
//!
//! - [`attach`]: how the server meets socketioxide (namespaces, middleware,
//!   the one-line server);
//! - `requests`, `ops`, `services`: `p2p:req`, one function per operation;
//! - `relay`: `p2p:f`; `peers`: rooms, pairs and departures;
//! - `state` and `book`: what the server knows; `cluster`: what it tells other nodes
//!   (`redis_cluster`: the Redis implementation).
mod attach;
mod authz;
mod away;
mod book;
mod cluster;
mod ops;
mod options;
mod outbox;
mod peers;
mod relay;
mod requests;
mod services;
mod socket;
mod state;
mod stats;

pub use attach::{SignalingMiddleware, serve};
pub use authz::{Action, Authorization};
pub use options::{
    AuthHook, AuthorizeHook, BoxFuture, PeerHook, SignalingOptions, TurnCredentials, turn_password,
};
pub use stats::SignalingStats;

// The one place where the `redis` feature comes in: the Redis implementation of
// `cluster::Cluster`, its options and the redis crate it is built with.
#[cfg(feature = "redis")]
mod redis_cluster;
#[cfg(feature = "redis")]
pub use redis_cluster::{RedisCluster, redis};

use std::sync::{Arc, Mutex, MutexGuard};

use cluster::{Cluster, LocalCluster};
use state::State;

use crate::protocol::PeerInfo;

struct Inner {
    opts: SignalingOptions,
    /// Random name of this server instance, the prefix of every resume token it issues: a
    /// token of ours for an id we no longer know means "expired", not "we restarted".
    instance: String,
    state: Mutex<State>,
    /// The other nodes, if any (a [`LocalCluster`] when the server is on its own).
    cluster: Arc<dyn Cluster>,
    counters: stats::Counters,
}

/// The signaling and relay middleware. Cheap to clone; every clone is the same server.
///
/// Build the whole Socket.IO layer with [`P2pSignaling::layer`], attach it to a namespace
/// of your own `SocketIo` with [`P2pSignaling::attach`] (or [`P2pSignaling::attach_to`]),
/// share a namespace with your own handlers through [`P2pSignaling::middleware`], or call
/// [`P2pSignaling::register`] from a connect middleware of your own.
#[derive(Clone)]
pub struct P2pSignaling {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for P2pSignaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pSignaling")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl P2pSignaling {
    /// A new signaling server with these options.
    pub fn new(opts: SignalingOptions) -> Self {
        Self::with_cluster(opts, Arc::new(LocalCluster::default()))
    }

    /// A new signaling server that is one node of `cluster`.
    fn with_cluster(opts: SignalingOptions, cluster: Arc<dyn Cluster>) -> Self {
        Self {
            inner: Arc::new(Inner {
                instance: new_token("instance")[..12].to_owned(),
                opts,
                state: Mutex::new(State::default()),
                cluster,
                counters: stats::Counters::default(),
            }),
        }
    }

    /// Registered peers, sorted by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let st = self.lock();
        let mut v: Vec<PeerInfo> = st.conns.values().filter_map(|c| c.info.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Registered peers of a room, sorted by id.
    pub fn room_peers(&self, room: &str) -> Vec<PeerInfo> {
        self.lock().room_peers(room, "")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A hard-to-guess token (std only: hashes seeded by the OS's randomness, time and a counter).
fn new_token(id: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut parts = [0u64; 2];
    for (i, part) in parts.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(id.as_bytes());
        h.write_u128(t);
        h.write_u64(n);
        h.write_usize(i);
        *part = h.finish();
    }
    format!("{:016x}{:016x}", parts[0], parts[1])
}
