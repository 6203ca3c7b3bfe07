//! Two cores wired back to back through a fake server and fake peer connections, on a
//! fake clock: lossless switching, resume, glare, timeouts and retry, without sockets.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use socketio_p2p_signaling::protocol::{
    BatchWriter, Frame, Op, PeerInfo, Response, RoomPeers, SignalFrom, Welcome, WirePayload,
    split_batch,
};

use super::*;
use crate::options::P2pOptions;

/// What the test sees of one core's application side.
#[derive(Default)]
struct App {
    events: Vec<(String, Json)>,
    peer_events: Vec<PeerEvent>,
    ready: Option<Result<PeerInfo>>,
}

struct Side {
    core: Core,
    id: String,
    app: App,
    /// Open fake peer connections: key → (peer connection key on the other side).
    conns: HashMap<u64, Option<u64>>,
    online: bool,
    registered: bool,
}

/// The world: two cores, a server that answers and relays, and fake peer connections.
struct World {
    now: Instant,
    sides: [Side; 2],
    /// Relay batches in flight (to side index), held while `hold_relay` is set.
    relay_queue: VecDeque<(usize, Bytes)>,
    hold_relay: bool,
    /// The fake WebRTC stack answers offers (false: it hangs).
    rtc_works: bool,
    /// The fake data channels carry frames (false: they drop everything silently).
    dc_works: bool,
    /// The fake stack reports a local candidate before the offer or answer it belongs to,
    /// as webrtc-rs does when it trickles.
    early_candidates: bool,
    /// Remote candidates each side's stack was given.
    candidates_added: [usize; 2],
}

fn opts() -> P2pOptions {
    P2pOptions::default()
        .auto_upgrade(false)
        .retry_backoff(Duration::from_millis(500), Duration::from_secs(4))
}

fn payload(n: u64) -> WirePayload {
    Payload::Json(json!(n))
        .to_wire()
        .unwrap_or_else(|_| unreachable!())
}

impl World {
    fn new(a: P2pOptions, b: P2pOptions) -> Self {
        let now = Instant::now();
        let side = |o: P2pOptions, id: &str| Side {
            core: Core::new(o, now),
            id: id.into(),
            app: App::default(),
            conns: HashMap::new(),
            online: true,
            registered: false,
        };
        let mut w = World {
            now,
            sides: [side(a, "a"), side(b, "b")],
            relay_queue: VecDeque::new(),
            hold_relay: false,
            rtc_works: true,
            dc_works: true,
            early_candidates: false,
            candidates_added: [0; 2],
        };
        for i in 0..2 {
            w.input(i, Input::Net(NetIn::Connected));
        }
        w.settle();
        w
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.now;
        self.sides[i].core.handle_input(input, now);
    }

    fn command(&mut self, i: usize, c: Command) {
        self.input(i, Input::Command(c));
        self.settle();
    }

