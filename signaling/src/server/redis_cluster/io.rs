//! The node's Redis connections: one publishing queue drained in pipelines, one
//! subscriber reading both channels, and the heartbeat.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::link::{Ctl, K_CTL, K_EVENT, K_FRAME, Link, decode};
use super::mirror::digest;
use super::names::CLAIM;
use super::queue::Out;
use crate::Error;
use crate::server::cluster::ClaimFail;
use crate::server::{Inner, P2pSignaling};

/// `f`, at most `wait` long; its error (or the timeout) says what the node was `doing`.
pub(super) async fn in_time<T>(
    wait: Duration,
    doing: &'static str,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(wait, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Cluster {
            context: doing,
            source: Box::new(e),
        }),
        Err(_) => Err(Error::Timeout {
            context: doing,
            after: wait,
        }),
    }
}

pub(super) async fn subscribe(
    client: &redis::Client,
    channels: &[String],
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    for ch in channels {
        pubsub.subscribe(ch).await?;
    }
    Ok(pubsub)
}

/// What the publishing task shares with the node.
pub(super) struct Publisher {
    pub(super) cons: [redis::aio::ConnectionManager; 2],
    pub(super) rx: mpsc::UnboundedReceiver<Out>,
    pub(super) queued_frames: Arc<AtomicUsize>,
    pub(super) ttl_ms: u64,
    /// False from a failed pipeline to the next one that succeeds.
    pub(super) up: Arc<AtomicBool>,
    /// Published (channel, message) once Redis answers again after a failure: "I may have
    /// lost messages, ask me for my peers".
    pub(super) resync: (String, Vec<u8>),
}

/// Drains the queue in order, in pipelines of up to 256 commands. Claims are the only
/// commands whose answers matter: they go back to whoever waits for them. A pipeline with
/// claims goes on the second connection (which waits up to `io_timeout` for Redis), the
/// others on the first; one pipeline at a time, so Redis sees everything in queue order.
///
/// A pipeline that fails is lost (frames in it too: the peers' links send them again); while
/// Redis is unreachable the next pipeline waits for the connection to come back.
pub(super) async fn publisher(p: Publisher) {
    let Publisher {
        mut cons,
        mut rx,
        queued_frames,
        ttl_ms,
        up,
        resync,
    } = p;
    let mut batch = Vec::with_capacity(256);
    let mut claims = Vec::new();
    let mut down_since: Option<Instant> = None;
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut pipe = redis::pipe();
        let mut frames = 0;
        for out in batch.drain(..) {
            match out {
                Out::Publish {
                    channel,
                    payload,
                    frames: n,
                } => {
                    frames += n;
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Out::Eval(list) => {
                    for (script, key, peer) in list {
                        eval(&mut pipe, script, key, peer, ttl_ms).ignore();
                    }
                }
                Out::Claim { key, peer, reply } => {
                    eval(&mut pipe, CLAIM, key, peer, ttl_ms);
                    claims.push(reply);
                }
            }
        }
        let con = &mut cons[usize::from(!claims.is_empty())];
        let mut result = pipe.query_async::<Vec<redis::Value>>(con).await;
        if let Err(e) = &result
            && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
        {
            // The connection broke (perhaps long ago, while it was idle): once more, which
            // waits for the manager to connect again. Every command here may run twice
            // harmlessly: frames are deduplicated by the links, claims and refreshes are
            // compare-and-set.
            if up.swap(false, Ordering::AcqRel) {
                tracing::debug!(%e, "redis connection broke: waiting for it");
                down_since = Some(Instant::now());
            }
            result = pipe.query_async::<Vec<redis::Value>>(con).await;
        }
        if result.is_ok() && !up.swap(true, Ordering::AcqRel) {
            let down = down_since.take().map(|t| t.elapsed()).unwrap_or_default();
            if down >= Duration::from_secs(1) {
                tracing::info!(?down, "redis reachable again");
            } else {
                tracing::debug!(?down, "redis reachable again");
            }
            let mut pipe = redis::pipe();
            pipe.cmd("PUBLISH").arg(&resync.0).arg(&resync.1).ignore();
            let _ = pipe.query_async::<()>(&mut cons[0]).await;
        }
        match result {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                for reply in claims.drain(..) {
                    let won = answers
                        .next()
                        .and_then(|v| redis::from_redis_value::<i64>(v).ok());
                    let _ = reply.send(match won {
                        Some(1) => Ok(()),
                        Some(_) => Err(ClaimFail::Taken),
                        None => Err(ClaimFail::Unreachable),
                    });
                }
            }
            Err(e) => {
                if up.swap(false, Ordering::AcqRel) {
                    down_since = Some(Instant::now());
                    tracing::warn!(
                        %e,
                        "redis unreachable: messages to other nodes are lost until it is back \
                         (frames are sent again by the peers' links)"
                    );
                } else {
                    tracing::debug!(%e, "cluster publish failed");
                }
                for reply in claims.drain(..) {
                    let _ = reply.send(Err(ClaimFail::Unreachable));
                }
            }
        }
        queued_frames.fetch_sub(frames, Ordering::AcqRel);
    }
}

