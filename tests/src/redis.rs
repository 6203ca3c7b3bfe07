//! Multi-node harness: a real redis-server on a free loopback port, signaling nodes sharing it.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{CrashableServer, Server, init_tracing, serve};
use socketio_p2p_signaling::{P2pSignaling, RedisCluster, SignalingOptions, redis};

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
        Self::start_own()
    }

    /// A redis-server of this test's own (never the shared one): for tests that kill it.
    pub fn start_own() -> RedisServer {
        init_tracing();
        // A free port: bind :0, read it, let it go (`--port 0` would turn TCP off in redis).
        let port = free_port();
        let server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child: Some(redis_on(port)),
        };
        server.wait_ready();
        server
    }

    /// Kills the server (like a crash: no shutdown, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh server (no keys) on the same port after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        let port: u16 = self
            .url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in the url");
        // The old socket may linger a moment: start again until one server binds and answers.
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut child = redis_on(port);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server never came back on port {port}: {pong:?}"
            );
            if !matches!(child.try_wait(), Ok(None)) {
                child = redis_on(port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
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

/// A free 127.0.0.1 TCP port (bound, read, let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn redis_on(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) must be installed")
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
    let signaling = P2pSignaling::with_redis(opts, cluster)
        .await
        .expect("cluster node");
    serve(signaling, 0).await
}

/// A cluster node in a runtime of its own on its own thread, killed like a crashed process:
/// every task and socket dropped at once, nothing announced, no uid released.
pub fn crashable_node(cluster: RedisCluster) -> CrashableServer {
    CrashableServer::start_with(0, move || async move {
        P2pSignaling::with_redis(SignalingOptions::default(), cluster)
            .await
            .expect("cluster node")
    })
}
