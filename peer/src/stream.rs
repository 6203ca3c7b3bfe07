//! Byte streams between two peers: [`P2pStream`] (tokio `AsyncRead + AsyncWrite`) and the
//! actor-side [`StreamTable`].
//!
//! Stream messages ride the peer's reliable link (so they are ordered, lossless and survive
//! transport switches) but are taken off the link as soon as they arrive: each stream has
//! its own credit-based flow control instead. The receiver grants `window` bytes when the
//! stream opens and grants more as the application reads, so one stream's slow reader
//! never holds up another stream or the events, and each side buffers at most one window
//! per stream.
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use socketio_p2p_signaling::protocol::{Msg, StreamOp};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::link::CHUNK;

/// How many incoming streams may wait for [`crate::P2p::accept_stream`] before new ones
/// are refused with `Busy`.
pub(crate) const INCOMING_QUEUE: usize = 64;

/// Identifies a stream on this side: the peer, who opened it and the opener's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) peer: String,
    /// We opened it.
    pub(crate) mine: bool,
    pub(crate) id: u64,
}

/// Commands from stream handles to the actor.
#[derive(Debug)]
pub(crate) enum StreamCmd {
    Open {
        peer: String,
        name: String,
        reply: oneshot::Sender<Result<P2pStream>>,
    },
    Accept(Key),
    Refuse(Key, String),
    Write(Key, Bytes),
    Credit(Key, u64),
    Fin(Key),
    /// The handle was dropped: reset the stream unless both directions had ended.
    Dropped(Key),
    /// How many streams the table holds.
    Count(oneshot::Sender<usize>),
}

#[derive(Debug, Default)]
struct State {
    recv: VecDeque<Bytes>,
    recv_bytes: usize,
    /// The peer half-closed: reads return EOF once `recv` is drained.
    eof: bool,
    /// Bytes read since the last credit sent to the peer.
    unreported: u64,
    read_waker: Option<Waker>,
    /// Bytes we may still send.
    credit: u64,
    write_waker: Option<Waker>,
    /// We half-closed (shutdown).
    fin_sent: bool,
    /// The stream was reset or its peer went away.
    error: Option<(io::ErrorKind, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, kind: io::ErrorKind, why: String) {
        let mut s = self.lock();
        if s.error.is_none() {
            s.error = Some((kind, why));
        }
        wake(&mut s);
    }
}

fn wake(s: &mut State) {
    if let Some(w) = s.read_waker.take() {
        w.wake();
    }
    if let Some(w) = s.write_waker.take() {
        w.wake();
    }
}

/// A byte stream to another peer, from [`crate::P2p::open_stream`] or
/// [`IncomingStream::accept`].
///
/// It implements tokio's [`AsyncRead`] and [`AsyncWrite`]; split it with
/// [`tokio::io::split`]. [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown)
/// half-closes it: the other side reads to the end, and may go on writing. Dropping it
/// before both directions have ended resets it (the other side's reads and writes fail).
/// When the peer disconnects, reads and writes fail with `ConnectionReset`.
///
/// Writes wait while the other side has not read what was sent before (its window, set by
/// [`crate::P2pOptions::stream_window`]), so memory stays bounded whatever the speeds.
#[derive(Debug)]
pub struct P2pStream {
    shared: Arc<Shared>,
    key: Key,
    name: String,
    window: u64,
    cmds: mpsc::UnboundedSender<StreamCmd>,
    /// Dropped by the table itself: no drop notice.
    silent: bool,
}

/// Drops a handle the table already forgot, without a drop notice.
fn discard(mut s: P2pStream) {
    s.silent = true;
}

impl P2pStream {
    /// The id of the peer at the other end.
    pub fn peer(&self) -> &str {
        &self.key.peer
    }

    /// The name given by the side that opened the stream.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes received and not read yet.
    pub fn buffered(&self) -> usize {
        self.shared.lock().recv_bytes
    }
}

