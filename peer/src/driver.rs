//! The driver: the only async loop of a `P2p`. It waits for whatever comes first
//! (commands, server events, peer connection reports, room in the application's queue,
//! the core's next deadline), feeds it to the core, and hands the core's outputs to the
//! carriers and the application. It decides nothing.
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use socketio_p2p_signaling::protocol::PeerInfo;
use tokio::sync::{mpsc, oneshot};

use crate::core::streams::StreamCmd;
use crate::core::{Command, Core, CreditOp, Delivery, Input, NetIn, Output, RtcReport};
use crate::credit::Credits;
use crate::error::Result;
use crate::payload::{Event, PeerEvent, ReplySender, Responder};
use crate::stream::{IncomingStream, P2pStream};
use crate::transport::relay::Relay;
use crate::transport::webrtc::{RtcConfig, RtcEvent, WebRtc, report_of};

/// Inputs of one kind handled in one turn of the loop (what one flush then batches).
const DRAIN: usize = 255;

/// The receiving ends the driver reads.
pub(crate) struct Inbox {
    pub(crate) cmds: mpsc::UnboundedReceiver<Command>,
    pub(crate) net: mpsc::UnboundedReceiver<NetIn>,
    pub(crate) streams: mpsc::UnboundedReceiver<StreamCmd>,
}

/// Where the driver delivers to the application.
pub(crate) struct Outbox {
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) peer_events: mpsc::UnboundedSender<PeerEvent>,
    pub(crate) incoming: mpsc::Sender<IncomingStream>,
    /// For the handles of streams the core hands over.
    pub(crate) stream_tx: mpsc::UnboundedSender<StreamCmd>,
    pub(crate) credits: Arc<Credits>,
}

/// How peer connections are made: their configuration, and a test hook that makes every
/// offer and answer wait this long first.
pub(crate) struct RtcSetup {
    pub(crate) cfg: RtcConfig,
    pub(crate) hang: std::time::Duration,
}

pub(crate) struct Driver {
    core: Core,
    relay: Relay,
    rtc: WebRtc,
    inbox: Inbox,
    /// Replies of our application and outcomes of our services' calls.
    replies: mpsc::UnboundedReceiver<Command>,
    replies_tx: mpsc::UnboundedSender<Command>,
    rtc_events: mpsc::UnboundedReceiver<(u64, RtcEvent)>,
    rtc_reports: mpsc::UnboundedReceiver<(u64, RtcReport)>,
    out: Outbox,
    ready: Option<oneshot::Sender<Result<PeerInfo>>>,
    responder: ReplySender,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    pub(crate) fn new(
        core: Core,
        relay: Relay,
        rtc: RtcSetup,
        inbox: Inbox,
        out: Outbox,
        ready: oneshot::Sender<Result<PeerInfo>>,
    ) -> Self {
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let (events_tx, rtc_events) = mpsc::unbounded_channel();
        let (reports_tx, rtc_reports) = mpsc::unbounded_channel();
        let back = replies_tx.clone();
        let responder: ReplySender = Arc::new(move |peer, ack_id, result| {
            back.send(Command::Reply {
                peer,
                ack_id,
                result,
            })
            .is_ok()
        });
        Self {
            core,
            relay,
            rtc: WebRtc::new(rtc.cfg, reports_tx, events_tx, rtc.hang),
            inbox,
            replies,
            replies_tx,
            rtc_events,
            rtc_reports,
            out,
            ready: Some(ready),
            responder,
        }
    }

    fn input(&mut self, i: Input) {
        self.core.handle_input(i, now());
    }

    pub(crate) async fn run(mut self) {
        while !self.core.is_closed() {
            self.turn().await;
            self.drain_outputs();
        }
        tracing::debug!("core stopped; disconnecting from the server");
        self.rtc.close_all();
        self.relay.disconnect().await;
        tracing::debug!("disconnected from the server");
    }

