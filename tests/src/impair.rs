//! An impaired network: end namespaces around one router namespace whose forwarded packets
//! all pass through a TUN device, where a userspace forwarder holds each one for a fixed
//! delay before writing it back, and nft drops a share of them at random.
//!
//! ```text
//!   end 0 (10.99.1.2) --veth-- router --veth-- end 1 (10.99.2.2)
//!                                |  \--veth-- end 2 (10.99.3.2) ...
//!                              tun "imp": read, held `delay`, written back
//! ```
//!
//! Every packet between two ends crosses the router once, so with a one-way delay of 25 ms
//! every pair of ends has a 50 ms round trip, UDP and TCP alike (the kernel here has no
//! netem). The router routes what comes in on an end's veth into the TUN device (a policy
//! rule per veth); what the forwarder writes back comes in on the TUN device and takes the
//! main table to the destination's veth. Loss is nft `numgen random` on the way into the
//! TUN device: each crossing is dropped with the given probability, independently.
//!
//! Building it needs root (`ip netns add`) and `/dev/net/tun`; [`ImpairedNet::new`] returns
//! an error, not a panic, when that fails, so a caller can skip instead.
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::lab::Ns;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The TUN device's name in the router namespace.
const TUN: &str = "imp";

/// Runs a command; its stderr becomes the error.
fn try_run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip -n NS args...`
fn ip(ns: &Ns, args: &[&str]) -> Result<(), String> {
    try_run(Command::new("ip").arg("-n").arg(&ns.name).args(args))
}

/// Runs `prog args...` inside `ns`.
fn exec(ns: &Ns, prog: &str, args: &[&str]) -> Result<(), String> {
    try_run(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, prog])
            .args(args),
    )
}

/// Loads an nft ruleset inside `ns`.
fn nft(ns: &Ns, ruleset: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates namespace `name` with its loopback up (deleted when the `Ns` drops).
fn create_ns(name: String) -> Result<Ns, String> {
    try_run(Command::new("ip").args(["netns", "add", &name]))?;
    let ns = Ns { name };
    ip(&ns, &["link", "set", "lo", "up"])?;
    Ok(ns)
}

/// Counters of the delay forwarder.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// Packets read from the TUN device.
    pub packets: AtomicU64,
    /// Bytes read from the TUN device.
    pub bytes: AtomicU64,
    /// Packets that could not be written back.
    pub write_errors: AtomicU64,
}

/// One end: a namespace with one veth to the router and threads inside it.
pub struct End {
    /// Its address.
    pub addr: Ipv4Addr,
    /// Threads inside the namespace: spawn on it anything that opens sockets.
    pub rt: tokio::runtime::Runtime,
    /// The namespace.
    pub ns: Ns,
}

impl End {
    /// Runs `f` on the end's threads (so its sockets belong to the end's namespace) and
    /// waits for it. Not `rt.block_on(f)`: that would poll `f` on the calling thread.
    pub fn run<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.rt.block_on(self.rt.spawn(f)) {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The impaired network. Fields drop in order: ends (their runtimes), the forwarder's
/// runtime, the router, so no task outlives its namespace.
pub struct ImpairedNet {
    /// The ends, `10.99.(i+1).2`.
    pub ends: Vec<End>,
    /// The forwarder's runtime (in the router namespace).
    router_rt: tokio::runtime::Runtime,
    /// The router namespace.
    pub router: Ns,
    /// The delay each packet gets (once per crossing).
    pub delay: Duration,
    /// Probability in percent that a crossing is dropped.
    pub loss_percent: f64,
    /// The forwarder's counters.
    pub stats: Arc<ForwarderStats>,
}

impl ImpairedNet {
    /// Builds `ends` end namespaces around a router that delays every packet by `delay`
    /// and drops `loss_percent` % of them (resolution 0.01 %). Call it, and drop the net,
    /// outside an async context (it starts and stops runtimes of its own).
    pub fn new(ends: usize, delay: Duration, loss_percent: f64) -> Result<ImpairedNet, String> {
        if !(1..=200).contains(&ends) {
            return Err(format!("{ends} ends: 1 to 200 are possible"));
        }
        if !(0.0..=100.0).contains(&loss_percent) {
            return Err(format!("loss {loss_percent} % is not a percentage"));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        crate::lab::remove_stale_namespaces("p2pimp");
        let prefix = format!(
            "p2pimp{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let router = create_ns(format!("{prefix}r"))?;
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            exec(&router, "sysctl", &["-qw", kv])?;
        }
        let stats = Arc::new(ForwarderStats::default());
        let router_rt = router.runtime();
        // The TUN device is created in the namespace of the thread that opens it.
        let tun = router_rt
            .block_on(router_rt.spawn(async {
                tokio_tun::Tun::builder()
                    .name(TUN)
                    .up()
                    .build()
                    .map_err(|e| format!("tun: {e}"))
            }))
            .map_err(|e| format!("tun task: {e}"))??
            .into_iter()
            .next()
            .ok_or("tun: no queue")?;
        exec(
            &router,
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{TUN}.rp_filter=0")],
        )?;
        ip(
            &router,
            &["route", "add", "default", "dev", TUN, "table", "100"],
        )?;
        let mut net = ImpairedNet {
            ends: Vec::new(),
            router_rt,
            router,
            delay,
            loss_percent,
            stats: stats.clone(),
        };
        for i in 0..ends {
            net.add_end(&prefix, i)?;
        }
        let basis_points = (loss_percent * 100.0).round() as u32;
        let drop_rule = if basis_points > 0 {
            format!("    oifname \"{TUN}\" numgen random mod 10000 < {basis_points} drop\n")
        } else {
            String::new()
        };
        nft(
            &net.router,
            &format!(
                "table inet impair {{\n  chain impair_forward {{\n    type filter hook forward priority filter;\n{drop_rule}  }}\n}}\n"
            ),
        )?;
        net.router_rt.spawn(forward(tun, delay, stats));
        Ok(net)
    }

    fn add_end(&mut self, prefix: &str, i: usize) -> Result<(), String> {
        let n = i + 1;
        let ns = create_ns(format!("{prefix}e{n}"))?;
        let side = format!("e{n}");
        ip(
            &self.router,
            &[
                "link", "add", &side, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        )?;
        ip(
            &self.router,
            &["addr", "add", &format!("10.99.{n}.1/24"), "dev", &side],
        )?;
        ip(&self.router, &["link", "set", &side, "up"])?;
        exec(
            &self.router,
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{side}.rp_filter=0")],
        )?;
        ip(
            &self.router,
            &["rule", "add", "iif", &side, "lookup", "100"],
        )?;
        let addr = Ipv4Addr::new(10, 99, n as u8, 2);
        ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(
            &ns,
            &["route", "add", "default", "via", &format!("10.99.{n}.1")],
        )?;
        let rt = ns.runtime();
        self.ends.push(End { addr, rt, ns });
        Ok(())
    }
}

/// Reads packets from `tun` and writes each back `delay` after it arrived, in order.
async fn forward(tun: tokio_tun::Tun, delay: Duration, stats: Arc<ForwarderStats>) {
    let tun = Arc::new(tun);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tun.clone();
    let counters = stats.clone();
    // One queue, one constant delay: packets leave in the order they came.
    tokio::spawn(async move {
        while let Some((due, packet)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if writer.send(&packet).await.is_err() {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut buf = vec![0u8; 65536];
    loop {
        match tun.recv(&mut buf).await {
            Ok(n) => {
                stats.packets.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("impaired net: tun read failed: {e}");
                return;
            }
        }
    }
}
