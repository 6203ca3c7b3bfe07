//! File transfer over a peer-to-peer byte stream, with a progress bar on both ends and a
//! SHA-256 checksum checked by both sides at the end.
//!
//! ```text
//! cargo run -p socketio-p2p-examples --example file_transfer -- demo
//! cargo run -p socketio-p2p-examples --example file_transfer -- serve 127.0.0.1:3040
//! cargo run -p socketio-p2p-examples --example file_transfer -- receive http://127.0.0.1:3040 bob ./inbox
//! cargo run -p socketio-p2p-examples --example file_transfer -- send http://127.0.0.1:3040 photo.jpg bob
//! ```
//!
//! `demo` runs a server, a receiver and a sender in one process on a 24 MiB file and
//! exits. The sender finds the receiver by its name (a uid), upgrades to a WebRTC data
//! channel (loopback candidates only; the relay is used if that fails) and streams:
//! 8 bytes of size, the file, its SHA-256. The receiver answers with its own SHA-256.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use socketio_p2p::{IncomingStream, P2p, P2pOptions};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ROOM: &str = "files";
const CHUNK: usize = 64 * 1024;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bars = MultiProgress::new();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let addr = args.get(1).map(String::as_str).unwrap_or("127.0.0.1:3040");
            let (url, server) = serve(addr).await?;
            println!("file server on {url}");
            server.await?;
            Ok(())
        }
        Some("receive") if args.len() >= 3 => {
            let dir = PathBuf::from(args.get(3).map(String::as_str).unwrap_or("."));
            let p2p = P2p::connect(&args[1], opts().uid(args[2].as_str())).await?;
            println!("receiving as {:?} into {}", args[2], dir.display());
            while let Some(incoming) = p2p.accept_stream().await {
                let (dir, bars) = (dir.clone(), bars.clone());
                tokio::spawn(async move {
                    if let Err(e) = receive(incoming, &dir, &bars).await {
                        eprintln!("receive failed: {e}");
                    }
                });
            }
            Ok(())
        }
        Some("send") if args.len() >= 4 => {
            let p2p = P2p::connect(&args[1], opts()).await?;
            send(&p2p, Path::new(&args[2]), &args[3], &bars).await
        }
        Some("demo") => demo(&bars).await,
        _ => {
            eprintln!(
                "usage: file_transfer demo\n       file_transfer serve [ADDR]\n       \
                 file_transfer receive URL NAME [DIR]\n       file_transfer send URL FILE NAME"
            );
            Ok(())
        }
    }
}

/// Loopback candidates only, no STUN: safe on any machine. Upgrades are explicit.
fn opts() -> P2pOptions {
    P2pOptions::default()
        .room(ROOM)
        .loopback_only()
        .auto_upgrade(false)
}

async fn serve(addr: &str) -> Result<(String, tokio::task::JoinHandle<()>), BoxError> {
    let (layer, io) = socketioxide::SocketIo::builder()
        .max_buffer_size(4096)
        .build_layer();
    P2pSignaling::new(SignalingOptions::default()).attach(&io);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, axum::Router::new().layer(layer)).await;
    });
    Ok((url, task))
}