    /// Routes outputs until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..2 {
                while let Some(o) = self.sides[i].core.poll_output() {
                    moved = true;
                    self.route(i, o);
                }
            }
            if !self.hold_relay
                && let Some((to, batch)) = self.relay_queue.pop_front()
            {
                moved = true;
                if self.sides[to].online {
                    self.input(to, Input::Net(NetIn::Batch(batch)));
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the cores never settled");
    }

    fn route(&mut self, i: usize, o: Output) {
        let other = 1 - i;
        match o {
            Output::Relay(batch) => {
                if !self.sides[i].online {
                    return;
                }
                // The server stamps the sender on every frame.
                let frames = split_batch(&batch).unwrap_or_default();
                let mut out = BatchWriter::new();
                for f in frames {
                    let Ok(mut frame) = Frame::decode(&f) else {
                        panic!("bad frame")
                    };
                    frame.from = self.sides[i].id.clone();
                    out.push(&frame.encode().unwrap_or_else(|_| unreachable!()));
                }
                self.relay_queue.push_back((other, out.take()));
            }
            Output::Request(r) => self.serve(i, r),
            Output::Rtc { key, op } => self.rtc(i, key, op),
            Output::Event(d) => {
                let v = match d.payload {
                    Payload::Json(v) => v,
                    _ => Json::Null,
                };
                self.sides[i].app.events.push((d.name, v));
            }
            Output::PeerEvent(e) => self.sides[i].app.peer_events.push(e),
            Output::Ready(r) => self.sides[i].app.ready = Some(r),
            Output::Credit(_)
            | Output::IncomingStream(_)
            | Output::RunCall { .. }
            | Output::IceServers(_)
            | Output::Stopped => {}
        }
    }

    /// The fake server: hello → welcome (both peers in one room), signals relayed.
    fn serve(&mut self, i: usize, r: Request) {
        if !self.sides[i].online {
            return;
        }
        let other = 1 - i;
        let mut announce = false;
        let ok = match r.op {
            Op::Hello { resume, .. } => {
                // Like the server: the welcome lists registered peers, who then hear of
                // the newcomer.
                let them = PeerInfo {
                    id: self.sides[other].id.clone(),
                    uid: None,
                };
                let peers = match self.sides[other].registered {
                    true => vec![them],
                    false => vec![],
                };
                announce = self.sides[other].registered && !self.sides[i].registered;
                self.sides[i].registered = true;
                let w = Welcome {
                    id: self.sides[i].id.clone(),
                    uid: None,
                    rooms: vec![RoomPeers {
                        room: "default".into(),
                        peers,
                        more: false,
                    }],
                    max_frame: 1 << 20,
                    token: "t".into(),
                    continued: resume.is_some(),
                    ice_servers: Vec::new(),
                };
                serde_json::to_value(w).unwrap_or_default()
            }
            Op::Signal { to: _, signal } => {
                let s = SignalFrom {
                    from: self.sides[i].id.clone(),
                    signal,
                };
                let v = serde_json::to_value(s).unwrap_or_default();
                self.input(other, Input::Net(NetIn::Signal(v)));
                Json::Null
            }
            _ => Json::Null,
        };
        let resp = Response {
            rid: r.rid,
            ok: Some(ok),
            error: None,
        };
        let v = serde_json::to_value(resp).unwrap_or_default();
        self.input(i, Input::Net(NetIn::Response(v)));
        if announce {
            let p = json!({"type": "joined", "room": "default", "peer": {"id": self.sides[i].id}});
            self.input(other, Input::Net(NetIn::Presence(p)));
        }
    }

    /// The fake WebRTC stack: offers and answers go through, channels open at once.
    fn rtc(&mut self, i: usize, key: u64, op: RtcOp) {
        let other = 1 - i;
        if self.early_candidates && matches!(op, RtcOp::Offer | RtcOp::Accept(_)) && self.rtc_works
        {
            let c = Signal::Candidate {
                candidate: format!("candidate:{key} 1 udp 1 127.0.0.1 {} typ host", 5000 + key),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
                username_fragment: None,
            };
            let report = RtcReport::Candidate(c);
            self.input(i, Input::Rtc { key, report });
        }
        let report = match op {
            RtcOp::Offer if self.rtc_works => {
                self.sides[i].conns.insert(key, None);
                Some(RtcReport::Offer(format!("offer-{key}")))
            }
            RtcOp::Accept(_) if self.rtc_works => {
                self.sides[i].conns.insert(key, None);
                Some(RtcReport::Answer(format!("answer-{key}")))
            }
            RtcOp::Offer | RtcOp::Accept(_) => None,
            RtcOp::Answer(_) => {
                // Both ends open: pair the newest connection of each side.
                let theirs = self.sides[other].conns.keys().max().copied();
                if let Some(k) = theirs {
                    self.sides[i].conns.insert(key, Some(k));
                    self.sides[other].conns.insert(k, Some(key));
                    self.input(
                        i,
                        Input::Rtc {
                            key,
                            report: RtcReport::Open,
                        },
                    );
                    self.input(
                        other,
                        Input::Rtc {
                            key: k,
                            report: RtcReport::Open,
                        },
                    );
                }
                None
            }
            RtcOp::Send { frame, .. } => {
                let peer_key = self.sides[i].conns.get(&key).copied().flatten();
                if let Some(k) = peer_key
                    && self.dc_works
                {
                    self.input(
                        other,
                        Input::Rtc {
                            key: k,
                            report: RtcReport::Frame(frame),
                        },
                    );
                }
                None
            }
            RtcOp::Close => {
                self.sides[i].conns.remove(&key);
                None
            }
            RtcOp::Path => Some(RtcReport::Path(crate::stats::CandidatePair {
                local: crate::stats::CandidateKind::Host,
                remote: crate::stats::CandidateKind::Host,
                tcp: false,
            })),
            RtcOp::Candidate(_) => {
                self.candidates_added[i] += 1;
                None
            }
        };
        if let Some(report) = report {
            self.input(i, Input::Rtc { key, report });
        }
    }

    /// Moves the clock forward in small steps, firing what is due.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = (0..2)
                .filter_map(|i| self.sides[i].core.poll_timeout())
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    for i in 0..2 {
                        if self.sides[i]
                            .core
                            .poll_timeout()
                            .is_some_and(|t| t <= self.now)
                        {
                            self.input(i, Input::Timeout);
                        }
                    }
                    self.settle();
                }
                _ => break,
            }
        }
        self.now = end;
    }

    fn emit(&mut self, i: usize, n: u64) {
        let to = self.sides[1 - i].id.clone();
        self.command(
            i,
            Command::Emit {
                targets: vec![to],
                event: "n".into(),
                payload: payload(n),
                frames: 1,
            },
        );
    }

    fn numbers(&self, i: usize) -> Vec<u64> {
        self.sides[i]
            .app
            .events
            .iter()
            .filter_map(|(_, v)| v.as_u64())
            .collect()
    }

    fn transport(&mut self, i: usize) -> Transport {
        let slot = Arc::new(Mutex::new(None));
        let s = slot.clone();
        let peer = self.sides[1 - i].id.clone();
        self.command(
            i,
            Command::Transport {
                peer,
                reply: Box::new(move |r| *s.lock().unwrap_or_else(|e| e.into_inner()) = r.ok()),
            },
        );
        let t = *slot.lock().unwrap_or_else(|e| e.into_inner());
        t.unwrap_or(Transport::Relay)
    }

    fn upgrade(&mut self) {
        self.command(
            0,
            Command::Upgrade {
                peer: None,
                done: None,
            },
        );
        self.command(
            1,
            Command::Upgrade {
                peer: None,
                done: None,
            },
        );
    }
}

