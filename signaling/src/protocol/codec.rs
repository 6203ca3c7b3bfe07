//! The binary envelope codec: one frame format for the relay and for data channels.
//!
//! Layout (all integers are LEB128 varints unless noted, strings are length-prefixed UTF-8):
//!
//! ```text
//! u8 version (=1) | u8 kind | u8 flags | u8 len + to | u8 len + from | body
//! kind 1 Data:     varint seq | message
//! kind 2 Volatile: message
//! kind 3 LinkAck:  varint upto
//! kind 4 Ping:     varint nonce            (flag PONG set on the answer)
//! message: u8 msg-kind, then
//!   1 Event:        varint ack_id (0 = none) | varint len + event name | payload bytes (rest)
//!   2 Reply:        varint ack_id | payload bytes (rest)
//!   3 ReplyError:   varint ack_id | u8 len + code | message (rest, UTF-8)
//!   4 Continuation: payload bytes (rest)
//!   5 Stream:       varint stream id | u8 op (bit 7 set: the sender opened the stream) | op body
//!                   op 1 Open: name (rest, UTF-8)      op 2 Accept     op 3 Refuse: u8 len + code | message
//!                   op 4 Data: bytes (rest)            op 5 Credit: varint bytes
//!                   op 6 Fin                           op 7 Reset: u8 len + code | message
//! flags: bit 0 MORE (a fragment follows), bit 1 BINARY (payload is raw bytes, else JSON text),
//!        bit 2 NACK (LinkAck: the receiver saw a gap), bit 3 PONG (Ping: this is the answer)
//! ```
use bytes::{BufMut, Bytes, BytesMut};

/// Version byte of the frame format.
pub const FRAME_VERSION: u8 = 1;
const KIND_DATA: u8 = 1;
const KIND_VOLATILE: u8 = 2;
const KIND_LINK_ACK: u8 = 3;
const KIND_PING: u8 = 4;
const MSG_EVENT: u8 = 1;
const MSG_REPLY: u8 = 2;
const MSG_REPLY_ERROR: u8 = 3;
const MSG_CONTINUATION: u8 = 4;
const MSG_STREAM: u8 = 5;
const STREAM_OPENER: u8 = 0x80;
const FLAG_MORE: u8 = 1;
const FLAG_BINARY: u8 = 2;
const FLAG_NACK: u8 = 4;
const FLAG_PONG: u8 = 8;
/// Longest peer id accepted in a frame header.
pub const MAX_ID_LEN: usize = 255;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame ended before its header was complete.
    #[error("frame truncated")]
    Truncated,
    /// Unknown version byte.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// Unknown frame or message kind.
    #[error("unknown kind {0}")]
    Kind(u8),
    /// A string field was not valid UTF-8.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// A varint was longer than 10 bytes or overflowed.
    #[error("invalid varint")]
    Varint,
    /// A field is longer than the format allows.
    #[error("{0} too long")]
    TooLong(&'static str),
    /// A batch with an empty or truncated record (see [`BatchWriter`]).
    #[error("bad batch: empty frame record")]
    Batch,
    /// A base64 batch that is not valid base64.
    #[error("bad batch: invalid base64")]
    Base64,
}

/// Payload of a message: JSON text or raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WirePayload {
    /// UTF-8 JSON text (not validated by the codec).
    Json(Bytes),
    /// Opaque binary.
    Binary(Bytes),
}

impl WirePayload {
    /// The payload bytes, whatever the kind.
    pub fn bytes(&self) -> &Bytes {
        match self {
            WirePayload::Json(b) | WirePayload::Binary(b) => b,
        }
    }
    /// True for binary payloads.
    pub fn is_binary(&self) -> bool {
        matches!(self, WirePayload::Binary(_))
    }
}

