//! Two peers in two homes behind real NATs (network namespaces, nft masquerade), a
//! signaling server and a coturn on the "public" side: each kind of network ends on the
//! path it should (direct, TURN, or our Socket.IO relay), and on every path numbered events
//! arrive complete and in order, a 16 MiB stream arrives intact, and the stats count what
//! was sent. The TURN credentials come from the server's welcome.
//!
//! Needs root (network namespaces), `nft` and `turnserver` (scripts/setup installs them).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use socketio_p2p::{P2p, P2pOptions, Path, PeerStats, UpgradeFailure};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions, TurnCredentials};
use socketio_p2p_tests::lab::*;
use socketio_p2p_tests::{count, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EVENTS: u64 = 10_000;
const STREAM: usize = 16 * 1024 * 1024;

/// A signaling server handing out credentials for the lab's coturn (STUN and TURN/UDP).
fn signaling(ttl: Duration) -> P2pSignaling {
    signaling_with(ttl, vec![stun_url(), turn_url()])
}

/// The same, handing out these STUN/TURN URLs.
fn signaling_with(ttl: Duration, urls: Vec<String>) -> P2pSignaling {
    let turn = TurnCredentials::new(urls, TURN_SECRET).ttl(ttl);
    P2pSignaling::new(SignalingOptions::default().turn_credentials(turn))
}

fn opts() -> P2pOptions {
    // The default `upgrade_timeout` (5 s): ICE gives up after about 4 s of checks, so a
    // failure says `IceFailed`.
    lab_opts(Vec::new()).room("nat")
}

/// Connects a peer from host `h` (inside its namespace).
async fn connect(lab: &Lab, h: usize, url: &str, opts: P2pOptions) -> P2p {
    let url = url.to_owned();
    lab.hosts[h]
        .spawn(async move {
            tokio::time::timeout(Duration::from_secs(20), P2p::connect(&url, opts))
                .await
                .expect("connect timed out")
                .expect("connect")
        })
        .await
        .unwrap()
}

async fn send_events(lab: &Lab, h: usize, from: &P2p, to: &str) -> tokio::task::JoinHandle<()> {
    let (from, to) = (from.clone(), to.to_owned());
    lab.hosts[h].spawn(async move {
        for i in 0..EVENTS {
            from.to(&to).emit("n", json!(i)).await.unwrap();
        }
    })
}

fn byte_at(i: usize) -> u8 {
    (i % 251) as u8
}

/// Sends 16 MiB from `a` (host 0) to `b` (host 1) on a stream; returns the time it took.
async fn stream_16_mib(lab: &Lab, a: &P2p, b: &P2p) -> Duration {
    let started = Instant::now();
    let b2 = b.clone();
    let reader = lab.hosts[1].spawn(async move {
        let inc = tokio::time::timeout(Duration::from_secs(20), b2.accept_stream())
            .await
            .expect("no stream")
            .unwrap();
        let mut s = inc.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte_at(got + k), "byte {} corrupted", got + k);
            }
            got += n;
        }
        got
    });
    let (a2, bid) = (a.clone(), b.id().to_owned());
    let writer = lab.hosts[0].spawn(async move {
        let mut s = a2.open_stream(&bid, "bulk").await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < STREAM {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = byte_at(sent + k);
            }
            s.write_all(&buf).await.unwrap();
            sent += buf.len();
        }
        s.shutdown().await.unwrap();
    });
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("stream timed out")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got, STREAM, "stream truncated");
    started.elapsed()
}

async fn stats(lab: &Lab, h: usize, p: &P2p, peer: &str) -> PeerStats {
    let (p, peer) = (p.clone(), peer.to_owned());
    lab.hosts[h]
        .spawn(async move { p.stats(&peer).await.unwrap() })
        .await
        .unwrap()
}

/// Upgrades a to b; returns the outcome and how long it took.
async fn upgrade(lab: &Lab, a: &P2p, b: &P2p) -> (socketio_p2p::Result<()>, Duration) {
    let (a2, bid) = (a.clone(), b.id().to_owned());
    let t = Instant::now();
    let r = lab.hosts[0]
        .spawn(async move { a2.upgrade_peer(&bid).await })
        .await
        .unwrap();
    (r, t.elapsed())
}

/// The whole check for one kind of network: the pair ends on `expect`, then events both
/// ways, a 16 MiB stream, and the stats.
fn check(homes: [Home; 2], expect: Path) {
    check_with(homes, expect, vec![stun_url(), turn_url()]);
}

