//! Byte streams between two peers: the application's side, [`P2pStream`] (tokio
//! `AsyncRead + AsyncWrite`) and [`IncomingStream`]. The bookkeeping and the protocol
//! are the core's streams sub-machine (`crate::core::streams`).
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::core::CHUNK;
use crate::core::streams::{Key, Shared, StreamCmd, StreamParts};
use crate::error::{Error, Result};

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

/// Drops a handle the core already forgot, without a drop notice.
fn discard(mut s: P2pStream) {
    s.silent = true;
}

impl P2pStream {
    /// The handle for a stream the core holds.
    pub(crate) fn from_parts(p: StreamParts, cmds: mpsc::UnboundedSender<StreamCmd>) -> Self {
        P2pStream {
            shared: p.shared,
            key: p.key,
            name: p.name,
            window: p.window,
            cmds,
            silent: false,
        }
    }

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
    pub(crate) fn new(stream: P2pStream) -> Self {
        Self {
            stream: Some(stream),
        }
    }

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
