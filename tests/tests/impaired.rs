//! The impaired network really delays (UDP and TCP round trips of 50 ms) and drops about 1 %
//! of the packets that cross it. Needs root (network namespaces) and /dev/net/tun.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socketio_p2p_tests::impair::ImpairedNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DELAY: Duration = Duration::from_millis(25);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn udp_round_trips_take_50ms_and_about_1_percent_is_lost() {
    const PROBES: usize = 3000;
    let net = ImpairedNet::new(2, DELAY, 1.0).expect("impaired net");
    let server = SocketAddr::from((net.ends[1].addr, 7000));
    let arrived = Arc::new(AtomicUsize::new(0));
    let got = arrived.clone();
    // An echo server in end 1 that counts what reached it.
    let sock = net.ends[1]
        .run(tokio::net::UdpSocket::bind(server))
        .unwrap();
    let echo = net.ends[1].rt.spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            got.fetch_add(1, Ordering::Relaxed);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    // A client in end 0: one probe per millisecond, each carrying its number.
    let rtts = net.ends[0].run(async move {
        let sock = Arc::new(tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap());
        sock.connect(server).await.unwrap();
        let t0 = Instant::now();
        let sent: Arc<Vec<std::sync::OnceLock<Instant>>> =
            Arc::new((0..PROBES).map(|_| std::sync::OnceLock::new()).collect());
        let (s, times) = (sock.clone(), sent.clone());
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for i in 0..PROBES {
                tick.tick().await;
                let _ = times[i].set(Instant::now());
                s.send(&(i as u64).to_be_bytes()).await.unwrap();
            }
        });
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        let until = t0 + Duration::from_secs(30);
        loop {
            let wait = if sender.is_finished() {
                Duration::from_millis(500)
            } else {
                until.saturating_duration_since(Instant::now())
            };
            match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
                Ok(Ok(8)) => {
                    let i = u64::from_be_bytes(buf[..8].try_into().unwrap()) as usize;
                    let at = sent[i].get().expect("echo of a probe never sent");
                    rtts.push(at.elapsed().as_secs_f64() * 1e3);
                }
                Ok(other) => panic!("unexpected receive: {other:?}"),
                Err(_) if sender.is_finished() => break,
                Err(_) => panic!("no echo for 30 s"),
            }
        }
        rtts
    });
    echo.abort();
    let reached = arrived.load(Ordering::Relaxed);
    let one_way_loss = 100.0 * (PROBES - reached) as f64 / PROBES as f64;
    let round_trip_loss = 100.0 * (PROBES - rtts.len()) as f64 / PROBES as f64;
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let p50 = median(rtts.clone());
    eprintln!(
        "udp: {} probes, one-way loss {one_way_loss:.2} %, round-trip loss {round_trip_loss:.2} %, rtt min {min:.2} ms p50 {p50:.2} ms, forwarded {} packets",
        PROBES,
        net.stats.packets.load(Ordering::Relaxed)
    );
    assert!(
        min >= 50.0,
        "a round trip took {min:.2} ms: less than 2 × 25 ms"
    );
    assert!(p50 < 80.0, "median round trip {p50:.2} ms");
    // 30 expected out of 3000 (sd 5.4): 12 to 60 is far outside chance.
    assert!(
        (0.4..=2.0).contains(&one_way_loss),
        "one-way loss {one_way_loss:.2} %, expected about 1 %"
    );
    assert!(
        (1.0..=4.0).contains(&round_trip_loss),
        "round-trip loss {round_trip_loss:.2} %, expected about 2 %"
    );
    assert!(net.stats.packets.load(Ordering::Relaxed) >= (reached + rtts.len()) as u64);
}

#[test]
fn tcp_is_delayed_too_and_gets_through_without_loss() {
    let net = ImpairedNet::new(2, DELAY, 0.0).expect("impaired net");
    let server = SocketAddr::from((net.ends[1].addr, 7001));
    let listener = net.ends[1]
        .run(tokio::net::TcpListener::bind(server))
        .unwrap();
    let echo = net.ends[1].rt.spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            tcp.write_all(&buf[..n]).await.unwrap();
        }
    });
    let (connect_ms, rtts, bulk_ok) = net.ends[0].run(async move {
        let t = Instant::now();
        let mut tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(server),
        )
        .await
        .expect("connect timed out")
        .unwrap();
        let connect_ms = t.elapsed().as_secs_f64() * 1e3;
        tcp.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        let mut byte = [0u8; 1];
        for i in 0..20u8 {
            let t = Instant::now();
            tcp.write_all(&[i]).await.unwrap();
            tcp.read_exact(&mut byte).await.unwrap();
            assert_eq!(byte[0], i);
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // 1 MiB there and back, intact.
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (mut rd, mut wr) = tcp.into_split();
        let out = data.clone();
        let w = tokio::spawn(async move { wr.write_all(&out).await });
        let mut back = vec![0u8; data.len()];
        tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut back))
            .await
            .expect("bulk echo timed out")
            .unwrap();
        w.await.unwrap().unwrap();
        (connect_ms, rtts, back == data)
    });
    echo.abort();
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let p50 = median(rtts);
    eprintln!("tcp: connect {connect_ms:.2} ms, rtt min {min:.2} ms p50 {p50:.2} ms");
    assert!(
        connect_ms >= 50.0,
        "the handshake took {connect_ms:.2} ms: not delayed"
    );
    assert!(min >= 50.0, "a round trip took {min:.2} ms");
    assert!(p50 < 80.0, "median round trip {p50:.2} ms");
    assert!(bulk_ok, "the bulk echo came back altered");
}