/// [`check`] with the server handing out these STUN/TURN URLs (peers trust the lab's TLS
/// certificate for `turns:`). When home 0 blocks UDP and the pair ends on TURN, home 0's
/// end must be a relay it reaches over TCP.
fn check_with(homes: [Home; 2], expect: Path, urls: Vec<String>) {
    let lab = Lab::new(&homes, 0, true);
    let url = lab.serve(signaling_with(Duration::from_secs(600), urls));
    let opts = || opts().turn_tls_root(lab.turn_tls_root());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = connect(&lab, 0, &url, opts()).await;
        let b = connect(&lab, 1, &url, opts()).await;
        for p in [&a, &b] {
            assert!(
                wait_until(10, || async {
                    p.peers().await.map(|v| v.len()).unwrap_or(0) == 1
                })
                .await
            );
        }
        let (r, took) = upgrade(&lab, &a, &b).await;
        // Both sides learn of the open channel, then of its candidates, a moment later.
        let want_pair = expect != Path::Relay;
        let t = Instant::now();
        let (sa, sb) = loop {
            let sa = stats(&lab, 0, &a, b.id()).await;
            let sb = stats(&lab, 1, &b, a.id()).await;
            let known = |s: &PeerStats| s.candidates.is_some() == want_pair;
            if (known(&sa) && known(&sb)) || t.elapsed() > Duration::from_secs(5) {
                break (sa, sb);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        eprintln!(
            "{homes:?}: upgrade {r:?} in {took:?}, a {:?} {:?}, b {:?} {:?}",
            sa.path, sa.candidates, sb.path, sb.candidates
        );
        assert_eq!(sa.path, expect, "a's path ({:?}): {sa:?}", r);
        assert_eq!(sb.path, expect, "b's path: {sb:?}");
        match expect {
            Path::Relay => {
                assert!(r.is_err());
                // The relay session was not disturbed, and the failure says why. (With UDP
                // dropped, gathering first waits for the STUN and TURN servers to time
                // out, so ICE may not give up within `upgrade_timeout`.)
                let udp_blocked = homes.iter().any(|h| h.block_udp);
                // Both ICE agents give up at about the same time; the first to notice says
                // bye, so `a` may record that its peer hung up: then `b` says why.
                let why = |f: &Option<UpgradeFailure>| {
                    matches!(f, Some(UpgradeFailure::IceFailed))
                        || (udp_blocked && matches!(f, Some(UpgradeFailure::Timeout)))
                };
                let hung_up =
                    |f: &Option<UpgradeFailure>| matches!(f, Some(UpgradeFailure::PeerHungUp));
                let (fa, fb) = (&sa.last_upgrade_failure, &sb.last_upgrade_failure);
                assert!(why(fa) || (hung_up(fa) && why(fb)), "a {fa:?}, b {fb:?}");
            }
            _ => {
                r.unwrap();
                assert_eq!(sa.upgrades, 1);
                let pair = sa.candidates.expect("a's candidates");
                if homes[0].block_udp {
                    assert!(
                        pair.tcp,
                        "a blocks UDP, yet its end is not over TCP: {pair:?}"
                    );
                }
            }
        }
        let before_a = sa.frames_sent;
        let before_b = sb.frames_received;

        // Numbered events each way, at the same time.
        let t = Instant::now();
        let ca = count(&a, b.id());
        let cb = count(&b, a.id());
        let s1 = send_events(&lab, 0, &a, b.id()).await;
        let s2 = send_events(&lab, 1, &b, a.id()).await;
        s1.await.unwrap();
        s2.await.unwrap();
        let done = wait_until(60, || async {
            ca.next.load(Ordering::SeqCst) >= EVENTS && cb.next.load(Ordering::SeqCst) >= EVENTS
        })
        .await;
        assert!(
            done,
            "a got {}, b got {}",
            ca.next.load(Ordering::SeqCst),
            cb.next.load(Ordering::SeqCst)
        );
        let events_took = t.elapsed();
        for c in [&ca, &cb] {
            assert_eq!(c.next.load(Ordering::SeqCst), EVENTS, "duplicates");
            assert_eq!(c.bad.load(Ordering::SeqCst), 0, "out of order");
        }

        let stream_took = stream_16_mib(&lab, &a, &b).await;

        // The counts match what was sent: b received what a sent (once the last pings
        // are in), but for frames lost on the way and sent again (the relay may drop
        // some under load; frames in flight when the path changed are resent too), at
        // least one per event, and the stream's bytes (the relay adds the sender's id
        // to each frame, so bytes are compared with the stream only).
        let deadline = Instant::now() + Duration::from_secs(10);
        let (sa, sb) = loop {
            let sa = stats(&lab, 0, &a, b.id()).await;
            let sb = stats(&lab, 1, &b, a.id()).await;
            // (b's snapshot is taken after a's: a ping or two may be newer.)
            let settled = sb.frames_received <= sa.frames_sent + 2
                && sa.frames_sent.saturating_sub(sb.frames_received) <= sa.resends + 2;
            if settled || Instant::now() > deadline {
                assert!(settled, "a sent {sa:?}, b received {sb:?}");
                break (sa, sb);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(sa.frames_sent - before_a >= EVENTS, "{sa:?}");
        assert!(sb.frames_received - before_b >= EVENTS, "{sb:?}");
        assert!(sb.bytes_received >= STREAM as u64, "{sb:?}");
        assert_eq!(sa.path, expect, "path changed: {sa:?}");
        eprintln!(
            "{homes:?} on {expect}: {EVENTS} events each way in {events_took:?}, 16 MiB in \
             {stream_took:?}; a sent {} frames / {} bytes, resends {}, rtt {:?}",
            sa.frames_sent, sa.bytes_sent, sa.resends, sa.rtt
        );
    });
}

#[test]
fn both_behind_cone_nats_go_direct() {
    check([Home::cone(), Home::cone()], Path::Direct);
}

// The TURN variants: a symmetric NAT gives a new port per destination, so only a pair with
// a relay candidate on the lab's coturn can work (credentials from the welcome).
#[test]
fn one_symmetric_nat_goes_through_turn() {
    check([Home::symmetric(), Home::cone()], Path::Turn);
}

#[test]
fn both_symmetric_nats_go_through_turn() {
    check([Home::symmetric(), Home::symmetric()], Path::Turn);
}

/// A router that drops all UDP, and a server that hands out TURN over UDP only: no ICE
/// candidate of that home can reach anything, so the pair stays on our Socket.IO relay,
/// which runs over TCP.
#[test]
fn udp_blocked_at_one_router_stays_on_the_relay() {
    check([Home::cone().block_udp(), Home::cone()], Path::Relay);
}

/// The same home, with TURN over TCP handed out too: the home's end goes through coturn
/// over TCP (the peer bridges `turn:...?transport=tcp`, which webrtc-ice cannot use itself).
#[test]
fn udp_blocked_at_one_router_goes_through_turn_over_tcp() {
    let urls = vec![stun_url(), turn_url(), turn_tcp_url()];
    check_with([Home::cone().block_udp(), Home::cone()], Path::Turn, urls);
}

/// The same over TLS (`turns:`), with a certificate the peers trust through
/// `P2pOptions::turn_tls_root`.
#[test]
fn udp_blocked_at_one_router_goes_through_turn_over_tls() {
    let urls = vec![stun_url(), turn_url(), turns_url()];
    check_with([Home::cone().block_udp(), Home::cone()], Path::Turn, urls);
}

#[test]
fn turn_unreachable_stays_on_the_relay() {
    check(
        [
            Home::symmetric().block_turn(),
            Home::symmetric().block_turn(),
        ],
        Path::Relay,
    );
}

/// Allocates on the lab's coturn from host `h` with these credentials.
async fn allocate(lab: &Lab, h: usize, user: String, pass: String) -> Result<(), String> {
    lab.hosts[h]
        .spawn(async move {
            let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            let server = format!("{TURN_IP}:{TURN_PORT}");
            let client = turn::client::Client::new(turn::client::ClientConfig {
                stun_serv_addr: server.clone(),
                turn_serv_addr: server,
                username: user,
                password: pass,
                realm: String::new(),
                software: String::new(),
                rto_in_ms: 0,
                conn: Arc::new(sock),
                vnet: None,
            })
            .await
            .map_err(|e| e.to_string())?;
            client.listen().await.map_err(|e| e.to_string())?;
            let r = client.allocate().await.map(drop).map_err(|e| e.to_string());
            let _ = client.close().await;
            r
        })
        .await
        .unwrap()
}

/// The welcome's TURN credentials let a peer allocate on coturn; once their expiry time
/// has passed, a new allocation with them is refused.
#[test]
fn server_issued_turn_credentials_work_then_expire() {
    let lab = Lab::new(&[Home::cone()], 0, true);
    let ttl = Duration::from_secs(2);
    let url = lab.serve(signaling(ttl));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let welcome = lab.hosts[0]
            .spawn(async move {
                let mut raw = socketio_p2p_tests::Raw::connect_to(&url).await;
                raw.hello(Some("carol"), &["nat"]).await
            })
            .await
            .unwrap();
        let ice = &welcome["ice_servers"][0];
        assert_eq!(ice["urls"], json!([stun_url(), turn_url()]), "{welcome}");
        let user = ice["username"].as_str().unwrap().to_owned();
        let pass = ice["credential"].as_str().unwrap().to_owned();
        let (expiry, who) = user.split_once(':').unwrap();
        assert_eq!(who, "carol");
        let expiry: u64 = expiry.parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            expiry > now && expiry <= now + ttl.as_secs() + 1,
            "{expiry} vs {now}"
        );

        allocate(&lab, 0, user.clone(), pass.clone())
            .await
            .expect("fresh credentials refused");
        // A wrong password is refused too (the check is real).
        assert!(
            allocate(&lab, 0, user.clone(), "wrong".into())
                .await
                .is_err()
        );
        // So is a username whose expiry has long passed.
        let old = format!("{}:carol", now - 60);
        let old_pass = socketio_p2p_signaling::turn_password(TURN_SECRET, &old);
        assert!(allocate(&lab, 0, old, old_pass).await.is_err());

        // Wait until the expiry timestamp has passed (by two seconds: coturn reads its
        // clock about once a second), then try again.
        assert!(
            wait_until(ttl.as_secs() + 5, || async {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                now >= expiry + 2
            })
            .await
        );
        let r = allocate(&lab, 0, user, pass).await;
        assert!(r.is_err(), "expired credentials were accepted");
    });
}

