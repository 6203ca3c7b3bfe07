//! Byte streams between peers: open/accept/refuse, both transports, independence of
//! streams, backpressure with a slow reader, half-close, reset, peer loss and transport
//! switches in the middle of a transfer.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socketio_p2p::{Error, P2p, P2pStream, Transport};
use socketio_p2p_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two peers in a room of their own.
async fn two(s: &Server, opts: socketio_p2p::P2pOptions) -> (P2p, P2p) {
    static ROOM: AtomicU64 = AtomicU64::new(0);
    let room = format!("s{}", ROOM.fetch_add(1, Ordering::Relaxed));
    let a = peer(s, opts.clone().room(&room)).await;
    let b = peer(s, opts.room(&room)).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    (a, b)
}

async fn upgraded(s: &Server) -> (P2p, P2p) {
    let (a, b) = two(s, rtc_opts()).await;
    a.upgrade_peer(b.id()).await.unwrap();
    assert!(
        wait_until(15, || async {
            b.transport(a.id()).await.ok() == Some(Transport::DataChannel)
        })
        .await
    );
    (a, b)
}

/// Opens a stream from `a` to `b`, accepted by `b`.
async fn open(a: &P2p, b: &P2p, name: &str) -> (P2pStream, P2pStream) {
    let b2 = b.clone();
    let acc = tokio::spawn(async move {
        let inc = tokio::time::timeout(Duration::from_secs(10), b2.accept_stream())
            .await
            .expect("no incoming stream")
            .expect("closed");
        inc.accept().unwrap()
    });
    let sa = a.open_stream(b.id(), name).await.unwrap();
    let sb = acc.await.unwrap();
    assert_eq!(sb.name(), name);
    assert_eq!(sb.peer(), a.id());
    assert_eq!(sa.peer(), b.id());
    (sa, sb)
}

/// Deterministic bytes, so the reader checks every byte without keeping a copy.
struct Gen(u64);
impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

async fn write_pattern(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    seed: u64,
    total: usize,
    written: Arc<AtomicU64>,
) -> io::Result<()> {
    let mut g = Gen(seed);
    let mut buf = vec![0u8; 40_000];
    let mut left = total;
    let mut i = 0usize;
    while left > 0 {
        // Odd sizes, so chunks never line up with frames.
        let n = left.min(1 + (i * 7919) % buf.len());
        g.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        written.fetch_add(n as u64, Ordering::Relaxed);
        left -= n;
        i += 1;
    }
    w.shutdown().await
}

/// Reads to the end, checking every byte; `pause` is called after each read (slow readers).
async fn read_pattern<F, Fut>(
    mut r: impl tokio::io::AsyncRead + Unpin,
    seed: u64,
    read: Arc<AtomicU64>,
    mut pause: F,
) -> io::Result<u64>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut g = Gen(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        g.fill(&mut want[..n]);
        assert!(buf[..n] == want[..n], "corrupted bytes at offset {total}");
        total += n as u64;
        read.store(total, Ordering::Relaxed);
        pause(total).await;
    }
}

fn counter() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(0))
}

async fn no_pause(_: u64) {}

async fn both_ways(a: &P2p, b: &P2p, size: usize) {
    let (sa, sb) = open(a, b, "both").await;
    let (ra, wa) = tokio::io::split(sa);
    let (rb, wb) = tokio::io::split(sb);
    let w1 = tokio::spawn(write_pattern(wa, 1, size, counter()));
    let w2 = tokio::spawn(write_pattern(wb, 2, size, counter()));
    let r1 = tokio::spawn(read_pattern(rb, 1, counter(), no_pause));
    let r2 = tokio::spawn(read_pattern(ra, 2, counter(), no_pause));
    w1.await.unwrap().unwrap();
    w2.await.unwrap().unwrap();
    assert_eq!(r1.await.unwrap().unwrap(), size as u64);
    assert_eq!(r2.await.unwrap().unwrap(), size as u64);
}

