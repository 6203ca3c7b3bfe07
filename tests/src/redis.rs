//! Multi-node harness: a real redis-server on a free loopback port, signaling nodes sharing it.
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socketio_p2p_signaling::{P2pSignaling, RedisCluster, SignalingOptions, redis};
use socketioxide::SocketIo;

use crate::{Server, init_tracing, nodelay};

/// A redis-server for one test: started on a free 127.0.0.1 port (inside the test's network
/// namespace) and killed on drop, or the server of `P2P_TEST_REDIS_URL` when that is set.
pub struct RedisServer {
    pub url: String,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        init_tracing();
        if let Ok(url) = std::env::var("P2P_TEST_REDIS_URL") {
            let server = RedisServer { url, child: None };
            server.wait_ready();
            return server;
        }
        // A free port: bind :0, read it, let it go (`--port 0` would turn TCP off in redis).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed");
        let server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child: Some(child),
        };
        server.wait_ready();
        server
    }

    /// Waits (at most 10 s) until the server answers PING.
    fn wait_ready(&self) {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server at {} never answered PING: {pong:?}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The cluster settings for nodes of one test: a prefix of their own, so that tests can
    /// share one server; heartbeats every 200 ms, a node silent for 2 s is dead (tolerant of a
    /// busy machine; the node-death test shortens it).
    pub fn cluster(&self, prefix: &str) -> RedisCluster {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        RedisCluster::new(client)
            .prefix(format!("test-{}-{prefix}", std::process::id()))
            .heartbeat(Duration::from_millis(200))
            .node_timeout(Duration::from_secs(2))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A signaling node of the cluster `cluster`, on its own 127.0.0.1 port.
pub async fn spawn_node(cluster: RedisCluster) -> Server {
    spawn_node_with(cluster, SignalingOptions::default()).await
}

pub async fn spawn_node_with(cluster: RedisCluster, opts: SignalingOptions) -> Server {
    init_tracing();
    let (layer, io) = SocketIo::builder().max_buffer_size(4096).build_layer();
    let signaling = P2pSignaling::with_redis(opts, cluster)
        .await
        .expect("cluster node");
    signaling.attach(&io);
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listener = nodelay(listener);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        addr,
        signaling,
        io,
        task,
    }
}

/// A cluster node in a runtime of its own on its own thread, killed like a crashed process:
/// every task and socket dropped at once, nothing announced, no uid released.
pub struct CrashableNode {
    pub addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CrashableNode {
    pub fn start(cluster: RedisCluster) -> CrashableNode {
        init_tracing();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let ready = rt.block_on(async move {
                let (layer, io) = SocketIo::builder().max_buffer_size(4096).build_layer();
                let signaling = P2pSignaling::with_redis(SignalingOptions::default(), cluster)
                    .await
                    .expect("cluster node");
                signaling.attach(&io);
                let app = axum::Router::new().layer(layer);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                let listener = nodelay(listener);
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
                addr
            });
            let _ = ready_tx.send(ready);
            let _ = stop_rx.recv();
            rt.shutdown_background();
        });
        let addr = ready_rx.recv().expect("node thread died");
        CrashableNode {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the node at once.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CrashableNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder in front of the nodes, like a load balancer: `switch` cuts every
/// connection and sends the new ones to another node.
pub struct Switch {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    pub async fn start(target: SocketAddr) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target = Arc::new(Mutex::new(target));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (to, list) = (target.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let dest = *to.lock().unwrap_or_else(|e| e.into_inner());
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(dest).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(h.abort_handle());
            }
        });
        Switch {
            addr,
            target,
            conns,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `target`; the current ones are cut.
    pub fn switch(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        for h in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
