//! A 256 MiB stream to a receiver that reads slowly, over a data channel: the writer never
//! gets more than one window ahead of the reader, and the process (server, both peers and
//! their WebRTC stacks, all in this test binary) never holds the transfer in memory.
//! Alone in its binary so that the peak memory it reads is its own.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socketio_p2p::Transport;
use socketio_p2p_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_256_mib_stream_to_a_slow_reader_stays_bounded() {
    let s = spawn_server().await;
    let window = 1024 * 1024;
    let opts = rtc_opts().stream_window(window).room("bulk");
    let a = peer(&s, opts.clone()).await;
    let b = peer(&s, opts).await;
    wait_peers(&a, 1).await;
    a.upgrade_peer(b.id()).await.unwrap();
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::DataChannel);
    let b2 = b.clone();
    let acc = tokio::spawn(async move { b2.accept_stream().await.unwrap().accept().unwrap() });
    let mut sa = a.open_stream(b.id(), "bulk").await.unwrap();
    let mut sb = acc.await.unwrap();

    let size: u64 = 256 * 1024 * 1024;
    let base = peak_rss();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < size {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((sent + i as u64) % 251) as u8;
            }
            sa.write_all(&buf).await.unwrap();
            sent += buf.len() as u64;
            w.store(sent, Ordering::Relaxed);
        }
        sa.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut max_ahead = 0u64;
    let mut next_stall = 16 * 1024 * 1024;
    loop {
        let n = sb.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                ((got + i as u64) % 251) as u8,
                "corrupt at {}",
                got + i as u64
            );
        }
        got += n as u64;
        let ahead = written.load(Ordering::Relaxed).saturating_sub(got);
        max_ahead = max_ahead.max(ahead);
        assert!(
            ahead <= window as u64 + 64 * 1024,
            "the writer ran {ahead} bytes ahead of the reader (window {window})"
        );
        if got >= next_stall {
            // The slow part: the reader stops for a while, the writer must stop too.
            next_stall += 32 * 1024 * 1024;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let ahead = written.load(Ordering::Relaxed).saturating_sub(got);
            assert!(
                ahead <= window as u64 + 64 * 1024,
                "writer ahead by {ahead} during a stall"
            );
        }
    }
    writer.await.unwrap();
    assert_eq!(got, size);
    let grew = peak_rss().saturating_sub(base);
    eprintln!(
        "256 MiB in {:?}; writer at most {} KiB ahead; peak memory grew by {} MiB",
        started.elapsed(),
        max_ahead / 1024,
        grew / (1024 * 1024)
    );
    assert!(
        grew < 64 * 1024 * 1024,
        "peak memory grew by {} MiB during a 256 MiB transfer",
        grew / (1024 * 1024)
    );
}