async fn streams_freed(p: &P2p) {
    assert!(
        wait_until(10, || async { p.stream_count().await.ok() == Some(0) }).await,
        "{} kept stream state",
        p.id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_directions_over_the_relay() {
    let s = spawn_server().await;
    let (a, b) = two(&s, relay_opts()).await;
    both_ways(&a, &b, 8 * 1024 * 1024 + 3).await;
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::Relay);
    streams_freed(&a).await;
    streams_freed(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_directions_over_a_data_channel() {
    let s = spawn_server().await;
    let (a, b) = upgraded(&s).await;
    both_ways(&a, &b, 8 * 1024 * 1024 + 3).await;
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::DataChannel);
    streams_freed(&a).await;
    streams_freed(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_unknown_and_unanswered_streams() {
    let s = spawn_server().await;
    for dc in [false, true] {
        let opts = rtc_opts().request_timeout(Duration::from_millis(1500));
        let (a, b) = two(&s, opts).await;
        if dc {
            a.upgrade_peer(b.id()).await.unwrap();
        }
        refusals(&a, &b).await;
    }
}

async fn refusals(a: &P2p, b: &P2p) {
    let b2 = b.clone();
    let t = tokio::spawn(async move {
        let inc = b2.accept_stream().await.unwrap();
        assert_eq!(inc.name(), "secret");
        inc.refuse("not today");
        // Dropping an incoming stream refuses it too.
        let inc = b2.accept_stream().await.unwrap();
        drop(inc);
    });
    match a.open_stream(b.id(), "secret").await {
        Err(Error::StreamRefused { code, message }) => {
            assert_eq!(code, "Refused");
            assert_eq!(message, "not today");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        a.open_stream(b.id(), "other").await,
        Err(Error::StreamRefused { .. })
    ));
    t.await.unwrap();
    // Nobody accepts: the opener times out, and the late stream is gone on both sides.
    match a.open_stream(b.id(), "late").await {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let late = b.accept_stream().await.unwrap();
    let mut late = late.accept().unwrap();
    let mut buf = [0u8; 4];
    assert!(
        late.read(&mut buf).await.is_err(),
        "a timed-out stream reads"
    );
    drop(late);
    assert!(matches!(
        a.open_stream("no-such-peer", "x").await,
        Err(Error::PeerOffline(_))
    ));
    streams_freed(a).await;
    streams_freed(b).await;
    // Everything else still works.
    both_ways(a, b, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_stream_never_blocks_another_or_the_events() {
    let s = spawn_server().await;
    let opts = relay_opts().stream_window(64 * 1024);
    let (a, b) = two(&s, opts).await;
    let (mut stalled_w, mut stalled_r) = open(&a, &b, "stalled").await;
    let written = counter();
    let w = written.clone();
    // Nobody reads "stalled": its writer must stop after one window.
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        loop {
            if stalled_w.write_all(&chunk).await.is_err() {
                return stalled_w;
            }
            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if w.load(Ordering::Relaxed) > 4 * 1024 * 1024 {
                return stalled_w;
            }
        }
    });
    assert!(
        wait_until(10, || async {
            written.load(Ordering::Relaxed) >= 64 * 1024
        })
        .await
    );
    // Another stream carries 4 MiB meanwhile, and events flow.
    both_ways(&a, &b, 4 * 1024 * 1024).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    b.on("ping", move |_| {
        let _ = tx.send(());
    });
    a.emit("ping", ()).await.unwrap();
    recv(&mut rx, 10).await;
    assert!(
        written.load(Ordering::Relaxed) <= 64 * 1024 + 16 * 1024,
        "the stalled writer ran past its window: {}",
        written.load(Ordering::Relaxed)
    );
    assert_eq!(stalled_r.buffered(), 64 * 1024);
    // Reading releases the writer.
    let mut sink = vec![0u8; 1024 * 1024];
    let mut got = 0;
    while got < 1024 * 1024 {
        got += stalled_r.read(&mut sink).await.unwrap();
    }
    assert!(
        wait_until(10, || async {
            written.load(Ordering::Relaxed) >= 1024 * 1024
        })
        .await
    );
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_reader_bounds_memory_over_the_relay() {
    let s = spawn_server().await;
    let window = 256 * 1024;
    let (a, b) = two(&s, relay_opts().stream_window(window)).await;
    let (sa, sb) = open(&a, &b, "slow").await;
    let size = 16 * 1024 * 1024;
    let written = counter();
    let read = counter();
    let w = tokio::spawn(write_pattern(sa, 9, size, written.clone()));
    let (wr, rd) = (written.clone(), read.clone());
    let mut peak = 0u64;
    let r = read_pattern(sb, 9, read.clone(), move |total| {
        let ahead = wr
            .load(Ordering::Relaxed)
            .saturating_sub(rd.load(Ordering::Relaxed));
        peak = peak.max(ahead);
        assert!(
            ahead <= window as u64 + 64 * 1024,
            "the writer is {ahead} bytes ahead of the reader (window {window})"
        );
        async move {
            // About 1 ms per 64 KiB read: slower than the relay.
            if total % (256 * 1024) < 65536 {
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(r, size as u64);
    w.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_close_each_way() {
    let s = spawn_server().await;
    for dc in [false, true] {
        let (a, b) = pair_on(&s, dc).await;
        half_close(&a, &b).await;
    }
}

/// Two peers on the relay, or on a data channel.
async fn pair_on(s: &Server, dc: bool) -> (P2p, P2p) {
    if dc {
        upgraded(s).await
    } else {
        two(s, relay_opts()).await
    }
}

async fn half_close(a: &P2p, b: &P2p) {
    let (mut sa, mut sb) = open(a, b, "half").await;
    sa.write_all(b"question").await.unwrap();
    sa.shutdown().await.unwrap();
    let err = sa.write_all(b"more").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    let mut got = Vec::new();
    sb.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"question");
    // b may still answer after a closed its side.
    sb.write_all(b"answer").await.unwrap();
    sb.shutdown().await.unwrap();
    let mut got = Vec::new();
    sa.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");
    drop(sa);
    drop(sb);
    streams_freed(a).await;
    streams_freed(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_stream_resets_it_on_the_other_side() {
    let s = spawn_server().await;
    for dc in [false, true] {
        let (a, b) = pair_on(&s, dc).await;
        dropped(&a, &b).await;
    }
}

async fn dropped(a: &P2p, b: &P2p) {
    let (mut sa, mut sb) = open(a, b, "drop").await;
    sa.write_all(b"partial").await.unwrap();
    drop(sa);
    let mut got = Vec::new();
    let err = sb.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(got, b"partial", "bytes sent before the reset are delivered");
    assert!(sb.write_all(b"x").await.is_err());
    drop(sb);
    streams_freed(a).await;
    streams_freed(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnecting_peer_ends_its_streams_with_an_error() {
    let s = spawn_server().await;
    let (a, b) = upgraded(&s).await;
    let (sa, sb) = open(&a, &b, "gone").await;
    let (sa2, _sb2) = open(&a, &b, "gone-too").await;
    let (mut ra, mut wa) = tokio::io::split(sa);
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 32 * 1024];
        loop {
            if let Err(e) = wa.write_all(&chunk).await {
                return e;
            }
        }
    });
    b.close().await;
    drop(sb);
    let e = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer never failed")
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    let mut buf = [0u8; 8];
    let e = ra.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    let mut sa2 = sa2;
    assert!(sa2.read(&mut buf).await.is_err());
    streams_freed(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_stay_intact_across_transport_switches() {
    let s = spawn_server().await;
    let (a, b) = two(&s, rtc_opts()).await;
    let (sa, sb) = open(&a, &b, "switch").await;
    let size = 24 * 1024 * 1024;
    let read = counter();
    let w = tokio::spawn(write_pattern(sa, 5, size, counter()));
    let r = tokio::spawn(read_pattern(sb, 5, read.clone(), no_pause));
    // Upgrade a third of the way in, kill the channel at two thirds.
    assert!(
        wait_until(60, || async {
            read.load(Ordering::Relaxed) > size as u64 / 3
        })
        .await
    );
    a.upgrade_peer(b.id()).await.unwrap();
    assert!(
        wait_until(60, || async {
            read.load(Ordering::Relaxed) > 2 * size as u64 / 3
        })
        .await
    );
    a.kill_data_channel(b.id()).unwrap();
    w.await.unwrap().unwrap();
    assert_eq!(r.await.unwrap().unwrap(), size as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_right_after_writing_still_delivers_everything() {
    let s = spawn_server().await;
    for upgrade in [false, true] {
        let (a, b) = if upgrade {
            upgraded(&s).await
        } else {
            two(&s, relay_opts()).await
        };
        let (sa, sb) = open(&a, &b, "linger").await;
        let size = 4 * 1024 * 1024;
        let reader = tokio::spawn(read_pattern(sb, 11, counter(), no_pause));
        write_pattern(sa, 11, size, counter()).await.unwrap();
        // The writer closes at once (and drops everything): what is queued (up to a
        // window) still arrives.
        a.close().await;
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the reader never finished")
            .unwrap()
            .unwrap();
        assert_eq!(got, size as u64);
        b.close().await;
    }
}
