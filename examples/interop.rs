//! Interop driver for the JavaScript client's end-to-end tests.
//!
//! Runs a `P2pSignaling` server on 127.0.0.1 (any free port), prints
//! `{"ev":"listening","url":"http://127.0.0.1:PORT"}`, then reads commands as JSON lines on
//! stdin and runs Rust `P2p` peers for them, reporting what happens as JSON lines on stdout.
//! With `--static DIR` the server also serves the files of DIR under `/static/` (pages for
//! browser tests); with `--auth-token T` it refuses connections whose `auth` payload is not
//! `{"token": T}` (reason `bad token`); `--buffer N` sets the per-socket buffer of the
//! server (default 4096 packets; a small one makes the server answer `Busy`);
//! `--welcome-members N` lists at most N members of a room in a `Welcome` (the rest in
//! `members` pages).
//!
//! ```text
//! cargo run -p socketio-p2p-examples --example interop -- [--static DIR]
//! {"cmd":"peer","name":"r","rooms":["lobby"]}           -> {"ev":"peer","name":"r","id":"..."}
//! {"cmd":"emit","peer":"r","to":"<id>","event":"hi","data":{"x":1}}
//! {"cmd":"emit_n","peer":"r","to":"<id>","event":"num","n":10000}   ("start": first number, 0)
//! {"cmd":"emit_bin","peer":"r","to":"<id>","event":"bin","len":1048576}
//! {"cmd":"ack","peer":"r","to":"<id>","event":"echo","data":5,"id":1} -> {"ev":"ack","id":1,"ok":5}
//! {"cmd":"upgrade","peer":"r","to":"<id>"}    (no `to`: every peer; done once open or failed)
//! {"cmd":"downgrade","peer":"r","to":"<id>"}  {"cmd":"kill","peer":"r","to":"<id>"}
//! {"cmd":"transport","peer":"r","to":"<id>"}  -> {"ev":"done","transport":"DataChannel"}
//! ```
//!
//! Benchmarks: `{"cmd":"count","peer":"r","event":"tp","bytes":N}` counts the binary bytes
//! of that event (no other handler, no report per event) and prints
//! `{"ev":"counted","peer":"r","bytes":N}` once N arrived; `{"cmd":"raw_answer","sdp":OFFER,
//! "bytes":N,"tag":T}` answers a browser's offer on a bare webrtc-rs peer connection (no
//! socketio-p2p: the baseline), `done` carrying the answer `sdp`, and prints
//! `{"ev":"raw_counted","tag":T,"bytes":N}` once N bytes arrived on its data channels.
//!
//! The `peer` command also takes `auto_upgrade` (default false), `num_clients` and
//! `upgrade_timeout_ms`; peers report `upgraded`, `downgraded` and `upgrade_failed` as
//! `presence` lines (`who` = the peer id).
//!
//! Every command may carry an `id`; its answer (`done`, `ack`, `error`...) echoes it. Peers
//! report received events (`event`, binary as length + SHA-256), presence (`presence`),
//! publications (`publication`) and streams (`stream`). Peers answer acks on `echo` (the
//! payload back), `add` (the sum of a number array), `fail` (error `Nope`) and `hold` (never:
//! the sender times out); any other
//! event with a handler (`handle` list of the `peer` command, default every event name used in
//! the tests) is reported and not answered, and events without a handler get `NoHandler`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use socketio_p2p::{Error, P2p, P2pOptions, P2pStream, Payload, PeerEvent, Service, ServiceError};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

type Peers = Arc<Mutex<HashMap<String, P2p>>>;

/// Writes one report line.
fn out(v: Value) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

/// The deterministic test bytes: byte `i` is `(i * 31 + 7) mod 256`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31).wrapping_add(7)) as u8)
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn code(e: &Error) -> String {
    match e {
        Error::Timeout(_) => "Timeout".into(),
        Error::PeerOffline(_) => "PeerOffline".into(),
        Error::UidTaken(_) => "UidTaken".into(),
        Error::Rejected { code, .. } => code.to_string(),
        Error::Remote { code, .. } => code.clone(),
        Error::PayloadTooLarge { .. } => "PayloadTooLarge".into(),
        Error::Closed => "Closed".into(),
        Error::ServiceTaken(_) => "ServiceTaken".into(),
        Error::NoSuchService(_) => "NoSuchService".into(),
        Error::ServiceGone(_) => "ServiceGone".into(),
        Error::StreamRefused { code, .. } => code.clone(),
        Error::QueueFull(_) => "QueueFull".into(),
        other => format!("{other:?}")
            .split(['(', ' ', '{'])
            .next()
            .unwrap_or("Error")
            .to_owned(),
    }
}