#[test]
fn both_sides_get_ready_and_meet_in_the_room() {
    let w = World::new(opts(), opts());
    for s in &w.sides {
        assert!(matches!(s.app.ready, Some(Ok(_))));
        assert!(
            s.app
                .peer_events
                .iter()
                .any(|e| matches!(e, PeerEvent::Joined { .. }))
        );
    }
}

#[test]
fn relay_delivers_in_order() {
    let mut w = World::new(opts(), opts());
    for n in 0..300 {
        w.emit(0, n);
    }
    w.advance(Duration::from_millis(50));
    assert_eq!(w.numbers(1), (0..300).collect::<Vec<_>>());
}

#[test]
fn both_start_and_the_smaller_id_offers() {
    let mut w = World::new(opts(), opts());
    w.upgrade();
    assert_eq!(w.transport(0), Transport::DataChannel);
    assert_eq!(w.transport(1), Transport::DataChannel);
    // One connection each: the glare resolved to a's offer.
    assert_eq!(w.sides[0].conns.len(), 1);
    assert_eq!(w.sides[1].conns.len(), 1);
}

#[test]
fn candidates_found_before_the_sdp_follow_it() {
    let mut w = World::new(opts(), opts());
    w.early_candidates = true;
    w.upgrade();
    assert_eq!(w.transport(0), Transport::DataChannel);
    // The remote ignores a candidate that comes before the offer or answer: each side's
    // candidate waited for its SDP, so each stack got the other's.
    assert_eq!(w.candidates_added, [1, 1]);
}

#[test]
fn switching_to_the_data_channel_loses_and_duplicates_nothing() {
    let mut w = World::new(opts(), opts());
    // Frames are on their way through the relay when the channel opens...
    w.hold_relay = true;
    for n in 0..100 {
        w.emit(0, n);
    }
    w.upgrade();
    for n in 100..200 {
        w.emit(0, n);
    }
    // ...and the relay delivers its copies late.
    w.hold_relay = false;
    w.settle();
    w.advance(Duration::from_secs(1));
    assert_eq!(w.numbers(1), (0..200).collect::<Vec<_>>());
}

#[test]
fn a_dead_channel_falls_back_to_the_relay_and_upgrades_again() {
    let mut w = World::new(opts().auto_upgrade(true), opts().auto_upgrade(true));
    w.settle();
    assert_eq!(w.transport(0), Transport::DataChannel);
    // The path dies silently: nothing passes, nobody says bye.
    w.dc_works = false;
    w.rtc_works = false;
    for n in 0..50 {
        w.emit(0, n);
    }
    assert!(w.numbers(1).is_empty());
    // Liveness: silent for dc_timeout (3 s) is dead, then the relay takes over.
    w.advance(Duration::from_secs(4));
    assert_eq!(w.numbers(1), (0..50).collect::<Vec<_>>());
    assert!(
        w.sides[0]
            .app
            .peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::Downgraded { .. }))
    );
    // With a working path again, a retry (backoff from 500 ms) brings the channel back.
    w.dc_works = true;
    w.rtc_works = true;
    // (An attempt that started while the stack was still broken times out first.)
    w.advance(Duration::from_secs(20));
    assert_eq!(w.transport(0), Transport::DataChannel);
    w.emit(0, 50);
    assert_eq!(w.numbers(1), (0..51).collect::<Vec<_>>());
}

#[test]
fn a_hung_webrtc_stack_times_out_and_the_relay_carries_on() {
    let mut w = World::new(opts(), opts());
    w.rtc_works = false;
    w.upgrade();
    for n in 0..10 {
        w.emit(0, n);
    }
    assert_eq!(w.numbers(1), (0..10).collect::<Vec<_>>());
    w.advance(Duration::from_secs(6));
    assert!(
        w.sides[0]
            .app
            .peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::UpgradeFailed { .. }))
    );
    assert_eq!(w.transport(0), Transport::Relay);
}