    /// Waits for the first input and feeds it (and what else of its kind is ready).
    async fn turn(&mut self) {
        self.core
            .set_room(self.out.events.capacity(), self.out.incoming.capacity());
        let deadline = self.core.poll_timeout();
        let held = self.core.has_held();
        let events = self.out.events.clone();
        let room = async move {
            match held {
                true => events.reserve_owned().await.ok(),
                false => std::future::pending().await,
            }
        };
        let sleep = async move {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let commands = self.core.wants_commands();
        tokio::select! {
            biased;
            Some(permit) = room => {
                drop(permit);
                self.core.set_room(self.out.events.capacity(), self.out.incoming.capacity());
                self.input(Input::Room);
            }
            Some(n) = self.inbox.net.recv() => {
                self.input(Input::Net(n));
                for _ in 0..DRAIN {
                    match self.inbox.net.try_recv() {
                        Ok(n) => self.input(Input::Net(n)),
                        Err(_) => break,
                    }
                }
            }
            Some((key, ev)) = self.rtc_events.recv() => {
                self.rtc_event(key, ev);
                for _ in 0..DRAIN {
                    match self.rtc_events.try_recv() {
                        Ok((key, ev)) => self.rtc_event(key, ev),
                        Err(_) => break,
                    }
                }
            }
            Some((key, report)) = self.rtc_reports.recv() => self.input(Input::Rtc { key, report }),
            Some(c) = self.replies.recv() => self.input(Input::Command(c)),
            Some(c) = self.inbox.streams.recv() => self.input(Input::Command(Command::Stream(c))),
            // Commands are read while closing too: an emit that took its credit just before
            // `close()` is still delivered.
            c = self.inbox.cmds.recv(), if commands => match c {
                Some(c) => {
                    self.input(Input::Command(c));
                    for _ in 0..DRAIN {
                        match self.inbox.cmds.try_recv() {
                            Ok(c) => self.input(Input::Command(c)),
                            Err(_) => break,
                        }
                    }
                }
                None => self.input(Input::HandlesGone),
            },
            _ = sleep => self.input(Input::Timeout),
        }
    }

    fn rtc_event(&mut self, key: u64, ev: RtcEvent) {
        if let Some(report) = report_of(ev) {
            self.input(Input::Rtc { key, report });
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Relay(batch) => self.relay.batch(batch),
                Output::Request(r) => self.relay.request(r),
                Output::Rtc { key, op } => self.rtc.apply(key, op),
                Output::IceServers(servers) => self.rtc.set_server_ice(servers),
                Output::Event(d) => self.deliver(d),
                Output::PeerEvent(e) => {
                    let _ = self.out.peer_events.send(e);
                }
                Output::Credit(op) => self.credit(op),
                Output::IncomingStream(parts) => {
                    let stream = P2pStream::from_parts(parts, self.out.stream_tx.clone());
                    // A full or closed queue drops it, which refuses it.
                    let _ = self.out.incoming.try_send(IncomingStream::new(stream));
                }
                Output::RunCall { service, call } => {
                    let back = self.replies_tx.clone();
                    tokio::spawn(async move {
                        let outcome =
                            crate::services::run_call(service, call.from, call.method, call.args)
                                .await;
                        let _ = back.send(Command::CallDone {
                            cid: call.cid,
                            outcome,
                        });
                    });
                }
                Output::Ready(r) => {
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(r);
                    }
                }
                Output::Stopped => {}
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let responder = d.ack_id.map(|ack_id| {
            Arc::new(Responder {
                send: self.responder.clone(),
                peer: d.from.id.clone(),
                ack_id,
                done: AtomicBool::new(false),
            })
        });
        let ev = Event {
            name: Arc::from(d.name.as_str()),
            from: d.from,
            payload: d.payload,
            transport: d.transport,
            responder,
        };
        // The core counts the room it was told, so the queue is not full; if the
        // application stopped reading (the queue is closed), the event is dropped.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.out.events.try_send(ev) {
            tracing::warn!("application event queue full; event dropped");
        }
    }

    fn credit(&self, op: CreditOp) {
        let c = &self.out.credits;
        match op {
            CreditOp::AddPeer(p) => c.add_peer(&p),
            CreditOp::RemovePeer(p) => c.remove_peer(&p),
            CreditOp::Release(p, n) => c.release(&p, n),
            CreditOp::SetRelay(p, on) => c.set_relay(&p, on),
            CreditOp::SetConnected(up) => c.set_connected(up),
            CreditOp::Close => c.close(),
        }
    }
}
