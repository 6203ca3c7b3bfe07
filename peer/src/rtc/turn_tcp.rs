//! TURN over TCP and TLS for an ICE agent that speaks TURN over UDP only.
//!
//! webrtc-ice 0.17 gathers relay candidates from `turn:` URLs with `transport=udp` only
//! (TCP and TLS are a TODO there), yet TURN over TCP is what gets through networks that
//! block UDP (and TLS on 443, what gets through proxies that let only HTTPS out). For each
//! `turn:host:port?transport=tcp` or `turns:host:port` URL, the peer connection gets a
//! [`TcpTurnBridge`] instead: a UDP socket on 127.0.0.1 that the agent's TURN client is
//! pointed at (`turn:127.0.0.1:<port>?transport=udp`), and one TCP connection to the real
//! server that carries the same TURN messages, framed as RFC 8656 section 12.6 says for
//! stream transports (STUN messages as they are, ChannelData padded to 4 bytes). The
//! allocation belongs to that TCP connection, as TURN over TCP wants; what it relays to the
//! other peer is still UDP, from the server's relay address.
//!
//! STUN Binding requests are not bridged: the agent sends one to every ICE server for its
//! server-reflexive address, and over TCP the answer would be the TCP connection's
//! address, which no UDP packet could reach.
//!
//! Each local socket that writes to the bridge gets its own TCP connection (the agent's
//! TURN client, and the STUN binding requests it sends to the same server), up to
//! [`MAX_CLIENTS`]. A connection ends when the server closes it or sends something that is
//! not TURN; all of them end when the bridge is dropped.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::lock;

/// How long connecting to the TURN server may take before the bridge gives up (the
/// agent's TURN client then times out as if the server were unreachable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TURN message: a 20-byte STUN header or 4-byte ChannelData header plus a
/// 16-bit length.
const MAX_MESSAGE: usize = 20 + u16::MAX as usize;
/// Local sockets one bridge serves (the agent's TURN client, and its STUN binding
/// requests to the same server from each gathering socket).
const MAX_CLIENTS: usize = 16;
/// Datagrams waiting for one TCP connection.
const QUEUE: usize = 256;

/// A local UDP ↔ TCP bridge to one TURN server (see the module docs). Dropping it closes
/// both sockets.
#[derive(Debug)]
pub(crate) struct TcpTurnBridge {
    local: SocketAddr,
    /// Ports of the local sockets it carries to the server.
    served: Arc<StdMutex<Vec<u16>>>,
    task: JoinHandle<()>,
}

impl Drop for TcpTurnBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpTurnBridge {
    /// Binds the local UDP socket; the TCP connection to `server` (`host:port`) is made
    /// when the TURN client first writes. With `tls` (the server's name), the connection
    /// is TLS, checked against the system's roots and `roots` (PEM).
    pub(crate) async fn start(
        server: String,
        tls: Option<String>,
        roots: &[Vec<u8>],
    ) -> io::Result<Self> {
        let tls = match tls {
            Some(domain) => Some(Tls {
                connector: tls_connector(roots)?,
                domain,
            }),
            None => None,
        };
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local = udp.local_addr()?;
        let served = Arc::new(StdMutex::new(Vec::new()));
        let s = Arc::clone(&served);
        let task = tokio::spawn(async move {
            if let Err(e) = run(udp, &server, tls, &s).await {
                tracing::debug!(%server, error = %e, "TURN/TCP bridge ended");
            }
        });
        Ok(Self {
            local,
            served,
            task,
        })
    }

    /// Whether the local socket on `port` reaches its TURN server through this bridge (a
    /// relay candidate's related port is its TURN client's socket).
    pub(crate) fn serves(&self, port: u16) -> bool {
        lock(&self.served).contains(&port)
    }

    /// Where the TURN client should send (127.0.0.1 and the bridge's port).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// What a `turns:` connection needs.
#[derive(Clone)]
struct Tls {
    connector: tokio_native_tls::TlsConnector,
    /// The name the server's certificate must carry.
    domain: String,
}

fn tls_connector(roots: &[Vec<u8>]) -> io::Result<tokio_native_tls::TlsConnector> {
    let mut b = native_tls::TlsConnector::builder();
    for pem in roots {
        b.add_root_certificate(native_tls::Certificate::from_pem(pem).map_err(io::Error::other)?);
    }
    Ok(b.build().map_err(io::Error::other)?.into())
}

async fn run(
    udp: UdpSocket,
    server: &str,
    tls: Option<Tls>,
    served: &StdMutex<Vec<u16>>,
) -> io::Result<()> {
    let udp = Arc::new(udp);
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut datagram = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = udp.recv_from(&mut datagram).await?;
        if is_binding_request(&datagram[..n]) {
            // The agent asks every ICE server for its reflexive address; over TCP the
            // answer would be the TCP connection's address, a candidate no UDP can use.
            continue;
        }
        clients.retain(|_, tx| !tx.is_closed());
        let tx = match clients.get(&from) {
            Some(tx) => tx.clone(),
            None if clients.len() >= MAX_CLIENTS => {
                tracing::debug!(%from, "TURN/TCP bridge: too many local sockets, datagram dropped");
                continue;
            }
            None => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let conn = connection(Arc::clone(&udp), from, server.to_owned(), tls.clone(), rx);
                tokio::spawn(conn);
                clients.insert(from, tx.clone());
                lock(served).push(from.port());
                tx
            }
        };
        // A full queue means the TCP connection is not keeping up: drop, as UDP would.
        let _ = tx.try_send(to_stream(&datagram[..n]));
    }
}