/// A message carried by a data or volatile frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// An application event.
    Event {
        /// Application event name (any string).
        event: String,
        /// Set when the sender waits for a reply.
        ack_id: Option<u64>,
        /// The payload (or the first part of it when fragmented).
        payload: WirePayload,
    },
    /// A reply to an event that asked for one.
    Reply {
        /// The ack id of the event answered.
        ack_id: u64,
        /// The reply payload (or its first part).
        payload: WirePayload,
    },
    /// The receiver could not reply (no handler, handler dropped the request, ...).
    ReplyError {
        /// The ack id of the event answered.
        ack_id: u64,
        /// Machine-readable code.
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// The next part of a fragmented message.
    Continuation {
        /// Bytes to append.
        data: Bytes,
    },
    /// Byte-stream traffic (never fragmented: data is sent in chunks that fit a frame).
    Stream {
        /// Stream id, chosen by the side that opened it.
        id: u64,
        /// The sender of this message opened the stream (ids of both sides never clash).
        opener: bool,
        /// What happens on the stream.
        op: StreamOp,
    },
}

/// What a [`Msg::Stream`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOp {
    /// Ask the other side to accept a new stream.
    Open {
        /// Application name of the stream.
        name: String,
    },
    /// The stream is accepted.
    Accept,
    /// The stream is refused.
    Refuse {
        /// Machine-readable code.
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// Stream bytes.
    Data(Bytes),
    /// The receiver took this many more bytes: the sender may send as many again.
    Credit(u64),
    /// The sender will write no more (half-close).
    Fin,
    /// The stream is aborted in both directions.
    Reset {
        /// Machine-readable code.
        code: String,
        /// Human-readable text.
        message: String,
    },
}

/// The body of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Reliable, ordered, sequenced message.
    Data {
        /// Per peer-pair sequence number, starting at 1.
        seq: u64,
        /// Another fragment of the same message follows.
        more: bool,
        /// The message.
        msg: Msg,
    },
    /// Best-effort message: not sequenced, never retransmitted, never fragmented.
    Volatile {
        /// The message.
        msg: Msg,
    },
    /// Cumulative acknowledgement of reliable frames.
    LinkAck {
        /// Every frame with `seq <= upto` was received.
        upto: u64,
        /// The receiver saw a gap after `upto`: resend from `upto + 1` now.
        nack: bool,
    },
    /// Liveness and echo: answered at once with `pong: true` and the same nonce.
    Ping {
        /// Chosen by the sender of the ping.
        nonce: u64,
        /// True on the answer.
        pong: bool,
    },
}

/// One frame: what moves over the relay (`p2p:f`) or a data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Target peer id (relay routing). Empty on data channels.
    pub to: String,
    /// Sender peer id. Set by the server on relayed frames; ignored from clients.
    pub from: String,
    /// The body.
    pub body: Body,
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

fn put_str8(buf: &mut BytesMut, s: &str, what: &'static str) -> Result<(), CodecError> {
    let len = u8::try_from(s.len()).map_err(|_| CodecError::TooLong(what))?;
    buf.put_u8(len);
    buf.put_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, CodecError> {
        let b = *self.buf.get(self.pos).ok_or(CodecError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(CodecError::Varint);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Varint)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(CodecError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn str8(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError::Utf8(what))
    }
    fn str_var(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = usize::try_from(self.varint()?).map_err(|_| CodecError::TooLong(what))?;
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError::Utf8(what))
    }
}

