//! Options of the signaling server.
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use crate::protocol::PeerInfo;

/// Decides whether a connection may join, from its Socket.IO connect `auth` payload
/// (`null` when none was sent). `Err(reason)` refuses it: the client gets a Socket.IO
/// `connect_error` whose message is `reason`.
pub type AuthHook = Arc<dyn Fn(Json) -> BoxFuture<Result<(), String>> + Send + Sync>;
/// Decides whether a peer may do an [`Action`](super::Action): see
/// [`SignalingOptions::authorize`].
pub type AuthorizeHook =
    Arc<dyn Fn(super::Authorization) -> BoxFuture<Result<(), String>> + Send + Sync>;
/// A boxed future of a hook.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
/// Called with a peer's identity when it registers or disconnects.
pub type PeerHook = Arc<dyn Fn(&PeerInfo) + Send + Sync>;

/// Options of [`P2pSignaling`](super::P2pSignaling). Every field has a default that works.
#[derive(Clone)]
#[must_use = "options do nothing until passed to `P2pSignaling::new` or `layer`"]
pub struct SignalingOptions {
    pub(super) max_frame: usize,
    pub(super) max_pair_timeout: Duration,
    pub(super) default_pair_timeout: Duration,
    pub(super) request_rate: u32,
    pub(super) request_burst: u32,
    pub(super) frame_rate: (u32, u32),
    pub(super) byte_rate: (u64, u64),
    pub(super) max_strikes: u32,
    pub(super) max_rooms_per_peer: usize,
    pub(super) welcome_members: usize,
    pub(super) members_page: usize,
    pub(super) max_name_len: usize,
    pub(super) resume_grace: Duration,
    pub(super) away_queue: usize,
    pub(super) auth: Option<AuthHook>,
    pub(super) authorize: Option<AuthorizeHook>,
    pub(super) on_peer_joined: Option<PeerHook>,
    pub(super) on_peer_left: Option<PeerHook>,
    pub(super) turn: Option<TurnCredentials>,
}

impl Default for SignalingOptions {
    fn default() -> Self {
        Self {
            max_frame: 256 * 1024,
            max_pair_timeout: Duration::from_secs(60),
            default_pair_timeout: Duration::from_secs(10),
            request_rate: 500,
            request_burst: 1000,
            frame_rate: (200_000, 400_000),
            byte_rate: (128 << 20, 256 << 20),
            max_strikes: 200,
            max_rooms_per_peer: 64,
            welcome_members: 256,
            members_page: 1024,
            max_name_len: 128,
            resume_grace: Duration::from_secs(5),
            away_queue: 256,
            auth: None,
            authorize: None,
            on_peer_joined: None,
            on_peer_left: None,
            turn: None,
        }
    }
}

impl std::fmt::Debug for SignalingOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalingOptions")
            .field("max_frame", &self.max_frame)
            .field("max_pair_timeout", &self.max_pair_timeout)
            .field("request_rate", &self.request_rate)
            .field("request_burst", &self.request_burst)
            .field("auth", &self.auth.is_some())
            .field("authorize", &self.authorize.is_some())
            .finish_non_exhaustive()
    }
}

impl SignalingOptions {
    /// The relay budget of one socket, as `Budget` takes it.
    pub(super) fn limits(&self) -> super::state::Limits {
        super::state::Limits {
            frames: (f64::from(self.frame_rate.0), f64::from(self.frame_rate.1)),
            bytes: (self.byte_rate.0 as f64, self.byte_rate.1 as f64),
            max_strikes: self.max_strikes,
        }
    }

