//! The wire protocol shared by the server and the peers. Compiles without socketioxide.
//!
//! Control messages are JSON on the `p2p:*` Socket.IO events ([`events`]); application
//! events travel inside binary [`Frame`]s on [`events::FRAME`], the same frames a data
//! channel carries. See `PROTOCOL.md` at the repository root for the full description.
mod batch;
mod codec;
mod control;
mod wire;

pub use batch::{BatchWriter, batch_from_base64, batch_to_base64, split_batch};
pub use codec::{
    Body, CodecError, FRAME_VERSION, Frame, MAX_ID_LEN, Msg, Route, StreamOp, WirePayload,
    peek_route, stamp_from,
};
pub use control::{
    CallError, CallFor, CallOutcome, ErrorBody, ErrorCode, ErrorMsg, FrameEncoding, IceServerInfo,
    MAX_CANDIDATE_LEN, MAX_SDP_LEN, MembersPage, Op, PROTOCOL_VERSION, PeerInfo, Presence,
    Publication, Request, Response, Resume, RoomPeers, Signal, SignalFrom, Welcome, events,
};