impl Frame {
    /// Encodes the frame.
    pub fn encode(&self) -> Result<Bytes, CodecError> {
        let payload_len = match &self.body {
            Body::Data { msg, .. } | Body::Volatile { msg } => msg_payload_len(msg),
            Body::LinkAck { .. } | Body::Ping { .. } => 0,
        };
        let mut buf = BytesMut::with_capacity(32 + self.to.len() + self.from.len() + payload_len);
        let (kind, mut flags) = match &self.body {
            Body::Data { more, .. } => (KIND_DATA, if *more { FLAG_MORE } else { 0 }),
            Body::Volatile { .. } => (KIND_VOLATILE, 0),
            Body::LinkAck { nack, .. } => (KIND_LINK_ACK, if *nack { FLAG_NACK } else { 0 }),
            Body::Ping { pong, .. } => (KIND_PING, if *pong { FLAG_PONG } else { 0 }),
        };
        if let Body::Data { msg, .. } | Body::Volatile { msg } = &self.body {
            match msg {
                Msg::Event { payload, .. } | Msg::Reply { payload, .. } if payload.is_binary() => {
                    flags |= FLAG_BINARY
                }
                _ => {}
            }
        }
        buf.put_u8(FRAME_VERSION);
        buf.put_u8(kind);
        buf.put_u8(flags);
        put_str8(&mut buf, &self.to, "to")?;
        put_str8(&mut buf, &self.from, "from")?;
        match &self.body {
            Body::Data { seq, msg, .. } => {
                put_varint(&mut buf, *seq);
                encode_msg(&mut buf, msg)?;
            }
            Body::Volatile { msg } => encode_msg(&mut buf, msg)?,
            Body::LinkAck { upto, .. } => put_varint(&mut buf, *upto),
            Body::Ping { nonce, .. } => put_varint(&mut buf, *nonce),
        }
        Ok(buf.freeze())
    }

    /// Decodes a frame. Payload bytes are zero-copy slices of `frame`.
    pub fn decode(frame: &Bytes) -> Result<Frame, CodecError> {
        let mut r = Reader { buf: frame, pos: 0 };
        let version = r.u8()?;
        if version != FRAME_VERSION {
            return Err(CodecError::Version(version));
        }
        let kind = r.u8()?;
        let flags = r.u8()?;
        let to = r.str8("to")?.to_owned();
        let from = r.str8("from")?.to_owned();
        let body = match kind {
            KIND_DATA => {
                let seq = r.varint()?;
                let msg = decode_msg(&mut r, frame, flags)?;
                Body::Data {
                    seq,
                    more: flags & FLAG_MORE != 0,
                    msg,
                }
            }
            KIND_VOLATILE => Body::Volatile {
                msg: decode_msg(&mut r, frame, flags)?,
            },
            KIND_LINK_ACK => Body::LinkAck {
                upto: r.varint()?,
                nack: flags & FLAG_NACK != 0,
            },
            KIND_PING => Body::Ping {
                nonce: r.varint()?,
                pong: flags & FLAG_PONG != 0,
            },
            k => return Err(CodecError::Kind(k)),
        };
        Ok(Frame { to, from, body })
    }
}

fn msg_payload_len(msg: &Msg) -> usize {
    match msg {
        Msg::Event { payload, event, .. } => payload.bytes().len() + event.len(),
        Msg::Reply { payload, .. } => payload.bytes().len(),
        Msg::ReplyError { message, .. } => message.len() + 255,
        Msg::Continuation { data } => data.len(),
        Msg::Stream { op, .. } => {
            12 + match op {
                StreamOp::Open { name } => name.len(),
                StreamOp::Refuse { message, .. } | StreamOp::Reset { message, .. } => {
                    message.len() + 255
                }
                StreamOp::Data(d) => d.len(),
                _ => 0,
            }
        }
    }
}