    /// Largest relayed frame in bytes (default 256 KiB). Larger frames get `PayloadTooLarge`.
    /// Peers split bigger messages into frames well below this.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }
    /// Longest a pairing request may wait for its peer (default 60 s; the default wait is 10 s).
    pub fn max_pair_timeout(mut self, d: Duration) -> Self {
        self.max_pair_timeout = d;
        self
    }
    /// Control requests allowed per socket: `rate` per second, bursts of `burst`
    /// (default 500/s, 1000). Beyond that, requests get `RateLimited`.
    pub fn request_rate(mut self, rate: u32, burst: u32) -> Self {
        self.request_rate = rate;
        self.request_burst = burst.max(1);
        self
    }
    /// How long a peer whose connection broke (rather than closed) keeps its id, rooms,
    /// pairs and uid, so that it can reconnect and carry on with nobody noticing (default
    /// 5 s; zero: tell the others at once). A deliberate disconnect is always final at once.
    pub fn resume_grace(mut self, d: Duration) -> Self {
        self.resume_grace = d;
        self
    }
    /// What one socket may relay: `frames` frames per second with bursts of `burst`
    /// (default 200,000/s, bursts of 400,000). A batch over budget is refused with
    /// `RateLimited` (its sender's link sends it again later) and still costs its frames,
    /// so a socket that keeps sending over its budget gets nothing through until it slows
    /// down. A new connection starts with a fiftieth of a second's budget rather than a
    /// whole burst (the bucket fills from there). See [`SignalingOptions::max_strikes`].
    pub fn frame_rate(mut self, frames: u32, burst: u32) -> Self {
        self.frame_rate = (frames, burst.max(1));
        self
    }
    /// What one socket may relay in bytes per second, with bursts (default 128 MiB/s,
    /// bursts of 256 MiB).
    pub fn byte_rate(mut self, bytes: u64, burst: u64) -> Self {
        self.byte_rate = (bytes, burst.max(1));
        self
    }
    /// A socket that sends this many refused batches within one second (default 200)
    /// floods: it is told why (`RateLimited`) and disconnected.
    pub fn max_strikes(mut self, n: u32) -> Self {
        self.max_strikes = n.max(1);
        self
    }
    /// How many control messages (signals, presence, call results, publications) the
    /// server holds for a peer inside `resume_grace` (default 256). They go out when it
    /// comes back; beyond this, they are dropped and the peer gets a `Dropped` error then.
    pub fn away_queue(mut self, n: usize) -> Self {
        self.away_queue = n;
        self
    }
    /// Most rooms one peer may be in (default 64).
    pub fn max_rooms_per_peer(mut self, n: usize) -> Self {
        self.max_rooms_per_peer = n;
        self
    }
    /// Most members of one room listed in a `Welcome` (default 256): the first ones by id,
    /// with `more` set when there are others, which the peer then asks for in `members`
    /// pages. Keeps the `Welcome` (and the socket buffers it grows) small in big rooms.
    pub fn welcome_members(mut self, n: usize) -> Self {
        self.welcome_members = n;
        self
    }
    /// Largest `members` page (default 1024; also the size of a page whose request gives
    /// no `limit`). A request for more gets this many; a `limit` of 0 gets `BadRequest`.
    pub fn members_page(mut self, n: usize) -> Self {
        self.members_page = n.max(1);
        self
    }
    /// Accept or refuse connections from their connect `auth` payload.
    pub fn auth(
        mut self,
        hook: impl Fn(&Json) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.auth = Some(Arc::new(move |auth: Json| {
            let r = hook(&auth);
            Box::pin(async move { r })
        }));
        self
    }