#[test]
fn an_ack_without_reply_times_out_on_the_clock() {
    let mut w = World::new(opts(), opts());
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    w.command(
        0,
        Command::EmitAck {
            peer: "b".into(),
            event: "q".into(),
            payload: payload(1),
            frames: 1,
            timeout: Duration::from_secs(2),
            reply: Box::new(move |r| *g.lock().unwrap_or_else(|e| e.into_inner()) = Some(r)),
        },
    );
    // b's application holds the event and never replies.
    w.advance(Duration::from_millis(1900));
    assert!(got.lock().unwrap_or_else(|e| e.into_inner()).is_none());
    w.advance(Duration::from_millis(200));
    let r = got.lock().unwrap_or_else(|e| e.into_inner()).take();
    assert!(matches!(r, Some(Err(Error::Timeout(_)))), "{r:?}");
}

#[test]
fn resume_after_a_lost_connection_resends_what_the_relay_lost() {
    let mut w = World::new(opts(), opts());
    w.emit(0, 0);
    // a's connection breaks; what it sends meanwhile is lost on the way.
    w.input(0, Input::Net(NetIn::Closed));
    w.sides[0].online = false;
    for n in 1..20 {
        w.emit(0, n);
    }
    assert!(
        w.sides[0]
            .app
            .peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::Reconnecting))
    );
    w.sides[0].online = true;
    w.input(0, Input::Net(NetIn::Connected));
    w.settle();
    w.advance(Duration::from_secs(1));
    assert_eq!(w.numbers(1), (0..20).collect::<Vec<_>>());
    assert!(
        w.sides[0]
            .app
            .peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::Reconnected { continued: true }))
    );
}

#[test]
fn an_idle_core_needs_no_timer() {
    let mut w = World::new(opts(), opts());
    w.emit(0, 1);
    w.advance(Duration::from_secs(1));
    assert_eq!(w.sides[0].core.poll_timeout(), None);
    assert_eq!(w.sides[1].core.poll_timeout(), None);
}

#[test]
fn a_full_application_queue_holds_events_and_their_acks() {
    let mut w = World::new(opts(), opts());
    w.sides[1].core.set_room(5, 64);
    for n in 0..20 {
        w.emit(0, n);
    }
    w.advance(Duration::from_millis(100));
    assert_eq!(w.numbers(1), (0..5).collect::<Vec<_>>());
    assert!(w.sides[1].core.has_held());
    w.sides[1].core.set_room(100, 64);
    w.input(1, Input::Room);
    w.settle();
    assert_eq!(w.numbers(1), (0..20).collect::<Vec<_>>());
}

#[test]
fn stats_follow_the_path_and_say_why_an_upgrade_failed() {
    let mut w = World::new(opts(), opts());
    let stats = |w: &mut World| {
        let slot = Arc::new(Mutex::new(None));
        let s = slot.clone();
        w.command(
            0,
            Command::Stats {
                peer: "b".into(),
                reply: Box::new(move |r| *s.lock().unwrap_or_else(|e| e.into_inner()) = r.ok()),
            },
        );
        let got = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        got.unwrap_or_else(|| panic!("no stats"))
    };
    w.upgrade();
    for n in 0..10 {
        w.emit(0, n);
    }
    w.advance(Duration::from_millis(100));
    let s = stats(&mut w);
    assert_eq!(s.transport, Transport::DataChannel);
    assert_eq!(s.path, crate::stats::Path::Direct);
    assert!(s.candidates.is_some());
    assert!(s.frames_sent >= 10 && s.bytes_sent > 0 && s.frames_received > 0);
    assert!(s.rtt.is_some());
    assert_eq!(s.upgrades, 1);
    assert!(w.sides[0].app.peer_events.iter().any(|e| matches!(
        e,
        PeerEvent::PathChanged {
            path: crate::stats::Path::Direct,
            ..
        }
    )));
    w.command(
        0,
        Command::Downgrade {
            peer: "b".into(),
            done: Box::new(|_| {}),
        },
    );
    let s = stats(&mut w);
    assert_eq!(s.path, crate::stats::Path::Relay);
    assert_eq!(
        s.last_upgrade_failure,
        Some(crate::stats::UpgradeFailure::Application)
    );
    // An upgrade that gets no channel in time says so.
    w.rtc_works = false;
    w.command(
        0,
        Command::Upgrade {
            peer: None,
            done: None,
        },
    );
    w.advance(Duration::from_secs(6));
    let s = stats(&mut w);
    assert_eq!(
        s.last_upgrade_failure,
        Some(crate::stats::UpgradeFailure::Timeout)
    );
}