fn encode_msg(buf: &mut BytesMut, msg: &Msg) -> Result<(), CodecError> {
    match msg {
        Msg::Event {
            event,
            ack_id,
            payload,
        } => {
            buf.put_u8(MSG_EVENT);
            put_varint(buf, ack_id.map_or(0, |a| a));
            put_varint(buf, event.len() as u64);
            buf.put_slice(event.as_bytes());
            buf.put_slice(payload.bytes());
        }
        Msg::Reply { ack_id, payload } => {
            buf.put_u8(MSG_REPLY);
            put_varint(buf, *ack_id);
            buf.put_slice(payload.bytes());
        }
        Msg::ReplyError {
            ack_id,
            code,
            message,
        } => {
            buf.put_u8(MSG_REPLY_ERROR);
            put_varint(buf, *ack_id);
            put_str8(buf, code, "code")?;
            buf.put_slice(message.as_bytes());
        }
        Msg::Continuation { data } => {
            buf.put_u8(MSG_CONTINUATION);
            buf.put_slice(data);
        }
        Msg::Stream { id, opener, op } => {
            buf.put_u8(MSG_STREAM);
            put_varint(buf, *id);
            let code = |n: u8| if *opener { n | STREAM_OPENER } else { n };
            match op {
                StreamOp::Open { name } => {
                    buf.put_u8(code(1));
                    buf.put_slice(name.as_bytes());
                }
                StreamOp::Accept => buf.put_u8(code(2)),
                StreamOp::Refuse { code: c, message } => {
                    buf.put_u8(code(3));
                    put_str8(buf, c, "code")?;
                    buf.put_slice(message.as_bytes());
                }
                StreamOp::Data(d) => {
                    buf.put_u8(code(4));
                    buf.put_slice(d);
                }
                StreamOp::Credit(n) => {
                    buf.put_u8(code(5));
                    put_varint(buf, *n);
                }
                StreamOp::Fin => buf.put_u8(code(6)),
                StreamOp::Reset { code: c, message } => {
                    buf.put_u8(code(7));
                    put_str8(buf, c, "code")?;
                    buf.put_slice(message.as_bytes());
                }
            }
        }
    }
    Ok(())
}

fn decode_msg(r: &mut Reader<'_>, frame: &Bytes, flags: u8) -> Result<Msg, CodecError> {
    let kind = r.u8()?;
    let payload = |pos: usize| {
        let b = frame.slice(pos..);
        if flags & FLAG_BINARY != 0 {
            WirePayload::Binary(b)
        } else {
            WirePayload::Json(b)
        }
    };
    Ok(match kind {
        MSG_EVENT => {
            let ack = r.varint()?;
            let event = r.str_var("event")?.to_owned();
            Msg::Event {
                event,
                ack_id: (ack != 0).then_some(ack),
                payload: payload(r.pos),
            }
        }
        MSG_REPLY => {
            let ack_id = r.varint()?;
            Msg::Reply {
                ack_id,
                payload: payload(r.pos),
            }
        }
        MSG_REPLY_ERROR => {
            let ack_id = r.varint()?;
            let code = r.str8("code")?.to_owned();
            let rest = r.take(r.buf.len() - r.pos)?;
            let message = std::str::from_utf8(rest)
                .map_err(|_| CodecError::Utf8("message"))?
                .to_owned();
            Msg::ReplyError {
                ack_id,
                code,
                message,
            }
        }
        MSG_CONTINUATION => Msg::Continuation {
            data: frame.slice(r.pos..),
        },
        MSG_STREAM => {
            let id = r.varint()?;
            let b = r.u8()?;
            let rest_str = |r: &mut Reader<'_>, what: &'static str| -> Result<String, CodecError> {
                let rest = r.take(r.buf.len() - r.pos)?;
                Ok(std::str::from_utf8(rest)
                    .map_err(|_| CodecError::Utf8(what))?
                    .to_owned())
            };
            let op = match b & !STREAM_OPENER {
                1 => StreamOp::Open {
                    name: rest_str(r, "stream name")?,
                },
                2 => StreamOp::Accept,
                3 | 7 => {
                    let code = r.str8("code")?.to_owned();
                    let message = rest_str(r, "message")?;
                    if b & !STREAM_OPENER == 3 {
                        StreamOp::Refuse { code, message }
                    } else {
                        StreamOp::Reset { code, message }
                    }
                }
                4 => StreamOp::Data(frame.slice(r.pos..)),
                5 => StreamOp::Credit(r.varint()?),
                6 => StreamOp::Fin,
                k => return Err(CodecError::Kind(k)),
            };
            Msg::Stream {
                id,
                opener: b & STREAM_OPENER != 0,
                op,
            }
        }
        k => return Err(CodecError::Kind(k)),
    })
}