fn bar(bars: &MultiProgress, len: u64, label: String) -> ProgressBar {
    let pb = bars.add(ProgressBar::new(len));
    let style = ProgressStyle::with_template(
        "{msg:<28} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(label);
    pb
}

/// Sends `file` to the peer whose uid is `to`.
async fn send(p2p: &P2p, file: &Path, to: &str, bars: &MultiProgress) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = loop {
        let peers = p2p.room_peers(ROOM).await?;
        if let Some(p) = peers.into_iter().find(|p| p.uid.as_deref() == Some(to)) {
            break p;
        }
        if Instant::now() > deadline {
            return Err(format!("no receiver named {to:?} in room {ROOM:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Err(e) = p2p.upgrade_peer(&target.id).await {
        println!("WebRTC upgrade failed ({e}); sending over the relay");
    }
    let transport = p2p.transport(&target.id).await?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut f = tokio::fs::File::open(file).await?;
    let size = f.metadata().await?.len();
    let mut stream = p2p.open_stream(&target.id, &name).await?;
    let pb = bar(bars, size, format!("send {name} via {transport}"));
    let started = Instant::now();
    stream.write_all(&size.to_be_bytes()).await?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < size {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Err("the file shrank while it was being sent".into());
        }
        hash.update(&buf[..n]);
        stream.write_all(&buf[..n]).await?;
        sent += n as u64;
        pb.set_position(sent);
    }
    let digest = hash.finalize();
    stream.write_all(&digest).await?;
    stream.shutdown().await?;
    let mut answer = [0u8; 33];
    stream.read_exact(&mut answer).await?;
    pb.finish();
    let ok = answer[0] == 1 && answer[1..] == digest[..];
    let secs = started.elapsed().as_secs_f64();
    // Printed around the bars, so that they are not torn.
    bars.suspend(|| {
        println!(
            "sent {name}: {size} bytes in {secs:.2} s ({:.1} MB/s) via {transport}; sha256 {} {}",
            size as f64 / secs / 1e6,
            hex(&digest),
            if ok {
                "verified by the receiver"
            } else {
                "MISMATCH"
            }
        )
    });
    if ok {
        Ok(())
    } else {
        Err("the receiver's checksum does not match".into())
    }
}

/// Receives one file into `dir`; returns where it was saved.
async fn receive(
    incoming: IncomingStream,
    dir: &Path,
    bars: &MultiProgress,
) -> Result<PathBuf, BoxError> {
    // Only the last path component, never `..` or an absolute path.
    let name = Path::new(incoming.name())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "..")
        .unwrap_or_else(|| "received".into());
    let mut path = dir.join(&name);
    let mut i = 1;
    while tokio::fs::try_exists(&path).await? {
        path = dir.join(format!("{name}.{i}"));
        i += 1;
    }
    let mut stream = incoming.accept()?;
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).await?;
    let size = u64::from_be_bytes(head);
    let pb = bar(bars, size, format!("recv {name}"));
    let mut f = tokio::fs::File::create(&path).await?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < size {
        let want = (size - got).min(CHUNK as u64) as usize;
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(format!("the sender stopped after {got} of {size} bytes").into());
        }
        hash.update(&buf[..n]);
        f.write_all(&buf[..n]).await?;
        got += n as u64;
        pb.set_position(got);
    }
    f.flush().await?;
    let mut theirs = [0u8; 32];
    stream.read_exact(&mut theirs).await?;
    let ours = hash.finalize();
    let ok = ours[..] == theirs[..];
    let mut answer = vec![u8::from(ok)];
    answer.extend_from_slice(&ours);
    stream.write_all(&answer).await?;
    stream.shutdown().await?;
    pb.finish();
    bars.suspend(|| {
        println!(
            "received {name} -> {}: {size} bytes, sha256 {} {}",
            path.display(),
            hex(&ours),
            if ok { "verified" } else { "MISMATCH" }
        )
    });
    if ok {
        Ok(path)
    } else {
        Err("checksum mismatch".into())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Server, receiver and sender in one process, on a 24 MiB file of pseudo-random bytes.
async fn demo(bars: &MultiProgress) -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("p2p-file-demo-{}", std::process::id()));
    let inbox = dir.join("inbox");
    tokio::fs::create_dir_all(&inbox).await?;
    let file = dir.join("demo.bin");
    let mut data = vec![0u8; 24 * 1024 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    tokio::fs::write(&file, &data).await?;

    let (url, _server) = serve("127.0.0.1:0").await?;
    println!("server on {url}");
    let receiver = P2p::connect(&url, opts().uid("bob")).await?;
    let sender = P2p::connect(&url, opts().uid("alice")).await?;
    let rbars = bars.clone();
    let got = tokio::spawn(async move {
        match receiver.accept_stream().await {
            Some(incoming) => receive(incoming, &inbox, &rbars).await,
            None => Err("the receiver closed".into()),
        }
    });
    send(&sender, &file, "bob", bars).await?;
    let saved = got.await??;
    let same = tokio::fs::read(&saved).await? == data;
    println!(
        "{} and {} are {}",
        file.display(),
        saved.display(),
        if same { "identical" } else { "DIFFERENT" }
    );
    sender.close().await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    if same {
        Ok(())
    } else {
        Err("the received file differs".into())
    }
}
