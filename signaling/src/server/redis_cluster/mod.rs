//! Several nodes sharing one redis-server (cargo feature `redis`).
//!
//! Every node keeps, in its own [`State`](crate::server::state::State), a mirror of the peers of the other nodes: they are
//! ordinary `Conn`s whose socket is a [`RemoteSocket`](link::RemoteSocket), so that scoping, presence, pairing and
//! relaying work on them unchanged. A node owns its own peers: it publishes every change about
//! them (registered, joined, left, paired, gone) on the cluster channel, and every node tells its
//! own peers about the changes of others (presence and responses never cross nodes). Frames and
//! WebRTC signals for a remote peer go to that peer's node channel.
//!
//! Everything a node publishes goes through one unbounded queue drained by one task that sends
//! batches as pipelines on one connection, and every node reads both of its channels on one
//! subscriber connection: Redis keeps the publish order, so a peer on another node sees
//! changes and frames in the order its node made them, without a Redis round trip per frame.
//! Frames waiting in the queue are counted and bounded: beyond the bound the sender gets `Busy`.
//!
//! uids are keys `<prefix>:uid:<uid>` holding the peer id, claimed by a compare-and-set script,
//! refreshed by the holder node's heartbeat and expiring after `node_timeout`: a dead node's uids
//! free themselves. A node that sends nothing (not even its heartbeat) for `node_timeout` is
//! dead: the others forget its peers and tell their own peers that they disconnected.
/// The redis crate this library uses (build the `redis::Client` of [`RedisCluster`] with it).
pub use ::redis;

mod deliver;
mod io;
mod link;
mod mirror;
mod names;
mod queue;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{P2pSignaling, SignalingOptions, new_token};
use crate::Error;
use io::{Inbound, Publisher, in_time, publisher, subscribe};
use link::{Ctl, Link};
use names::Names;

/// How a [`P2pSignaling`] joins a cluster of nodes sharing one redis-server; give it to
/// [`P2pSignaling::with_redis`]. Every node of a cluster must use the same prefix.
#[derive(Clone, Debug)]
pub struct RedisCluster {
    client: redis::Client,
    prefix: String,
    heartbeat: Duration,
    node_timeout: Duration,
    max_queue: usize,
    io_timeout: Duration,
}

impl RedisCluster {
    /// A cluster on this Redis client (`redis::Client::open("redis://127.0.0.1:6379/")`).
    pub fn new(client: redis::Client) -> Self {
        Self {
            client,
            prefix: "p2p".to_owned(),
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(3),
            max_queue: 8192,
            io_timeout: Duration::from_secs(1),
        }
    }
    /// Prefix of every Redis key and channel this cluster uses (default `p2p`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// How often a node tells the others it is alive and refreshes its peers' uids
    /// (default 1 s).
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d.max(Duration::from_millis(10));
        self
    }
    /// How long a silent node stays alive for the others, and how long a uid of a dead node
    /// stays taken (default 3 s). At least twice the heartbeat.
    pub fn node_timeout(mut self, d: Duration) -> Self {
        self.node_timeout = d;
        self
    }
    /// Most frames waiting to be published to other nodes (default 8192). Beyond it, frames
    /// to peers of other nodes are refused with `Busy`.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n.max(1);
        self
    }
    /// Longest wait for Redis when a `hello` claims a uid or a `provide` a service name
    /// (default 1 s). The request waits without holding up anything else: other requests,
    /// and frames, of other sockets go on meanwhile.
    pub fn io_timeout(mut self, d: Duration) -> Self {
        self.io_timeout = d;
        self
    }
    fn timeout(&self) -> Duration {
        self.node_timeout.max(self.heartbeat * 2)
    }
}

impl P2pSignaling {
    /// A signaling server that is one node of a cluster sharing a redis-server: peers on
    /// different nodes see each other as if they were on one server. Waits until this node
    /// listens to the cluster; fails if Redis cannot be reached.
    ///
    /// Build the `SocketIo` with socketioxide-redis's adapter too if your own handlers
    /// broadcast (`io.to(room).emit`); the signaling itself does not need it.
    pub async fn with_redis(
        opts: SignalingOptions,
        cluster: RedisCluster,
    ) -> Result<P2pSignaling, Error> {
        let timeout = cluster.timeout();
        let ttl_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let node = new_token("node")[..16].to_owned();
        let wait = cluster.io_timeout.max(Duration::from_secs(1)) * 5;
        // One plain connection first: a Redis that is not there fails the start at once, with
        // the client's reason (the managers below would retry for seconds).
        in_time(
            wait,
            "connecting to Redis",
            cluster.client.get_multiplexed_async_connection(),
        )
        .await?;
        // After a failure the managers reconnect with short pauses (at most 250 ms, or the
        // heartbeat), and never give up: the publisher waits for Redis, and traffic resumes
        // soon after it is back.
        let retry = |c: redis::aio::ConnectionManagerConfig| {
            c.set_min_delay(Duration::from_millis(20))
                .set_max_delay(cluster.heartbeat.min(Duration::from_millis(250)))
                .set_number_of_retries(usize::MAX / 2)
        };
        let manager = in_time(
            wait,
            "connecting to Redis",
            redis::aio::ConnectionManager::new_with_config(
                cluster.client.clone(),
                retry(redis::aio::ConnectionManagerConfig::new()),
            ),
        )
        .await?;
        // Pipelines with claims wait up to `io_timeout` for Redis (the others, the client's
        // default): a claim answered late counts as refused.
        let claims_config = retry(redis::aio::ConnectionManagerConfig::new())
            .set_response_timeout(Some(cluster.io_timeout));
        let claims_manager = in_time(
            wait,
            "connecting to Redis",
            redis::aio::ConnectionManager::new_with_config(cluster.client.clone(), claims_config),
        )
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            node: node.clone(),
            prefix: cluster.prefix.clone(),
            tx,
            queued_frames: Arc::new(AtomicUsize::new(0)),
            max_queue: cluster.max_queue,
            up: Arc::new(AtomicBool::new(true)),
            io_timeout: cluster.io_timeout,
            uids: Arc::new(Names::new(&cluster.prefix, "uid")),
            svcs: Arc::new(Names::new(&cluster.prefix, "svc")),
            drift: Default::default(),
        });
        let channels = [link.all_channel(), link.node_channel(&node)];
        let pubsub = in_time(
            wait,
            "subscribing to the cluster channels on Redis",
            subscribe(&cluster.client, &channels),
        )
        .await?;
        let sig = P2pSignaling::with_cluster(opts, link.clone());
        let resync = serde_json::to_vec(&Ctl::Resync).unwrap_or_default();
        tokio::spawn(publisher(Publisher {
            cons: [manager, claims_manager],
            rx,
            queued_frames: link.queued_frames.clone(),
            ttl_ms,
            up: link.up.clone(),
            resync: (
                link.all_channel(),
                link::encode(link::K_CTL, &node, "", &resync),
            ),
        }));
        link.publish(&Ctl::Heartbeat { digest: None });
        link.publish(&Ctl::SyncRequest);
        let inbound = Inbound {
            sig: Arc::downgrade(&sig.inner),
            link,
            client: cluster.client.clone(),
            channels,
            heartbeat: cluster.heartbeat,
            timeout,
            last_seen: HashMap::new(),
        };
        tokio::spawn(inbound.run(pubsub));
        tracing::info!(%node, prefix = %cluster.prefix, "cluster node up");
        Ok(sig)
    }
}