/// Routing view of a frame, read without decoding the body (what the server needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// The whole frame.
    frame: &'a [u8],
    /// Target peer id.
    pub to: &'a str,
    /// Offset where the `from` field starts.
    from_at: usize,
    /// Offset where the body starts.
    body_at: usize,
}

impl Route<'_> {
    /// The `seq` of a Data frame, read without decoding the rest of the body.
    pub fn seq(&self) -> Option<u64> {
        if self.frame.get(1) != Some(&KIND_DATA) {
            return None;
        }
        Reader {
            buf: self.frame,
            pos: self.body_at,
        }
        .varint()
        .ok()
    }
}

/// Reads a frame's target without decoding its body; checks version and kind.
pub fn peek_route(frame: &[u8]) -> Result<Route<'_>, CodecError> {
    let mut r = Reader { buf: frame, pos: 0 };
    let version = r.u8()?;
    if version != FRAME_VERSION {
        return Err(CodecError::Version(version));
    }
    let kind = r.u8()?;
    if !(KIND_DATA..=KIND_PING).contains(&kind) {
        return Err(CodecError::Kind(kind));
    }
    r.u8()?;
    let to = r.str8("to")?;
    let from_at = r.pos;
    r.str8("from")?;
    let body_at = r.pos;
    if body_at >= frame.len() {
        return Err(CodecError::Truncated);
    }
    Ok(Route {
        frame,
        to,
        from_at,
        body_at,
    })
}

