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

use super::wire::{Reader, put_str8, put_varint};

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
    /// A batch with an empty or truncated record (see [`BatchWriter`](super::BatchWriter)).
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
        /// Set when the sender waits for a reply (never 0: on the wire, 0 means none).
        ack_id: Option<std::num::NonZeroU64>,
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
            put_varint(buf, ack_id.map_or(0, std::num::NonZeroU64::get));
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
                ack_id: std::num::NonZeroU64::new(ack),
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

#[cfg(test)]
mod tests;
