//! Authorization: the application decides, per peer and per action, whether it may join a
//! room, pair with a uid, provide a service, subscribe to a topic or publish.
use serde_json::Value as Json;

use super::P2pSignaling;
use super::requests::{Ctx, Decided, Deferred, Flow, Hello, Retry};
use crate::protocol::{Op, PeerInfo};

/// What a peer asks to do, for [`SignalingOptions::authorize`](super::SignalingOptions::authorize).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Join a room (with `join`, or in `hello`).
    Join {
        /// The room.
        room: String,
    },
    /// Pair with the peer holding this uid.
    Pair {
        /// The uid asked for.
        peer_uid: String,
    },
    /// Provide a service under this name.
    Provide {
        /// The service name.
        service: String,
    },
    /// Subscribe to a topic.
    Subscribe {
        /// The topic.
        topic: String,
    },
    /// Publish to a topic.
    Publish {
        /// The topic.
        topic: String,
    },
}

/// One question to the authorization hook.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Authorization {
    /// Who asks. For the rooms of a `hello`, the id is not assigned yet (empty) and the uid
    /// is the one asked for.
    pub peer: PeerInfo,
    /// The `auth` payload its connection was accepted with (`null` if none).
    pub auth: Json,
    /// What it asks to do.
    pub action: Action,
}

/// The action an operation asks for, if it needs authorization.
fn action_of(op: &Op) -> Option<Action> {
    Some(match op {
        Op::Join { room } => Action::Join { room: room.clone() },
        Op::Pair { peer_uid, .. } => Action::Pair {
            peer_uid: peer_uid.clone(),
        },
        Op::Provide { service } => Action::Provide {
            service: service.clone(),
        },
        Op::Subscribe { topic } => Action::Subscribe {
            topic: topic.clone(),
        },
        Op::Publish { topic, .. } => Action::Publish {
            topic: topic.clone(),
        },
        _ => return None,
    })
}

impl P2pSignaling {
    /// With an authorization hook, an operation that needs it waits for the hook's answer
    /// (then runs, or is refused with `Forbidden`); `None` runs it now.
    pub(super) fn authorize_op(&self, cx: &Ctx<'_>, me: &PeerInfo, op: Op) -> Result<Flow, Op> {
        let (Some(hook), Some(action)) = (&self.inner.opts.authorize, action_of(&op)) else {
            return Err(op);
        };
        let auth = cx.st.conns.get(&cx.id).map(|c| c.auth.clone());
        let decision = hook(Authorization {
            peer: me.clone(),
            auth: auth.unwrap_or(Json::Null),
            action,
        });
        Ok(Flow::Wait(Deferred {
            wait: Box::pin(async move { Decided::Authorized(decision.await) }),
            rid: cx.rid,
            retry: Retry::Authorized {
                op: Box::new(op),
                peer: me.id.clone(),
            },
        }))
    }

    /// A `hello` that lists rooms waits until the hook allowed every one of them.
    pub(super) fn authorize_hello(&self, cx: &Ctx<'_>, hello: Hello) -> Result<Flow, Hello> {
        let Some(hook) = self.inner.opts.authorize.clone() else {
            return Err(hello);
        };
        if hello.rooms.is_empty() {
            return Err(hello);
        }
        let auth = cx
            .st
            .conns
            .get(&cx.id)
            .map(|c| c.auth.clone())
            .unwrap_or(Json::Null);
        let peer = PeerInfo {
            id: String::new(),
            uid: hello.uid.clone(),
        };
        let asks: Vec<_> = hello
            .rooms
            .iter()
            .map(|room| {
                hook(Authorization {
                    peer: peer.clone(),
                    auth: auth.clone(),
                    action: Action::Join { room: room.clone() },
                })
            })
            .collect();
        Ok(Flow::Wait(Deferred {
            wait: Box::pin(async move {
                for ask in asks {
                    if let Err(reason) = ask.await {
                        return Decided::Authorized(Err(reason));
                    }
                }
                Decided::Authorized(Ok(()))
            }),
            rid: cx.rid,
            retry: Retry::AuthorizedHello {
                hello: Box::new(hello),
            },
        }))
    }
}