/// The frame with its `from` field rewritten (the server stamps the sender's identity).
pub fn stamp_from(route: &Route<'_>, from: &str) -> Result<Bytes, CodecError> {
    let frame = route.frame;
    let mut buf = BytesMut::with_capacity(frame.len() + from.len());
    buf.put_slice(&frame[..route.from_at]);
    put_str8(&mut buf, from, "from")?;
    buf.put_slice(&frame[route.body_at..]);
    Ok(buf.freeze())
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_payload() -> impl Strategy<Value = WirePayload> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| WirePayload::Binary(Bytes::from(v))),
            ".{0,40}".prop_map(|s| WirePayload::Json(Bytes::from(s))),
        ]
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (".{0,20}", proptest::option::of(1u64..), arb_payload()).prop_map(
                |(event, ack_id, payload)| Msg::Event {
                    event,
                    ack_id,
                    payload
                }
            ),
            (any::<u64>(), arb_payload())
                .prop_map(|(ack_id, payload)| Msg::Reply { ack_id, payload }),
            (any::<u64>(), "[A-Za-z]{0,20}", ".{0,40}").prop_map(|(ack_id, code, message)| {
                Msg::ReplyError {
                    ack_id,
                    code,
                    message,
                }
            }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| Msg::Continuation {
                data: Bytes::from(v)
            }),
            (any::<u64>(), any::<bool>(), arb_stream_op())
                .prop_map(|(id, opener, op)| Msg::Stream { id, opener, op }),
        ]
    }

    fn arb_stream_op() -> impl Strategy<Value = StreamOp> {
        prop_oneof![
            ".{0,20}".prop_map(|name| StreamOp::Open { name }),
            Just(StreamOp::Accept),
            ("[a-zA-Z]{0,20}", ".{0,40}")
                .prop_map(|(code, message)| StreamOp::Refuse { code, message }),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| StreamOp::Data(Bytes::from(v))),
            any::<u64>().prop_map(StreamOp::Credit),
            Just(StreamOp::Fin),
            ("[a-zA-Z]{0,20}", ".{0,40}")
                .prop_map(|(code, message)| StreamOp::Reset { code, message }),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let body = prop_oneof![
            (any::<u64>(), any::<bool>(), arb_msg()).prop_map(|(seq, more, msg)| Body::Data {
                seq,
                more,
                msg
            }),
            arb_msg().prop_map(|msg| Body::Volatile { msg }),
            (any::<u64>(), any::<bool>()).prop_map(|(upto, nack)| Body::LinkAck { upto, nack }),
            (any::<u64>(), any::<bool>()).prop_map(|(nonce, pong)| Body::Ping { nonce, pong }),
        ];
        ("[a-zA-Z0-9_-]{0,30}", "[a-zA-Z0-9_-]{0,30}", body).prop_map(|(to, from, body)| Frame {
            to,
            from,
            body,
        })
    }

    proptest! {
        #[test]
        fn roundtrip(frame in arb_frame()) {
            let bytes = frame.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = Frame::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, frame.clone());
            let route = peek_route(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(route.to, frame.to.as_str());
            let seq = match frame.body { Body::Data { seq, .. } => Some(seq), _ => None };
            prop_assert_eq!(route.seq(), seq);
            let stamped = stamp_from(&route, "server-set").map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = Frame::decode(&stamped).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.from.as_str(), "server-set");
            prop_assert_eq!(back.body, frame.body);
        }

        #[test]
        fn batch_roundtrip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..20)) {
            let mut w = BatchWriter::new();
            for f in &frames {
                w.push(f);
            }
            prop_assert_eq!(w.count(), frames.len());
            let batch = w.take();
            prop_assert!(w.is_empty());
            let text = batch_to_base64(&batch);
            prop_assert!(!text.bytes().any(|b| b == 0x1e || b == 0x1d));
            let back = batch_from_base64(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &batch);
            let split = split_batch(&back).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let split: Vec<Vec<u8>> = split.iter().map(|b| b.to_vec()).collect();
            prop_assert_eq!(split, frames);
        }

        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let b = Bytes::from(data);
            let _ = split_batch(&b);
            let _ = Frame::decode(&b);
            if let Ok(route) = peek_route(&b) {
                let _ = stamp_from(&route, "x");
            }
        }

        #[test]
        fn never_panics_on_mutated_frames(frame in arb_frame(), idx in any::<usize>(), byte in any::<u8>()) {
            let bytes = frame.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut v = bytes.to_vec();
            let i = idx % v.len();
            v[i] = byte;
            let _ = Frame::decode(&Bytes::from(v.clone()));
            v.truncate(i);
            let _ = Frame::decode(&Bytes::from(v));
        }
    }

    #[test]
    fn bad_batches_are_refused() {
        assert_eq!(split_batch(&Bytes::new()), Err(CodecError::Batch));
        assert_eq!(
            split_batch(&Bytes::from_static(&[0])),
            Err(CodecError::Batch)
        );
        assert_eq!(
            split_batch(&Bytes::from_static(&[3, 1, 2])),
            Err(CodecError::Truncated)
        );
        assert_eq!(batch_from_base64("not base64!"), Err(CodecError::Base64));
        let two = split_batch(&Bytes::from_static(&[1, 9, 2, 7, 8])).unwrap_or_default();
        assert_eq!(
            two,
            vec![Bytes::from_static(&[9]), Bytes::from_static(&[7, 8])]
        );
    }

    #[test]
    fn rejects_long_ids() {
        let f = Frame {
            to: "x".repeat(300),
            from: String::new(),
            body: Body::LinkAck {
                upto: 1,
                nack: false,
            },
        };
        assert_eq!(f.encode(), Err(CodecError::TooLong("to")));
    }

    #[test]
    fn rejects_bad_version_and_kind() {
        assert_eq!(
            Frame::decode(&Bytes::from_static(&[9, 1, 0, 0, 0])),
            Err(CodecError::Version(9))
        );
        assert_eq!(
            Frame::decode(&Bytes::from_static(&[1, 7, 0, 0, 0])),
            Err(CodecError::Kind(7))
        );
        assert_eq!(
            Frame::decode(&Bytes::from_static(&[1, 1])),
            Err(CodecError::Truncated)
        );
    }
}