fn payload_json(p: &Payload) -> Value {
    match p {
        Payload::Json(v) => json!({ "json": v }),
        Payload::Binary(b) => json!({ "bin": b.len(), "sha256": hex(&Sha256::digest(b)) }),
        _ => Value::Null,
    }
}

fn info_json(p: &socketio_p2p::PeerInfo) -> Value {
    json!({ "id": p.id, "uid": p.uid })
}

const DEFAULT_HANDLED: &[&str] = &[
    "hi", "num", "bin", "echo", "add", "fail", "silent", "hold", "msg", "big", "bad", "peer-msg",
];

/// A server in its own runtime, so that a restart kills every connection at once.
struct ServerTask {
    addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerTask {
    fn start(port: u16, cfg: Config) -> ServerTask {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let addr = rt.block_on(serve(port, cfg));
            let _ = addr_tx.send(addr);
            let _ = stop_rx.recv();
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().expect("server thread died");
        ServerTask {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the server is started with.
#[derive(Clone, Default)]
struct Config {
    static_dir: Option<PathBuf>,
    auth_token: Option<String>,
    buffer: Option<usize>,
    welcome_members: Option<usize>,
}

async fn serve(port: u16, cfg: Config) -> SocketAddr {
    let mut opts = SignalingOptions::default();
    if let Some(n) = cfg.welcome_members {
        opts = opts.welcome_members(n);
    }
    if let Some(token) = cfg.auth_token {
        opts = opts.auth(move |auth| {
            if auth.get("token").and_then(Value::as_str) == Some(token.as_str()) {
                Ok(())
            } else {
                Err("bad token".into())
            }
        });
    }
    let signaling = P2pSignaling::new(opts);
    let (layer, io) = socketioxide::SocketIo::builder()
        .max_buffer_size(cfg.buffer.unwrap_or(4096))
        .build_layer();
    signaling.attach(&io);
    let mut app = axum::Router::new();
    if let Some(dir) = cfg.static_dir {
        // Pages and scripts for browser tests, under /static/ (a catch-all fallback would
        // take the Engine.IO requests of rust_socketio clients away from the Socket.IO layer).
        let dir = Arc::new(dir);
        app = app.route(
            "/static/{*path}",
            axum::routing::get(move |uri: axum::http::Uri| {
                let dir = dir.clone();
                async move { static_file(&dir, uri.path().trim_start_matches("/static")).await }
            }),
        );
    }
    let app = app.layer(layer);
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(_) if tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    };
    let addr = listener.local_addr().expect("addr");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _keep = (io, signaling);
        let _ = axum::serve(listener, app).await;
    });
    addr
}

async fn static_file(dir: &std::path::Path, path: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(dir.join(rel)).await {
        Ok(body) => {
            let ct = match rel.rsplit('.').next() {
                Some("html") => "text/html; charset=utf-8",
                Some("js" | "mjs") => "text/javascript; charset=utf-8",
                Some("json") => "application/json",
                _ => "application/octet-stream",
            };
            ([(axum::http::header::CONTENT_TYPE, ct)], body).into_response()
        }
        Err(_) => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

fn install(name: &str, p2p: &P2p, handled: &[String]) {
    for ev in handled {
        let n = name.to_owned();
        let evname = ev.clone();
        p2p.on(ev, move |e| {
            out(json!({
                "ev": "event", "peer": n, "name": e.name(), "from": e.from(),
                "transport": format!("{:?}", e.transport()), "data": payload_json(e.payload()),
                "wants_reply": e.wants_reply(),
            }));
            match evname.as_str() {
                "echo" => {
                    e.reply(e.payload().clone());
                }
                "add" => {
                    let sum = e
                        .decode_json::<Vec<f64>>()
                        .map(|v| v.iter().sum::<f64>())
                        .unwrap_or(f64::NAN);
                    e.reply(Payload::Json(json!(sum)));
                }
                "fail" => {
                    e.reply_error("Nope", "asked to fail");
                }
                // Never answered: the sender times out (a dropped event would answer NoReply).
                "hold" => std::mem::forget(e.clone()),
                _ => {}
            }
        });
    }
    let n = name.to_owned();
    p2p.on_peer_event(move |pe| {
        let v = match &pe {
            PeerEvent::Joined { room, peer } => {
                json!({"type": "joined", "room": room, "who": info_json(peer)})
            }
            PeerEvent::Left { room, peer } => {
                json!({"type": "left", "room": room, "who": info_json(peer)})
            }
            PeerEvent::Paired { peer } => json!({"type": "paired", "who": info_json(peer)}),
            PeerEvent::Disconnected { peer } => {
                json!({"type": "disconnected", "who": info_json(peer)})
            }
            PeerEvent::Reconnected { continued } => {
                json!({"type": "reconnected", "continued": continued})
            }
            PeerEvent::Closed { reason } => json!({"type": "closed", "reason": reason}),
            PeerEvent::Upgraded { peer } => json!({"type": "upgraded", "who": peer.id}),
            PeerEvent::Downgraded { peer, reason } => {
                json!({"type": "downgraded", "who": peer.id, "reason": reason})
            }
            PeerEvent::UpgradeFailed { peer, reason } => {
                json!({"type": "upgrade_failed", "who": peer.id, "reason": reason})
            }
            other => json!({"type": format!("{other:?}")}),
        };
        let mut v = v;
        v["ev"] = json!("presence");
        v["peer"] = json!(n);
        out(v);
    });
    // Streams: read everything and report it; a name "bytes:N" asks for N bytes back.
    let p = p2p.clone();
    let n = name.to_owned();
    tokio::spawn(async move {
        while let Some(incoming) = p.accept_stream().await {
            if incoming.name().starts_with("refuse") {
                incoming.refuse("refused by the test");
                continue;
            }
            let from = incoming.peer().to_owned();
            let sname = incoming.name().to_owned();
            let Ok(stream) = incoming.accept() else {
                continue;
            };
            let n = n.clone();
            tokio::spawn(async move {
                let back = sname
                    .strip_prefix("bytes:")
                    .and_then(|x| x.parse::<usize>().ok())
                    .unwrap_or(0);
                let r = stream_both(stream, back).await;
                out(
                    json!({"ev": "stream", "peer": n, "from": from, "name": sname, "read": r.0, "sha256": r.1, "error": r.2}),
                );
            });
        }
    });
}

/// The SettingEngine of the peer's `loopback_only()`: loopback host candidates, mDNS off.
fn loopback_api() -> webrtc::api::API {
    let mut se = SettingEngine::default();
    se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    se.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
    se.set_host_acceptance_min_wait(Some(Duration::ZERO));
    se.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
    se.set_include_loopback_candidate(true);
    se.set_interface_filter(Box::new(|name: &str| name.starts_with("lo")));
    se.set_ip_filter(Box::new(|ip: IpAddr| ip.is_loopback()));
    APIBuilder::new().with_setting_engine(se).build()
}

/// Answers `offer` on a bare peer connection that counts what arrives on its data channels
/// and reports once `total` bytes did; returns the answer (every candidate in it).
async fn raw_answer(
    offer: String,
    total: usize,
    tag: Value,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let pc = Arc::new(
        loopback_api()
            .new_peer_connection(RTCConfiguration::default())
            .await?,
    );
    let got = Arc::new(AtomicUsize::new(0));
    let keep = pc.clone();
    pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        let (got, tag, keep) = (got.clone(), tag.clone(), keep.clone());
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            let n = msg.data.len();
            let before = got.fetch_add(n, Ordering::SeqCst);
            if before < total && before + n >= total {
                out(json!({"ev": "raw_counted", "tag": tag, "bytes": before + n}));
                let keep = keep.clone();
                tokio::spawn(async move {
                    let _ = keep.close().await;
                });
            }
            Box::pin(async {})
        }));
        Box::pin(async {})
    }));
    pc.set_remote_description(RTCSessionDescription::offer(offer)?)
        .await?;
    let answer = pc.create_answer(None).await?;
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(answer).await?;
    let _ = gathered.recv().await;
    Ok(pc.local_description().await.ok_or("no local answer")?.sdp)
}

