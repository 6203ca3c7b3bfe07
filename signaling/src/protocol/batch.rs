//! Batches: several frames in one `p2p:f` event, as binary or base64 text.
use bytes::{BufMut, Bytes, BytesMut};

use super::codec::CodecError;
use super::wire::{Reader, put_varint};

/// Frames packed for one `p2p:f` event: each frame as `varint(length) ++ frame`, concatenated.
///
/// Everything one flush produces goes into one batch (frames for several targets may share
/// it: the server routes each frame by its `to`), so that a burst of frames costs one
/// Socket.IO event and one write instead of one per frame.
#[derive(Debug, Default, Clone)]
pub struct BatchWriter {
    buf: BytesMut,
    count: usize,
}

impl BatchWriter {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one frame (empty frames are skipped: the format has no room for them).
    pub fn push(&mut self, frame: &[u8]) {
        if frame.is_empty() {
            return;
        }
        put_varint(&mut self.buf, frame.len() as u64);
        self.buf.put_slice(frame);
        self.count += 1;
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no frame was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Frames so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The batch bytes; the writer is empty again afterwards.
    pub fn take(&mut self) -> Bytes {
        self.count = 0;
        self.buf.split().freeze()
    }
}

/// Splits a batch made by [`BatchWriter`] into its frames (zero-copy slices of `batch`).
/// A batch must hold at least one frame; a length of 0, or one that runs past the end,
/// is an error and nothing of the batch should be used.
pub fn split_batch(batch: &Bytes) -> Result<Vec<Bytes>, CodecError> {
    let mut r = Reader { buf: batch, pos: 0 };
    let mut frames = Vec::new();
    while r.pos < batch.len() {
        let len = usize::try_from(r.varint()?).map_err(|_| CodecError::TooLong("frame"))?;
        if len == 0 {
            return Err(CodecError::Batch);
        }
        let start = r.pos;
        r.take(len)?;
        frames.push(batch.slice(start..r.pos));
    }
    if frames.is_empty() {
        return Err(CodecError::Batch);
    }
    Ok(frames)
}

/// A batch as base64 text ([`crate::protocol::FrameEncoding::Base64`]).
pub fn batch_to_base64(batch: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(batch)
}

/// Decodes [`batch_to_base64`].
pub fn batch_from_base64(text: &str) -> Result<Bytes, CodecError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map(Bytes::from)
        .map_err(|_| CodecError::Base64)
}