impl AsyncRead for P2pStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut s = this.shared.lock();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !s.recv.is_empty() {
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = s.recv.front_mut() else {
                    break;
                };
                let take = front.len().min(buf.remaining());
                buf.put_slice(&front.split_to(take));
                n += take;
                if front.is_empty() {
                    s.recv.pop_front();
                }
            }
            s.recv_bytes -= n;
            s.unreported += n as u64;
            if s.unreported >= (this.window / 4).max(1) && s.error.is_none() {
                let credit = std::mem::take(&mut s.unreported);
                let _ = this.cmds.send(StreamCmd::Credit(this.key.clone(), credit));
            }
            return Poll::Ready(Ok(()));
        }
        // After the peer's end of stream, a reset only concerns our writes.
        if s.eof {
            return Poll::Ready(Ok(()));
        }
        if let Some((kind, why)) = &s.error {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for P2pStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut s = this.shared.lock();
        if let Some((kind, why)) = &s.error {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        if s.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if s.credit == 0 {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(CHUNK).min(s.credit as usize);
        let data = Bytes::copy_from_slice(&buf[..n]);
        if this
            .cmds
            .send(StreamCmd::Write(this.key.clone(), data))
            .is_err()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the P2p is closed",
            )));
        }
        s.credit -= n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut s = this.shared.lock();
        if let Some((kind, why)) = &s.error {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        if !s.fin_sent {
            s.fin_sent = true;
            let _ = this.cmds.send(StreamCmd::Fin(this.key.clone()));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for P2pStream {
    fn drop(&mut self) {
        if !self.silent {
            let _ = self.cmds.send(StreamCmd::Dropped(self.key.clone()));
        }
    }
}

/// A stream another peer wants to open: [`IncomingStream::accept`] or
/// [`IncomingStream::refuse`] it. Dropping it refuses it.
#[derive(Debug)]
pub struct IncomingStream {
    stream: Option<P2pStream>,
}

impl IncomingStream {
    /// The id of the peer that opens the stream.
    pub fn peer(&self) -> &str {
        self.stream.as_ref().map_or("", |s| s.peer())
    }

    /// The name it gave the stream.
    pub fn name(&self) -> &str {
        self.stream.as_ref().map_or("", |s| s.name())
    }

    /// Accepts the stream.
    pub fn accept(mut self) -> Result<P2pStream> {
        let stream = self.stream.take().ok_or(Error::Closed)?;
        stream
            .cmds
            .send(StreamCmd::Accept(stream.key.clone()))
            .map_err(|_| Error::Closed)?;
        Ok(stream)
    }

    /// Refuses the stream: the opener gets [`Error::StreamRefused`] with `reason`.
    pub fn refuse(mut self, reason: &str) {
        self.refuse_with(reason);
    }

    fn refuse_with(&mut self, reason: &str) {
        if let Some(s) = self.stream.take() {
            let _ = s
                .cmds
                .send(StreamCmd::Refuse(s.key.clone(), reason.to_owned()));
            discard(s);
        }
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        self.refuse_with("not accepted");
    }
}

struct Entry {
    shared: Arc<Shared>,
    /// We opened it and wait for the answer.
    opening: Option<(oneshot::Sender<Result<P2pStream>>, P2pStream, Instant)>,
    /// Bytes the peer may still send us (we granted them).
    allowed: u64,
    fin_recv: bool,
    fin_sent: bool,
}

/// Messages to push on a peer's link.
pub(crate) type Out = Vec<(String, Msg)>;

/// All streams of one `P2p`, owned by its actor. Pure bookkeeping: it returns the messages
/// to send.
pub(crate) struct StreamTable {
    entries: HashMap<Key, Entry>,
    next_id: u64,
    window: u64,
    incoming: mpsc::Sender<IncomingStream>,
    cmds: mpsc::UnboundedSender<StreamCmd>,
}

fn msg(key: &Key, op: StreamOp) -> (String, Msg) {
    (
        key.peer.clone(),
        Msg::Stream {
            id: key.id,
            opener: key.mine,
            op,
        },
    )
}

fn reset(key: &Key, code: &str, message: &str) -> (String, Msg) {
    msg(
        key,
        StreamOp::Reset {
            code: code.into(),
            message: message.into(),
        },
    )
}

impl StreamTable {
    pub(crate) fn new(
        window: u64,
        incoming: mpsc::Sender<IncomingStream>,
        cmds: mpsc::UnboundedSender<StreamCmd>,
    ) -> Self {
        Self {
            entries: HashMap::new(),
            next_id: 0,
            window: window.max(CHUNK as u64),
            incoming,
            cmds,
        }
    }

    fn handle(&self, key: Key, name: String, shared: Arc<Shared>) -> P2pStream {
        P2pStream {
            shared,
            key,
            name,
            window: self.window,
            cmds: self.cmds.clone(),
            silent: false,
        }
    }

    fn new_entry(&self, shared: Arc<Shared>) -> Entry {
        Entry {
            shared,
            opening: None,
            allowed: self.window,
            fin_recv: false,
            fin_sent: false,
        }
    }

    /// Opens a stream to a known peer; the reply comes when the peer answers or `deadline`.
    pub(crate) fn open(
        &mut self,
        peer: String,
        name: String,
        reply: oneshot::Sender<Result<P2pStream>>,
        deadline: Instant,
    ) -> Out {
        self.next_id += 1;
        let key = Key {
            peer,
            mine: true,
            id: self.next_id,
        };
        let shared = Arc::new(Shared::default());
        let handle = self.handle(key.clone(), name.clone(), shared.clone());
        let mut e = self.new_entry(shared);
        e.opening = Some((reply, handle, deadline));
        self.entries.insert(key.clone(), e);
        vec![
            msg(&key, StreamOp::Open { name }),
            msg(&key, StreamOp::Credit(self.window)),
        ]
    }

    /// A stream message from `from`.
    pub(crate) fn on_msg(&mut self, from: &str, id: u64, opener: bool, op: StreamOp) -> Out {
        let key = Key {
            peer: from.to_owned(),
            mine: !opener,
            id,
        };
        if let StreamOp::Open { name } = op {
            if !opener || self.entries.contains_key(&key) {
                return vec![reset(&key, "Protocol", "duplicate stream id")];
            }
            let shared = Arc::new(Shared::default());
            let incoming = IncomingStream {
                stream: Some(self.handle(key.clone(), name, shared.clone())),
            };
            self.entries.insert(key.clone(), self.new_entry(shared));
            return match self.incoming.try_send(incoming) {
                Ok(()) => Vec::new(),
                Err(e) => {
                    // Dropping it would queue a Refuse; answer here and forget the handle.
                    let mut incoming = e.into_inner();
                    if let Some(s) = incoming.stream.take() {
                        discard(s);
                    }
                    self.entries.remove(&key);
                    vec![msg(
                        &key,
                        StreamOp::Refuse {
                            code: "Busy".into(),
                            message: "too many streams waiting to be accepted".into(),
                        },
                    )]
                }
            };
        }
        let Some(e) = self.entries.get_mut(&key) else {
            return match op {
                StreamOp::Reset { .. } | StreamOp::Refuse { .. } => Vec::new(),
                _ => vec![reset(&key, "UnknownStream", "no such stream")],
            };
        };
        match op {
            StreamOp::Open { .. } => Vec::new(),
            StreamOp::Accept => {
                if let Some((reply, handle, _)) = e.opening.take()
                    && let Err(Ok(handle)) = reply.send(Ok(handle))
                {
                    // The opener stopped waiting: its drop notice resets the stream.
                    drop(handle);
                }
                Vec::new()
            }
            StreamOp::Refuse { code, message } => {
                if let Some((reply, handle, _)) = e.opening.take() {
                    discard(handle);
                    let _ = reply.send(Err(Error::StreamRefused { code, message }));
                }
                self.entries.remove(&key);
                Vec::new()
            }
            StreamOp::Data(data) => {
                let n = data.len() as u64;
                if n > e.allowed {
                    e.shared.fail(
                        io::ErrorKind::InvalidData,
                        "the peer sent more than its window".into(),
                    );
                    self.forget(&key);
                    return vec![reset(&key, "FlowControl", "sent more than the window")];
                }
                e.allowed -= n;
                if !data.is_empty() {
                    let mut s = e.shared.lock();
                    s.recv_bytes += data.len();
                    s.recv.push_back(data);
                    if let Some(w) = s.read_waker.take() {
                        w.wake();
                    }
                }
                Vec::new()
            }
            StreamOp::Credit(n) => {
                let mut s = e.shared.lock();
                s.credit = s.credit.saturating_add(n);
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
                Vec::new()
            }
            StreamOp::Fin => {
                e.fin_recv = true;
                {
                    let mut s = e.shared.lock();
                    s.eof = true;
                    wake(&mut s);
                }
                Vec::new()
            }
            StreamOp::Reset { code, message } => {
                if let Some((reply, handle, _)) = e.opening.take() {
                    discard(handle);
                    let _ = reply.send(Err(Error::StreamRefused { code, message }));
                } else {
                    e.shared.fail(
                        io::ErrorKind::ConnectionReset,
                        format!("stream reset by the peer ({code}): {message}"),
                    );
                }
                self.entries.remove(&key);
                Vec::new()
            }
        }
    }

    fn forget(&mut self, key: &Key) {
        self.entries.remove(key);
    }

    /// A command from a handle.
    pub(crate) fn on_cmd(&mut self, c: StreamCmd) -> Out {
        match c {
            StreamCmd::Open { .. } => Vec::new(), // handled by the actor (it checks the peer)
            StreamCmd::Count(reply) => {
                let _ = reply.send(self.entries.len());
                Vec::new()
            }
            StreamCmd::Accept(key) => {
                if self.entries.contains_key(&key) {
                    vec![
                        msg(&key, StreamOp::Accept),
                        msg(&key, StreamOp::Credit(self.window)),
                    ]
                } else {
                    Vec::new()
                }
            }
            StreamCmd::Refuse(key, reason) => {
                if self.entries.remove(&key).is_some() {
                    vec![msg(
                        &key,
                        StreamOp::Refuse {
                            code: "Refused".into(),
                            message: reason,
                        },
                    )]
                } else {
                    Vec::new()
                }
            }
            StreamCmd::Write(key, data) => match self.entries.get(&key) {
                Some(e) if !e.fin_sent => vec![msg(&key, StreamOp::Data(data))],
                _ => Vec::new(),
            },
            StreamCmd::Credit(key, n) => match self.entries.get_mut(&key) {
                Some(e) if !e.fin_recv => {
                    e.allowed += n;
                    vec![msg(&key, StreamOp::Credit(n))]
                }
                _ => Vec::new(),
            },
            StreamCmd::Fin(key) => match self.entries.get_mut(&key) {
                Some(e) if !e.fin_sent => {
                    e.fin_sent = true;
                    vec![msg(&key, StreamOp::Fin)]
                }
                _ => Vec::new(),
            },
            StreamCmd::Dropped(key) => {
                let Some(e) = self.entries.get_mut(&key) else {
                    return Vec::new();
                };
                if e.fin_sent && e.fin_recv {
                    self.entries.remove(&key);
                    return Vec::new();
                }
                e.shared
                    .fail(io::ErrorKind::ConnectionAborted, "stream dropped".into());
                self.entries.remove(&key);
                vec![reset(
                    &key,
                    "Dropped",
                    "the stream was dropped before it ended",
                )]
            }
        }
    }

    /// Opens that got no answer by their deadline.
    pub(crate) fn on_tick(&mut self, now: Instant) -> Out {
        let late: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| e.opening.as_ref().is_some_and(|(_, _, d)| *d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in late {
            if let Some(mut e) = self.entries.remove(&key)
                && let Some((reply, handle, _)) = e.opening.take()
            {
                discard(handle);
                let _ = reply.send(Err(Error::Timeout(format!(
                    "{} did not answer the stream request",
                    key.peer
                ))));
                out.push(reset(&key, "Timeout", "no answer to the stream request"));
            }
        }
        out
    }

    /// The peer is gone: its streams fail and are forgotten.
    pub(crate) fn peer_gone(&mut self, peer: &str, why: &str) {
        let keys: Vec<Key> = self
            .entries
            .keys()
            .filter(|k| k.peer == peer)
            .cloned()
            .collect();
        for key in keys {
            if let Some(mut e) = self.entries.remove(&key) {
                if let Some((reply, handle, _)) = e.opening.take() {
                    discard(handle);
                    let _ = reply.send(Err(Error::PeerOffline(format!("{peer}: {why}"))));
                }
                e.shared.fail(
                    io::ErrorKind::ConnectionReset,
                    format!("peer {peer} is gone: {why}"),
                );
            }
        }
    }

    /// Every stream fails (the `P2p` closes).
    pub(crate) fn close_all(&mut self, why: &str) {
        let peers: Vec<String> = self.entries.keys().map(|k| k.peer.clone()).collect();
        for p in peers {
            self.peer_gone(&p, why);
        }
    }
}
