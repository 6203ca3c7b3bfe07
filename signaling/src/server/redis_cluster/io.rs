//! The node's Redis connections: one publishing queue drained in pipelines, one
//! subscriber reading both channels, and the heartbeat.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::link::{Ctl, K_CTL, K_EVENT, K_FRAME, Link, decode};
use super::names::{CLAIM, REFRESH};
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

/// Drains the queue in order, in pipelines of up to 256 commands. Claims are the only
/// commands whose answers matter: they go back to whoever waits for them. A pipeline with
/// claims goes on the second connection (which waits up to `io_timeout` for Redis), the
/// others on the first; one pipeline at a time, so Redis sees everything in queue order.
pub(super) async fn publisher(
    mut cons: [redis::aio::ConnectionManager; 2],
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued_frames: Arc<AtomicUsize>,
    ttl_ms: u64,
) {
    let mut batch = Vec::with_capacity(256);
    let mut claims = Vec::new();
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
        match pipe.query_async::<Vec<redis::Value>>(con).await {
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
                tracing::warn!(%e, "cluster publish failed; messages lost");
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
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(ps) = pubsub.take() else {
                // Lost the subscription: resubscribe, then ask everyone for a full picture.
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick() { return },
                    r = subscribe(&self.client, &self.channels) => match r {
                        Ok(ps) => {
                            pubsub = Some(ps);
                            self.link.publish(&Ctl::SyncRequest);
                        }
                        Err(e) => {
                            tracing::warn!(%e, "cluster resubscribe failed");
                            tokio::time::sleep(self.heartbeat).await;
                        }
                    },
                }
                continue;
            };
            let mut stream = ps.into_on_message();
            loop {
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick() { return },
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

    /// Heartbeat, uid refresh, dead nodes. False once the server is gone.
    fn on_tick(&mut self) -> bool {
        let Some(inner) = self.sig.upgrade() else {
            return false;
        };
        let sig = P2pSignaling { inner };
        self.link.publish(&Ctl::Heartbeat);
        let refresh: Vec<_> = self
            .link
            .uids
            .local_keys()
            .into_iter()
            .chain(self.link.svcs.local_keys())
            .map(|(k, p)| (REFRESH, k, p))
            .collect();
        if !refresh.is_empty() {
            let _ = self.link.tx.send(Out::Eval(refresh));
        }
        let now = Instant::now();
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