/// A host moves to another home network in the middle of a transfer (its veth is re-plugged
/// into another router: same address, another NAT, other ports). Its data channel dies and
/// its server connection breaks; the relay carries on once it reconnects, nothing is lost or
/// reordered, and the pair is back on a direct path after a fresh negotiation.
#[test]
fn a_host_moving_to_another_network_comes_back_direct() {
    let mut lab = Lab::new(&[Home::cone(), Home::cone()], 1, true);
    let sig = signaling(Duration::from_secs(600));
    let url = lab.serve(sig.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dc_timeout = Duration::from_secs(1);
    let o = || {
        opts()
            .upgrade_timeout(Duration::from_secs(3))
            .auto_upgrade(true)
            .dc_timeout(dc_timeout)
            .retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
    };
    let (a, b) = rt.block_on(async {
        let a = connect(&lab, 0, &url, o()).await;
        let b = connect(&lab, 1, &url, o()).await;
        (a, b)
    });
    let on_path = |lab: &Lab, a: &P2p, b: &P2p| {
        let (a, b) = (a.clone(), b.clone());
        let h = lab.hosts[0].spawn(async move {
            let s = a.stats(b.id()).await.ok()?;
            Some((s.path, s.candidates))
        });
        async move { h.await.ok().flatten() }
    };
    rt.block_on(async {
        let t = Instant::now();
        assert!(
            wait_until(15, || async {
                matches!(on_path(&lab, &a, &b).await, Some((Path::Direct, Some(_))))
            })
            .await,
            "never direct: {:?}",
            on_path(&lab, &a, &b).await
        );
        eprintln!("direct after {:?}", t.elapsed());
    });
    // Events from the host that moves (the other way, the server would queue the
    // relayed events for the vanished connection and be slow to notice that it is gone).
    let cb = count(&b, a.id());
    let s1 = rt.block_on(send_events(&lab, 0, &a, b.id()));
    // Mid-stream: once some events are through, move host 0 to router 3.
    rt.block_on(async {
        assert!(
            wait_until(20, || async {
                cb.next.load(Ordering::SeqCst) > EVENTS / 10
            })
            .await
        );
    });
    // The move takes the host off the network until the server has noticed that its
    // connection is gone (its Engine.IO pings go unanswered): then the peer takes its id
    // back when it reconnects. (Back sooner, it would find its old connection still
    // holding the id and come back as a new peer.)
    let moved = Instant::now();
    lab.unplug_host(0);
    rt.block_on(async {
        assert!(wait_until(20, || async { sig.stats().away == 1 }).await);
    });
    lab.replug_host(0, 2);
    eprintln!("replugged {:?} after the move", moved.elapsed());
    rt.block_on(async {
        s1.await.unwrap();
        let done = wait_until(60, || async { cb.next.load(Ordering::SeqCst) >= EVENTS }).await;
        assert!(done, "b got {}", cb.next.load(Ordering::SeqCst));
        assert_eq!(cb.next.load(Ordering::SeqCst), EVENTS, "duplicates");
        assert_eq!(cb.bad.load(Ordering::SeqCst), 0, "out of order");
        eprintln!("all events through {:?} after the move", moved.elapsed());
        let back = Instant::now();
        // Back on a direct path, through the new router.
        assert!(
            wait_until(30, || async {
                matches!(on_path(&lab, &a, &b).await, Some((Path::Direct, Some(_))))
            })
            .await,
            "not direct again: {:?}",
            on_path(&lab, &a, &b).await
        );
        let sa = stats(&lab, 0, &a, b.id()).await;
        eprintln!(
            "direct again {:?} after the move, {:?} after the events: {sa:?}",
            moved.elapsed(),
            back.elapsed()
        );
        assert!(sa.upgrades >= 2, "{sa:?}");
    });
}