    /// Like [`SignalingOptions::auth`], with an asynchronous hook (to ask a database or a
    /// session store).
    ///
    /// ```
    /// use socketio_p2p_signaling::SignalingOptions;
    /// let opts = SignalingOptions::default().auth_async(|auth| async move {
    ///     match auth.get("token").and_then(|t| t.as_str()) {
    ///         Some("secret") => Ok(()),
    ///         _ => Err("bad token".to_owned()),
    ///     }
    /// });
    /// ```
    pub fn auth_async<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Json) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        self.auth = Some(Arc::new(move |auth: Json| Box::pin(hook(auth))));
        self
    }

    /// Decides, for each peer, whether it may join a room, pair with a uid, provide a
    /// service, subscribe to a topic or publish to one. The hook gets the peer, what its
    /// connection's `auth` payload was (as accepted at connect) and the
    /// [`Action`](super::Action); `Err(reason)` refuses the action, and the peer gets a
    /// `Forbidden` error with `reason`. The hook is asynchronous: only the asking peer's
    /// later requests wait for it. Rooms given in `hello` are joins too.
    ///
    /// ```
    /// use socketio_p2p_signaling::{Action, SignalingOptions};
    /// // Per-user rooms: a peer may only join the room named after its user.
    /// let opts = SignalingOptions::default().authorize(|a| async move {
    ///     let user = a.auth.get("user").and_then(|u| u.as_str()).unwrap_or("");
    ///     match &a.action {
    ///         Action::Join { room } if room != user => Err(format!("{room} is not yours")),
    ///         _ => Ok(()),
    ///     }
    /// });
    /// ```
    pub fn authorize<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(super::Authorization) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        self.authorize = Some(Arc::new(move |a| Box::pin(hook(a))));
        self
    }
    /// Called when a peer registers.
    pub fn on_peer_joined(mut self, hook: impl Fn(&PeerInfo) + Send + Sync + 'static) -> Self {
        self.on_peer_joined = Some(Arc::new(hook));
        self
    }
    /// Called when a registered peer disconnects.
    pub fn on_peer_left(mut self, hook: impl Fn(&PeerInfo) + Send + Sync + 'static) -> Self {
        self.on_peer_left = Some(Arc::new(hook));
        self
    }
    /// Gives every peer short-lived TURN credentials in its `Welcome` (coturn's REST-API
    /// shared-secret scheme), so that no TURN password ships in client code. Peers use
    /// these servers beside their own.
    pub fn turn_credentials(mut self, turn: TurnCredentials) -> Self {
        self.turn = Some(turn);
        self
    }
}

/// TURN servers that share a secret with this server (coturn: `use-auth-secret` and
/// `static-auth-secret=<secret>`): each peer gets the username `<expiry unix time>:<uid or
/// id>` and the password base64(HMAC-SHA1(secret, username)), valid for [`TurnCredentials::ttl`].
///
/// ```
/// use std::time::Duration;
/// use socketio_p2p_signaling::{SignalingOptions, TurnCredentials};
/// let turn = TurnCredentials::new(["turn:turn.example.org:3478"], "s3cret")
///     .ttl(Duration::from_secs(3600));
/// let opts = SignalingOptions::default().turn_credentials(turn);
/// ```
#[derive(Clone)]
pub struct TurnCredentials {
    urls: Vec<String>,
    secret: String,
    ttl: Duration,
}

impl std::fmt::Debug for TurnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnCredentials")
            .field("urls", &self.urls)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TurnCredentials {
    /// TURN (and STUN) URLs sharing `secret`; credentials valid for one day by default.
    pub fn new(
        urls: impl IntoIterator<Item = impl Into<String>>,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            secret: secret.into(),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
    /// How long credentials stay valid after the `Welcome` (default one day). A peer that
    /// reconnects gets new ones; an allocation made before expiry lives on.
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = d;
        self
    }
    /// The ICE server entry for `who`, valid from now for the TTL.
    pub(super) fn issue(&self, who: &str) -> crate::protocol::IceServerInfo {
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        let username = format!("{expiry}:{who}");
        let credential = turn_password(&self.secret, &username);
        crate::protocol::IceServerInfo {
            urls: self.urls.clone(),
            username: Some(username),
            credential: Some(credential),
        }
    }
}

/// The TURN password of `username` under coturn's REST-API scheme:
/// base64(HMAC-SHA1(secret, username)).
pub fn turn_password(secret: &str, username: &str) -> String {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    let mut mac = match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}
