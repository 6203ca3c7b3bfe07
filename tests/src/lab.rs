//! A NAT lab made of network namespaces, created by the test and removed when it is dropped
//! (even when the test panics).
//!
//! ```text
//!                      public (100.64.0.1 signaling, 100.64.0.2 TURN: coturn)
//!                    /   r1 100.64.1.1          r2 100.64.2.1    r3 ...  \
//!   router 1 (wan 100.64.1.2, NAT)      router 2 (wan 100.64.2.2, NAT)    router 3 (spare)
//!   lan 192.168.1.1                     lan 192.168.2.1                   lan 192.168.1.1
//!     host 1 (192.168.1.2)                host 2 (192.168.2.2)
//! ```
//!
//! Each home is a host behind a router that NATs it with nft `masquerade` (port-preserving,
//! endpoint-independent mapping: hole punching works) or `masquerade random,fully-random`
//! (a new random port per destination: symmetric, only TURN works). A router can also drop
//! UDP, or drop everything to the TURN server. The public namespace forwards between the
//! routers and holds the signaling server and a coturn (`use-auth-secret`, UDP and TCP on
//! 3478). Every address lives inside the lab; nothing leaves the machine.
//!
//! Code runs inside a namespace on threads that entered it ([`Ns::runtime`]): sockets
//! created there belong to it. Works inside `unshare -n` (named namespaces are created by
//! `ip netns add`, which needs root).
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The signaling server's address in the public namespace.
pub const SIGNALING_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// coturn's address in the public namespace.
pub const TURN_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// coturn's port (UDP and TCP).
pub const TURN_PORT: u16 = 3478;
/// Its TURN-over-TLS port (`turns:`), with a self-signed certificate for [`TURN_IP`]
/// ([`Lab::turn_tls_root`]).
pub const TURNS_PORT: u16 = 5349;
/// coturn's `static-auth-secret`.
pub const TURN_SECRET: &str = "lab-turn-secret";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace, deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// Creates `name` with its loopback up.
    pub fn create(name: String) -> Ns {
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Runs `prog args...` inside the namespace.
    pub fn exec(&self, prog: &str, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, prog])
            .args(args));
    }

    /// Loads an nft ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("nft stdin");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {}: {}\n{ruleset}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, kv: &str) {
        self.exec("sysctl", &["-qw", kv]);
    }

    /// Moves the calling thread into the namespace.
    fn enter(name: &str) {
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        nix::sched::setns(f.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                Self::enter(&self.name);
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    /// A tokio runtime whose threads all live in the namespace: spawn on it anything that
    /// opens sockets (a server, a `P2p`).
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        let name = self.name.clone();
        self.run(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(format!("ns-{name}"))
                .enable_all()
                .build()
                .expect("runtime")
        })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// How a router maps its home's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: the same port for every destination, so hole punching works.
    Cone,
    /// `masquerade random,fully-random`: a random port per connection (symmetric NAT).
    Symmetric,
}

/// One home: a router and the host behind it.
#[derive(Debug, Clone, Copy)]
pub struct Home {
    pub nat: Nat,
    /// The router drops every UDP packet from its home.
    pub block_udp: bool,
    /// The router drops everything sent to the TURN server.
    pub block_turn: bool,
}

impl Home {
    pub fn cone() -> Home {
        Home {
            nat: Nat::Cone,
            block_udp: false,
            block_turn: false,
        }
    }
    pub fn symmetric() -> Home {
        Home {
            nat: Nat::Symmetric,
            ..Home::cone()
        }
    }
    pub fn block_udp(mut self) -> Home {
        self.block_udp = true;
        self
    }
    pub fn block_turn(mut self) -> Home {
        self.block_turn = true;
        self
    }
}

/// A router namespace.
pub struct Router {
    pub ns: Ns,
    /// Its address on the public side.
    pub wan: Ipv4Addr,
    /// Its home's subnet: 192.168.`lan`.0/24.
    pub lan: u8,
}