/// Adds one script run to `pipe`.
fn eval<'p>(
    pipe: &'p mut redis::Pipeline,
    script: &str,
    key: String,
    peer: String,
    ttl_ms: u64,
) -> &'p mut redis::Pipeline {
    pipe.cmd("EVAL")
        .arg(script)
        .arg(1)
        .arg(key)
        .arg(peer)
        .arg(ttl_ms)
}

/// Reads the node's channels, sends heartbeats, notices dead nodes.
pub(super) struct Inbound {
    pub(super) sig: Weak<Inner>,
    pub(super) link: Arc<Link>,
    pub(super) client: redis::Client,
    pub(super) channels: [String; 2],
    pub(super) heartbeat: Duration,
    pub(super) timeout: Duration,
    pub(super) last_seen: HashMap<String, Instant>,
}

impl Inbound {
    pub(super) async fn run(mut self, first: redis::aio::PubSub) {
        let mut pubsub = Some(first);
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(ps) = pubsub.take() else {
                // Lost the subscription: resubscribe, then ask everyone for a full picture.
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick(false) { return },
                    r = subscribe(&self.client, &self.channels) => match r {
                        Ok(ps) => {
                            tracing::info!(failures, "cluster subscription back");
                            failures = 0;
                            pubsub = Some(ps);
                            // Whatever the others said meanwhile is lost: ask for all of it,
                            // and take our names back at once (a restarted Redis has none).
                            // What we said may be lost too: the `Resync` our publisher sent
                            // when Redis came back reached only the nodes subscribed by then,
                            // so ask everyone to ask us again. Of any two nodes, the one that
                            // subscribes last hears the other's answers both ways.
                            self.link.publish(&Ctl::SyncRequest);
                            self.link.publish(&Ctl::Resync);
                            if !self.on_tick(false) {
                                return;
                            }
                        }
                        Err(e) => {
                            if failures == 0 {
                                tracing::warn!(%e, "cluster resubscribe failed; trying again");
                            } else {
                                tracing::debug!(%e, failures, "cluster resubscribe failed");
                            }
                            failures += 1;
                            tokio::time::sleep(self.heartbeat).await;
                        }
                    },
                }
                continue;
            };
            let mut stream = ps.into_on_message();
            loop {
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick(true) { return },
                    msg = stream.next() => match msg {
                        Some(msg) => if !self.on_message(msg.get_payload_bytes()) { return },
                        None => {
                            tracing::warn!("cluster subscription lost");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Heartbeat, name refresh, dead nodes. False once the server is gone.
    ///
    /// A node that does not hear Redis (`subscribed` false, or its last pipeline failed)
    /// cannot tell a dead node from a dead Redis: it declares nobody dead, and the others
    /// get a full `node_timeout` from the moment it hears Redis again.
    fn on_tick(&mut self, subscribed: bool) -> bool {
        let Some(inner) = self.sig.upgrade() else {
            return false;
        };
        let sig = P2pSignaling { inner };
        {
            // Under the lock: every `Up`, `Join`, `Leave` and `Down` is queued under it too,
            // so the digest describes exactly what was announced before it.
            let st = sig.lock();
            let digest = Some(digest(&st, None));
            self.link.publish(&Ctl::Heartbeat { digest });
        }
        self.link.uids.refresh(&self.link.tx);
        self.link.svcs.refresh(&self.link.tx);
        let now = Instant::now();
        if !subscribed || !self.link.up.load(Ordering::Acquire) {
            for seen in self.last_seen.values_mut() {
                *seen = now;
            }
            return true;
        }
        let dead: Vec<String> = self
            .last_seen
            .iter()
            .filter(|(_, t)| now.duration_since(**t) > self.timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for node in dead {
            self.last_seen.remove(&node);
            sig.node_dead(&self.link, &node);
        }
        true
    }

    fn on_message(&mut self, msg: &[u8]) -> bool {
        let Some(inner) = self.sig.upgrade() else {
            return false;
        };
        let sig = P2pSignaling { inner };
        let Some((kind, node, to, rest)) = decode(msg) else {
            tracing::debug!("undecodable cluster message");
            return true;
        };
        if node == self.link.node {
            return true;
        }
        if self
            .last_seen
            .insert(node.to_owned(), Instant::now())
            .is_none()
        {
            tracing::info!(%node, "cluster node seen");
            self.link
                .send_ctl(self.link.node_channel(node), &Ctl::SyncRequest);
        }
        match kind {
            K_CTL => match serde_json::from_slice::<Ctl>(rest) {
                Ok(ctl) => sig.apply_ctl(&self.link, node, ctl),
                Err(e) => tracing::debug!(%e, "bad cluster message"),
            },
            K_FRAME => sig.deliver_frame(&self.link, node, to, rest),
            K_EVENT => sig.deliver_event(node, to, rest),
            _ => tracing::debug!(kind, "unknown cluster message"),
        }
        true
    }
}