/// One local socket's TCP (or TLS) connection to the server: what the socket sends goes
/// on the stream; what the server sends comes back to it as datagrams.
async fn connection(
    udp: Arc<UdpSocket>,
    client: SocketAddr,
    server: String,
    tls: Option<Tls>,
    rx: mpsc::Receiver<Vec<u8>>,
) {
    let run = async {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&server))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connecting to the TURN server")
            })??;
        tcp.set_nodelay(true)?;
        tracing::debug!(%server, %client, tls = tls.is_some(), "TURN/TCP bridge connected");
        match tls {
            None => pump(tcp, &udp, client, rx).await,
            Some(t) => {
                let handshake = t.connector.connect(&t.domain, tcp);
                let s = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))?
                    .map_err(io::Error::other)?;
                pump(s, &udp, client, rx).await
            }
        }
    };
    let r: io::Result<()> = run.await;
    if let Err(e) = r {
        tracing::debug!(%server, %client, error = %e, "TURN/TCP bridge connection ended");
    }
}

/// Moves messages between the stream and the local socket until either side ends.
async fn pump<S: AsyncRead + AsyncWrite>(
    stream: S,
    udp: &UdpSocket,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(bytes) => wr.write_all(&bytes).await?,
                None => return Ok(()),
            },
            got = rd.read(&mut chunk) => {
                let n = got?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "TURN server closed the connection"));
                }
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some(frame) = next_frame(&buf[at..])? {
                    udp.send_to(&buf[at..at + frame.len], client).await?;
                    at += frame.consumed;
                }
                buf.drain(..at);
            }
        }
    }
}

/// One TURN message at the front of a stream.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    /// The message's own length (what goes into one datagram).
    len: usize,
    /// What it takes in the stream (ChannelData is padded to a multiple of 4).
    consumed: usize,
}

/// The message at the front of `buf`: `Ok(None)` until all of it has arrived, an error
/// for bytes that are neither a STUN message nor ChannelData.
fn next_frame(buf: &[u8]) -> io::Result<Option<Frame>> {
    let [first, _, hi, lo, ..] = *buf else {
        return Ok(None);
    };
    let body = usize::from(u16::from_be_bytes([hi, lo]));
    let frame = match first >> 6 {
        // STUN: 20-byte header; its length is always a multiple of 4.
        0b00 => Frame {
            len: 20 + body,
            consumed: 20 + body,
        },
        // ChannelData: 4-byte header, padded to 4 bytes on a stream.
        0b01 => Frame {
            len: 4 + body,
            consumed: (4 + body).next_multiple_of(4),
        },
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TURN server sent something that is neither STUN nor ChannelData",
            ));
        }
    };
    Ok((buf.len() >= frame.consumed).then_some(frame))
}

/// A STUN Binding request (method 0x001, class request).
fn is_binding_request(datagram: &[u8]) -> bool {
    datagram.starts_with(&[0x00, 0x01])
}

/// A datagram from the TURN client as it goes on the stream: ChannelData padded.
fn to_stream(datagram: &[u8]) -> Vec<u8> {
    let mut out = datagram.to_vec();
    if datagram.first().is_some_and(|b| b >> 6 == 0b01) {
        out.resize(datagram.len().next_multiple_of(4), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_from_the_stream_with_their_padding() -> io::Result<()> {
        // A binding request with 4 bytes of attributes, then ChannelData of 5 bytes (3 of
        // padding), then the first half of another STUN header.
        let mut s = vec![0x00, 0x01, 0x00, 0x04];
        s.extend([0u8; 16]);
        s.extend([1, 2, 3, 4]);
        s.extend([0x40, 0x00, 0x00, 0x05, 9, 9, 9, 9, 9, 0, 0, 0]);
        s.extend([0x01, 0x01, 0x00, 0x00, 0, 0]);
        assert_eq!(
            next_frame(&s)?,
            Some(Frame {
                len: 24,
                consumed: 24
            })
        );
        assert_eq!(
            next_frame(&s[24..])?,
            Some(Frame {
                len: 9,
                consumed: 12
            })
        );
        assert_eq!(next_frame(&s[36..])?, None);
        assert_eq!(next_frame(&s[..3])?, None);
        assert!(next_frame(&[0xff, 0, 0, 0]).is_err());
        Ok(())
    }

    #[test]
    fn channel_data_is_padded_on_the_way_to_the_server() {
        assert_eq!(
            to_stream(&[0x40, 0x01, 0x00, 0x01, 7]),
            [0x40, 0x01, 0x00, 0x01, 7, 0, 0, 0]
        );
        let stun = [0x00, 0x03, 0x00, 0x00];
        assert_eq!(to_stream(&stun), stun);
        assert!(is_binding_request(&[0x00, 0x01, 0x00, 0x00]));
        assert!(!is_binding_request(&stun));
    }
}