/// Writes `send` pattern bytes and reads to the end at the same time.
async fn stream_both(stream: P2pStream, send: usize) -> (usize, String, Option<String>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async move {
        let data = pattern(send);
        for chunk in data.chunks(64 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let reader = async move {
        let mut h = Sha256::new();
        let mut n = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = rd.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
        }
        Ok::<_, std::io::Error>((n, hex(&h.finalize())))
    };
    let (w, r) = tokio::join!(writer, reader);
    match (w, r) {
        (Ok(()), Ok((n, sha))) => (n, sha, None),
        (w, r) => {
            let err = w.err().or(r
                .as_ref()
                .err()
                .map(|e| std::io::Error::new(e.kind(), e.to_string())));
            let (n, sha) = r.unwrap_or((0, String::new()));
            (n, sha, err.map(|e| e.to_string()))
        }
    }
}

fn str_field<'a>(cmd: &'a Value, k: &str) -> Option<&'a str> {
    cmd.get(k).and_then(Value::as_str)
}

async fn get(peers: &Peers, cmd: &Value) -> Option<P2p> {
    let name = str_field(cmd, "peer")?;
    peers.lock().await.get(name).cloned()
}

async fn run(cmd: Value, peers: Peers, url: String) {
    let id = cmd.get("id").cloned().unwrap_or(Value::Null);
    let done = |extra: Value| {
        let mut v = json!({"ev": "done", "id": id});
        if let Value::Object(m) = extra {
            for (k, x) in m {
                v[k] = x;
            }
        }
        out(v);
    };
    let fail = |e: &Error| {
        out(json!({"ev": "error", "id": id, "code": code(e), "message": e.to_string()}))
    };
    let to = str_field(&cmd, "to").map(str::to_owned);
    let event = str_field(&cmd, "event").unwrap_or("hi").to_owned();
    match str_field(&cmd, "cmd").unwrap_or("") {
        "peer" => {
            let name = str_field(&cmd, "name").unwrap_or("r").to_owned();
            let auto = cmd
                .get("auto_upgrade")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut opts = P2pOptions::default().loopback_only().auto_upgrade(auto);
            if let Some(n) = cmd.get("num_clients").and_then(Value::as_u64) {
                opts = opts.num_clients(n as usize);
            }
            if let Some(ms) = cmd.get("upgrade_timeout_ms").and_then(Value::as_u64) {
                opts = opts.upgrade_timeout(Duration::from_millis(ms));
            }
            if let Some(rooms) = cmd.get("rooms").and_then(Value::as_array) {
                for r in rooms.iter().filter_map(Value::as_str) {
                    opts = opts.room(r);
                }
            }
            if let Some(u) = str_field(&cmd, "uid") {
                opts = opts.uid(u);
            }
            if let Some(u) = str_field(&cmd, "peer_uid") {
                opts = opts.peer_uid(u);
            }
            if let Some(auth) = cmd.get("auth") {
                opts = opts.auth(auth.clone());
            }
            if let Some(ms) = cmd.get("ack_timeout_ms").and_then(Value::as_u64) {
                opts = opts.ack_timeout(Duration::from_millis(ms));
            }
            let handled: Vec<String> = cmd
                .get("handle")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_else(|| DEFAULT_HANDLED.iter().map(|s| (*s).to_owned()).collect());
            match P2p::connect(&url, opts).await {
                Ok(p2p) => {
                    install(&name, &p2p, &handled);
                    let pid = p2p.id().to_owned();
                    peers.lock().await.insert(name.clone(), p2p);
                    out(json!({"ev": "peer", "id": id, "name": name, "peer_id": pid}));
                }
                Err(e) => fail(&e),
            }
        }
        "emit" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let data = Payload::Json(cmd.get("data").cloned().unwrap_or(Value::Null));
            let r = match &to {
                Some(t) => p.to(t).emit(&event, data).await,
                None => p.emit(&event, data).await,
            };
            match r {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "emit_n" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let n = cmd.get("n").and_then(Value::as_u64).unwrap_or(1);
            let start = cmd.get("start").and_then(Value::as_u64).unwrap_or(0);
            let t = to.clone().unwrap_or_default();
            for i in start..start + n {
                if let Err(e) = p.to(&t).emit(&event, json!(i)).await {
                    return fail(&e);
                }
            }
            done(json!({"n": n}));
        }
        "emit_bin" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let len = cmd.get("len").and_then(Value::as_u64).unwrap_or(0) as usize;
            let data = Payload::Binary(bytes::Bytes::from(pattern(len)));
            let r = match &to {
                Some(t) => p.to(t).emit(&event, data).await,
                None => p.emit(&event, data).await,
            };
            match r {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "ack" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let data = match cmd.get("bin").and_then(Value::as_u64) {
                Some(len) => Payload::Binary(bytes::Bytes::from(pattern(len as usize))),
                None => Payload::Json(cmd.get("data").cloned().unwrap_or(Value::Null)),
            };
            let t = to.clone().unwrap_or_default();
            let r = match cmd.get("timeout_ms").and_then(Value::as_u64) {
                Some(ms) => {
                    p.to(&t)
                        .timeout(Duration::from_millis(ms))
                        .emit_with_ack(&event, data)
                        .await
                }
                None => p.to(&t).emit_with_ack(&event, data).await,
            };
            match r {
                Ok(v) => out(json!({"ev": "ack", "id": id, "ok": payload_json(&v)})),
                Err(e) => fail(&e),
            }
        }
        "peers" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            match p.peers().await {
                Ok(list) => done(json!({"peers": list.iter().map(info_json).collect::<Vec<_>>()})),
                Err(e) => fail(&e),
            }
        }
        "join" | "leave" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let room = str_field(&cmd, "room").unwrap_or("lobby");
            let r = if str_field(&cmd, "cmd") == Some("join") {
                p.join(room).await.map(|_| ())
            } else {
                p.leave(room).await
            };
            match r {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "upgrade" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let r = match &to {
                Some(t) => p.upgrade_peer(t).await,
                // Every peer: start the upgrades, and answer at once.
                None => {
                    let p = p.clone();
                    tokio::spawn(async move {
                        let _ = p.upgrade().await;
                    });
                    Ok(())
                }
            };
            match r {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "downgrade" | "kill" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let t = to.clone().unwrap_or_default();
            let r = if str_field(&cmd, "cmd") == Some("kill") {
                p.kill_data_channel(&t)
            } else {
                p.downgrade_peer(&t).await
            };
            match r {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "transport" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            match p.transport(to.as_deref().unwrap_or("")).await {
                Ok(t) => done(json!({"transport": format!("{t:?}")})),
                Err(e) => fail(&e),
            }
        }
        "close" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            if let Some(name) = str_field(&cmd, "peer") {
                peers.lock().await.remove(name);
            }
            p.close().await;
            done(json!({}));
        }
        "provide" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let service = Service::new()
                .method("add", |(a, b): (f64, f64)| async move {
                    Ok::<_, ServiceError>(a + b)
                })
                .method("fail", |_: Value| async move {
                    Err::<Value, _>(ServiceError::new("Nope", "asked to fail"))
                });
            match p
                .provide(str_field(&cmd, "service").unwrap_or("calc"), service)
                .await
            {
                Ok(()) => done(json!({})),
                Err(e) => fail(&e),
            }
        }
        "call" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let args = cmd.get("args").cloned().unwrap_or(Value::Null);
            let r: Result<Value, Error> = p
                .service(str_field(&cmd, "service").unwrap_or("calc"))
                .call(str_field(&cmd, "method").unwrap_or("add"), args)
                .await;
            match r {
                Ok(v) => done(json!({"ok": v})),
                Err(e) => fail(&e),
            }
        }
        "subscribe" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let topic = str_field(&cmd, "topic").unwrap_or("news").to_owned();
            let name = str_field(&cmd, "peer").unwrap_or("").to_owned();
            match p.subscribe(&topic).await {
                Ok(mut sub) => {
                    done(json!({}));
                    while let Some(pb) = sub.next().await {
                        out(json!({"ev": "publication", "peer": name, "topic": pb.topic,
                            "from": pb.from.as_ref().map(info_json), "data": pb.data}));
                    }
                }
                Err(e) => fail(&e),
            }
        }
        "publish" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let data = cmd.get("data").cloned().unwrap_or(Value::Null);
            match p
                .publish(str_field(&cmd, "topic").unwrap_or("news"), data)
                .await
            {
                Ok(n) => done(json!({"reached": n})),
                Err(e) => fail(&e),
            }
        }
        "stream" => {
            // Opens a stream, writes `len` pattern bytes, reads to the end.
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let t = to.clone().unwrap_or_default();
            let len = cmd.get("len").and_then(Value::as_u64).unwrap_or(0) as usize;
            match p
                .open_stream(&t, str_field(&cmd, "name").unwrap_or("data"))
                .await
            {
                Ok(s) => {
                    let (n, sha, err) = stream_both(s, len).await;
                    done(json!({"read": n, "sha256": sha, "error": err}));
                }
                Err(e) => fail(&e),
            }
        }
        "count" => {
            let Some(p) = get(&peers, &cmd).await else {
                return;
            };
            let total = cmd.get("bytes").and_then(Value::as_u64).unwrap_or(0) as usize;
            let got = Arc::new(AtomicUsize::new(0));
            let name = str_field(&cmd, "peer").unwrap_or("").to_owned();
            let _ = p.on(&event, move |e| {
                let n = match e.payload() {
                    Payload::Binary(b) => b.len(),
                    _ => 0,
                };
                let before = got.fetch_add(n, Ordering::SeqCst);
                if before < total && before + n >= total {
                    out(json!({"ev": "counted", "peer": name, "bytes": before + n,
                        "transport": format!("{:?}", e.transport())}));
                }
            });
            done(json!({}));
        }
        "raw_answer" => {
            let sdp = str_field(&cmd, "sdp").unwrap_or("").to_owned();
            let total = cmd.get("bytes").and_then(Value::as_u64).unwrap_or(0) as usize;
            let tag = cmd.get("tag").cloned().unwrap_or(Value::Null);
            match raw_answer(sdp, total, tag).await {
                Ok(answer) => done(json!({"sdp": answer})),
                Err(e) => {
                    out(json!({"ev": "error", "id": id, "code": "Raw", "message": e.to_string()}))
                }
            }
        }
        other => out(json!({"ev": "error", "id": id, "code": "BadCommand", "message": other})),
    }
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let cfg = Config {
        static_dir: arg("--static").map(PathBuf::from),
        auth_token: arg("--auth-token"),
        buffer: arg("--buffer").and_then(|b| b.parse().ok()),
        welcome_members: arg("--welcome-members").and_then(|b| b.parse().ok()),
    };
    let mut server = ServerTask::start(0, cfg.clone());
    let url = format!("http://{}", server.addr);
    out(json!({"ev": "listening", "url": url, "port": server.addr.port()}));
    let peers: Peers = Arc::default();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(cmd) = serde_json::from_str::<Value>(&line) else {
            out(json!({"ev": "error", "code": "BadCommand", "message": line}));
            continue;
        };
        match str_field(&cmd, "cmd") {
            Some("restart") => {
                // Stop the server and start a new instance on the same port after `down_ms`.
                let port = server.addr.port();
                server.kill();
                let down = cmd.get("down_ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(down)).await;
                let cfg = cfg.clone();
                server = tokio::task::spawn_blocking(move || ServerTask::start(port, cfg))
                    .await
                    .expect("restart");
                out(json!({"ev": "done", "id": cmd.get("id"), "restarted": true}));
            }
            Some("exit") => break,
            _ => {
                tokio::spawn(run(cmd, peers.clone(), url.clone()));
            }
        }
    }
    for p in peers.lock().await.values() {
        p.close().await;
    }
    tokio::task::spawn_blocking(move || server.kill())
        .await
        .ok();
}