/// A host namespace behind a router.
pub struct Host {
    pub ns: Ns,
    /// Its address in its home.
    pub addr: Ipv4Addr,
    /// Index of the router it is plugged into.
    pub router: usize,
    /// Threads inside the namespace for its tasks.
    pub rt: tokio::runtime::Runtime,
}

impl Host {
    /// Spawns `f` on the host's runtime (inside its namespace).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(f)
    }
}

/// A running coturn, killed on drop.
pub struct Turn {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Kept for a failing test (its log is there).
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// coturn REST-API credentials (`use-auth-secret`): `(username, password)` valid for `ttl`.
pub fn turn_credentials(secret: &str, who: &str, ttl: Duration) -> (String, String) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let user = format!("{expiry}:{who}");
    let pass = socketio_p2p_signaling::turn_password(secret, &user);
    (user, pass)
}

/// Deletes the namespaces named `<prefix><pid>x...` whose process is gone (killed before
/// its drops ran).
pub(crate) fn remove_stale_namespaces(prefix: &str) {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The whole lab. Fields drop in order: hosts (their runtimes), TURN, routers, public.
pub struct Lab {
    pub hosts: Vec<Host>,
    pub turn: Option<Turn>,
    pub routers: Vec<Router>,
    /// The public namespace's runtime (signaling server).
    pub public_rt: tokio::runtime::Runtime,
    pub public: Ns,
    prefix: String,
}

impl Lab {
    /// A lab with one host behind each of `homes`, and `spare` extra routers with no host
    /// (LAN 192.168.1.0/24, the first home's subnet, to move a host to).
    pub fn new(homes: &[Home], spare: usize, with_turn: bool) -> Lab {
        crate::init_tracing();
        remove_stale_namespaces("p2plab");
        let prefix = format!(
            "p2plab{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let public = Ns::create(format!("{prefix}pub"));
        public.sysctl("net.ipv4.ip_forward=1");
        public.ip(&["addr", "add", &format!("{SIGNALING_IP}/32"), "dev", "lo"]);
        public.ip(&["addr", "add", &format!("{TURN_IP}/32"), "dev", "lo"]);
        let public_rt = public.runtime();
        let mut lab = Lab {
            hosts: Vec::new(),
            turn: None,
            routers: Vec::new(),
            public_rt,
            public,
            prefix,
        };
        for (i, home) in homes.iter().enumerate() {
            let lan = (i + 1) as u8;
            lab.add_router(*home, lan);
            lab.add_host(i);
        }
        for _ in 0..spare {
            lab.add_router(Home::cone(), 1);
        }
        if with_turn {
            lab.turn = Some(lab.start_turn());
        }
        lab
    }

    fn add_router(&mut self, home: Home, lan: u8) {
        let i = self.routers.len() + 1;
        let ns = Ns::create(format!("{}r{i}", self.prefix));
        ns.sysctl("net.ipv4.ip_forward=1");
        let wan = Ipv4Addr::new(100, 64, i as u8, 2);
        let pub_side = format!("r{i}");
        self.public.ip(&[
            "link", "add", &pub_side, "type", "veth", "peer", "name", "wan", "netns", &ns.name,
        ]);
        self.public
            .ip(&["addr", "add", &format!("100.64.{i}.1/24"), "dev", &pub_side]);
        self.public.ip(&["link", "set", &pub_side, "up"]);
        ns.ip(&["addr", "add", &format!("{wan}/24"), "dev", "wan"]);
        ns.ip(&["link", "set", "wan", "up"]);
        ns.ip(&["route", "add", "default", "via", &format!("100.64.{i}.1")]);
        let masq = match home.nat {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade random,fully-random",
        };
        let mut filter = String::new();
        if home.block_udp {
            filter.push_str("    iifname \"lan\" meta l4proto udp drop\n");
        }
        if home.block_turn {
            filter.push_str(&format!("    ip daddr {TURN_IP} drop\n"));
        }
        // Unsolicited packets from the outside are dropped before conntrack confirms them:
        // a check that arrives before the hole is punched must not take the port that the
        // home's own outgoing packet then needs (as a home router's firewall does).
        ns.nft(&format!(
            "table ip lab {{\n  chain lab_post {{\n    type nat hook postrouting priority srcnat;\n    oifname \"wan\" {masq}\n  }}\n  chain lab_forward {{\n    type filter hook forward priority filter;\n{filter}  }}\n  chain lab_input {{\n    type filter hook input priority filter;\n    iifname \"wan\" ct state new drop\n  }}\n}}\n"
        ));
        self.routers.push(Router { ns, wan, lan });
    }

    fn add_host(&mut self, router: usize) {
        let i = self.hosts.len() + 1;
        let ns = Ns::create(format!("{}h{i}", self.prefix));
        let lan = self.routers[router].lan;
        let addr = Ipv4Addr::new(192, 168, lan, 2);
        self.plug(&ns, addr, router);
        let rt = ns.runtime();
        self.hosts.push(Host {
            ns,
            addr,
            router,
            rt,
        });
    }

    /// A veth `eth0` from `host` to the router's `lan`, with `addr` and a default route.
    fn plug(&self, host: &Ns, addr: Ipv4Addr, router: usize) {
        let r = &self.routers[router];
        host.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns", &r.ns.name,
        ]);
        r.ns.ip(&[
            "addr",
            "add",
            &format!("192.168.{}.1/24", r.lan),
            "dev",
            "lan",
        ]);
        r.ns.ip(&["link", "set", "lan", "up"]);
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        host.ip(&["link", "set", "eth0", "up"]);
        host.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("192.168.{}.1", r.lan),
        ]);
    }

    /// Unplugs host `h` from its router: it has no network until [`Lab::replug_host`].
    pub fn unplug_host(&mut self, h: usize) {
        self.hosts[h].ns.ip(&["link", "del", "eth0"]);
    }

    /// Plugs the unplugged host `h` into `router` (same subnet, so it keeps its address, as
    /// a laptop moving between two home networks would): its connections now leave
    /// through another NAT with other ports.
    pub fn replug_host(&mut self, h: usize, router: usize) {
        assert_eq!(
            self.routers[router].lan, self.routers[self.hosts[h].router].lan,
            "the new router must serve the host's subnet"
        );
        let host = &self.hosts[h];
        self.plug(&host.ns, host.addr, router);
        self.hosts[h].router = router;
    }

    fn start_turn(&self) -> Turn {
        let dir = std::env::temp_dir().join(format!("{}-turn", self.prefix));
        std::fs::create_dir_all(&dir).expect("turn dir");
        let conf = dir.join("turnserver.conf");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            ])
            .arg(format!("/CN={TURN_IP}"))
            .arg("-addext")
            .arg(format!("subjectAltName=IP:{TURN_IP}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (for the TURN server's TLS certificate)");
        assert!(made.success(), "openssl req failed");
        // Private peer addresses are denied, as a public TURN server should: the public
        // namespace has no route to the homes' 192.168.x.x host candidates, and coturn 4.6
        // closes an allocation's relay socket when relaying a check to one fails
        // (ENETUNREACH). webrtc-rs 0.17's TURN client does not allocate again, so every
        // relayed check after it is lost. Denied, the CreatePermission is refused instead
        // (403) and nothing is sent there.
        std::fs::write(
            &conf,
            format!(
                "listening-ip={TURN_IP}\nrelay-ip={TURN_IP}\nlistening-port={TURN_PORT}\n\
                 tls-listening-port={TURNS_PORT}\ncert={}\npkey={}\n\
                 min-port=40000\nmax-port=49999\nuse-auth-secret\nstatic-auth-secret={TURN_SECRET}\n\
                 realm=lab\nfingerprint\nno-cli\nno-dtls\nno-multicast-peers\n\
                 denied-peer-ip=10.0.0.0-10.255.255.255\ndenied-peer-ip=172.16.0.0-172.31.255.255\n\
                 denied-peer-ip=192.168.0.0-192.168.255.255\n\
                 allowed-peer-ip=100.64.0.0-100.64.255.255\nsimple-log\nverbose\n\
                 log-file=stdout\npidfile={}\nuserdb={}\n",
                cert.display(),
                key.display(),
                dir.join("turn.pid").display(),
                dir.join("turn.db").display(),
            ),
        )
        .expect("turn conf");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.public.name, "turnserver", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("turn.log")).expect("turn log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (Debian package coturn; scripts/setup installs it)");
        let turn = Turn { child, dir };
        // Ready once it accepts TCP (it opens UDP and TCP listeners together).
        let ready = self.public.run(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let to = SocketAddr::from((TURN_IP, TURN_PORT));
                if std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        assert!(ready, "coturn did not start");
        turn
    }

    /// The certificate (PEM) of the lab's `turns:` server, for
    /// `P2pOptions::turn_tls_root`.
    pub fn turn_tls_root(&self) -> Vec<u8> {
        self.turn
            .as_ref()
            .and_then(|t| std::fs::read(t.dir.join("cert.pem")).ok())
            .unwrap_or_default()
    }

    /// The coturn log so far (for failing tests).
    pub fn turn_log(&self) -> String {
        self.turn
            .as_ref()
            .and_then(|t| std::fs::read_to_string(t.dir.join("turn.log")).ok())
            .unwrap_or_default()
    }

    /// Serves `signaling` on [`SIGNALING_IP`] in the public namespace; returns its URL.
    pub fn serve(&self, signaling: socketio_p2p_signaling::P2pSignaling) -> String {
        // Spawned, not run by `block_on` on this thread: the socket must be opened by a
        // thread of the namespace.
        let task = self.public_rt.spawn(async move {
            // Engine.IO pings every second: a connection lost without a word (a host that
            // moved away) is noticed within two seconds.
            let (layer, io) = socketioxide::SocketIo::builder()
                .max_buffer_size(4096)
                .ping_interval(Duration::from_secs(1))
                .ping_timeout(Duration::from_secs(1))
                .build_layer();
            signaling.attach(&io);
            let app = axum::Router::new().layer(layer);
            let listener = tokio::net::TcpListener::bind((SIGNALING_IP, 0))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let _ = axum::serve(crate::nodelay(listener), app).await;
            });
            addr
        });
        let addr = self.public_rt.block_on(task).expect("serve");
        format!("http://{addr}")
    }

    /// The lab's TURN server (UDP) with credentials for `who` valid for `ttl`.
    pub fn turn_server(&self, who: &str, ttl: Duration) -> socketio_p2p::IceServer {
        let (user, pass) = turn_credentials(TURN_SECRET, who, ttl);
        socketio_p2p::IceServer::turn(turn_url(), user, pass)
    }
}

/// `turn:100.64.0.2:3478` (UDP).
pub fn turn_url() -> String {
    format!("turn:{TURN_IP}:{TURN_PORT}")
}

/// `turn:100.64.0.2:3478?transport=tcp`.
pub fn turn_tcp_url() -> String {
    format!("{}?transport=tcp", turn_url())
}

/// `turns:100.64.0.2:5349` (TURN over TLS).
pub fn turns_url() -> String {
    format!("turns:{TURN_IP}:{TURNS_PORT}")
}

/// `stun:100.64.0.2:3478` (coturn is a STUN server too).
pub fn stun_url() -> String {
    format!("stun:{TURN_IP}:{TURN_PORT}")
}

/// Options for a peer in the lab: real candidates (not loopback-only), the lab's STUN and
/// TURN servers only, mDNS off.
pub fn lab_opts(ice: Vec<socketio_p2p::IceServer>) -> socketio_p2p::P2pOptions {
    socketio_p2p::P2pOptions::default()
        .ice_servers(ice)
        .disable_mdns(true)
        .auto_upgrade(false)
}
