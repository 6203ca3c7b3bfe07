//! Tests of the reliable link: loss, reordering, go-back, windows, reassembly.
use super::*;

fn ev(i: u64) -> Msg {
    Msg::Event {
        event: "n".into(),
        ack_id: None,
        payload: WirePayload::Json(Bytes::from(i.to_string())),
    }
}

fn data_of(frame: &Bytes) -> (u64, bool, Msg) {
    match Frame::decode(frame) {
        Ok(Frame {
            body: Body::Data { seq, more, msg },
            ..
        }) => (seq, more, msg),
        other => panic!("not a data frame: {other:?}"),
    }
}

/// Runs two links over a lossy, reordering "wire" and checks exactly-once in-order delivery.
fn run(n: u64, drop_every: usize, window: usize) -> Vec<Msg> {
    let t0 = Instant::now();
    let mut a = Link::new("b", window, 1 << 20, t0);
    let mut b = Link::new("a", window, 1 << 20, t0);
    for i in 0..n {
        a.push(ev(i), true).ok();
    }
    let mut got = Vec::new();
    let mut now = t0;
    // Pseudo-random loss (a fixed pattern could line up with the retransmit batches).
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    for _round in 0..100_000 {
        let mut out = Vec::new();
        a.poll_transmit(&mut out, t0);
        let mut acks = Vec::new();
        for f in out {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if drop_every > 0 && (rng >> 33).is_multiple_of(drop_every as u64) {
                continue;
            }
            let (seq, more, msg) = data_of(&f);
            let (d, ack) = b.on_data(seq, more, msg, now);
            if let Some(Delivered::Msg(m)) = d {
                got.push(m);
                acks.extend(b.consume(seq, now));
            }
            acks.extend(ack);
        }
        now += Duration::from_millis(10);
        acks.extend(b.ack_due(now));
        for (upto, nack) in acks {
            a.on_ack(upto, nack, now);
        }
        a.on_tick(now);
        if a.backlog() == 0 {
            break;
        }
    }
    got
}

#[test]
fn delivers_in_order_without_loss() {
    let got = run(1000, 0, 16);
    assert_eq!(got.len(), 1000);
    assert_eq!(got, (0..1000).map(ev).collect::<Vec<_>>());
}

#[test]
fn recovers_from_drops() {
    for drop_every in [2, 3, 7, 50] {
        let got = run(500, drop_every, 8);
        let want: Vec<Msg> = (0..500).map(ev).collect();
        assert_eq!(got.len(), want.len(), "drop_every={drop_every}");
        assert!(
            got == want,
            "drop_every={drop_every}: wrong order or content"
        );
    }
}

#[test]
fn fragments_and_reassembles() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 1000, 1 << 20, t0);
    let mut b = Link::new("a", 1000, 1 << 20, t0);
    let big: Vec<u8> = (0..(CHUNK * 3 + 17)).map(|i| (i % 251) as u8).collect();
    let msg = Msg::Event {
        event: "f".into(),
        ack_id: std::num::NonZeroU64::new(4),
        payload: WirePayload::Binary(Bytes::from(big)),
    };
    a.push(msg.clone(), false).ok();
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.len(), 4);
    let mut got = None;
    for f in out {
        let (seq, more, m) = data_of(&f);
        if let (Some(d), _) = b.on_data(seq, more, m, t0) {
            b.consume(seq, t0);
            got = Some(d);
        }
    }
    assert_eq!(got, Some(Delivered::Msg(msg)));
}

#[test]
fn oversized_reassembly_is_refused() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 1000, 1 << 20, t0);
    let mut b = Link::new("a", 1000, CHUNK * 2, t0);
    let big = vec![7u8; CHUNK * 3];
    a.push(
        Msg::Event {
            event: "f".into(),
            ack_id: std::num::NonZeroU64::new(9),
            payload: WirePayload::Binary(Bytes::from(big)),
        },
        false,
    )
    .ok();
    a.push(ev(1), false).ok();
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    let mut got = Vec::new();
    for f in out {
        let (seq, more, m) = data_of(&f);
        if let (Some(d), _) = b.on_data(seq, more, m, t0) {
            got.push(d);
        }
    }
    assert!(matches!(
        got[0],
        Delivered::TooLarge {
            reply_to: Some(9),
            failed_reply: None,
            ..
        }
    ));
    assert_eq!(got[1], Delivered::Msg(ev(1)));
}

#[test]
fn unconsumed_messages_are_not_acknowledged() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 8, 1 << 20, t0);
    let mut b = Link::new("a", 8, 1 << 20, t0);
    for i in 0..3 {
        a.push(ev(i), true).ok();
    }
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    let mut seqs = Vec::new();
    for f in &out {
        let (seq, more, m) = data_of(f);
        let (d, ack) = b.on_data(seq, more, m, t0);
        assert!(d.is_some() && ack.is_none());
        seqs.push(seq);
    }
    let later = t0 + Duration::from_secs(1);
    assert_eq!(
        b.ack_due(later),
        None,
        "nothing taken, nothing acknowledged"
    );
    // A retransmission of a held frame is acknowledged only up to what was taken.
    let (seq, more, m) = data_of(&out[0]);
    assert_eq!(b.on_data(seq, more, m, later).1, Some((0, false)));
    assert_eq!(
        b.consume(seqs[0], later),
        None,
        "delayed: below a quarter window"
    );
    assert_eq!(b.ack_due(later + Duration::from_secs(1)), Some((1, false)));
    assert_eq!(b.consume(seqs[1], later), None);
    assert_eq!(
        b.consume(seqs[2], later),
        Some((3, false)),
        "a quarter window: at once"
    );
}

#[test]
fn a_burst_of_drop_reports_goes_back_once() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 100, 1 << 20, t0);
    for i in 0..100 {
        a.push(ev(i), true).ok();
    }
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.len(), 100);
    // The server dropped frames 10..=100 of that transmission: one go-back, not 91.
    let mut resent = 0;
    for seq in 10..=100 {
        a.on_dropped(seq, t0);
        out.clear();
        a.poll_transmit(&mut out, t0);
        resent += out.len();
    }
    assert_eq!(resent, 91);
    // Once acknowledged past that point, a new drop report counts again.
    a.on_ack(50, false, t0);
    a.on_dropped(60, t0);
    out.clear();
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.first().map(|f| data_of(f).0), Some(60));
}

#[test]
fn acks_release_only_counted_frames() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 64, 1 << 20, t0);
    let big = Msg::Event {
        event: "f".into(),
        ack_id: None,
        payload: WirePayload::Binary(Bytes::from(vec![1u8; CHUNK * 2 + 1])),
    };
    assert_eq!(
        frames_of(&WirePayload::Binary(Bytes::from(vec![0u8; CHUNK * 2 + 1]))),
        3
    );
    a.push(big, true).ok(); // seqs 1..=3, counted
    a.push(ev(1), false).ok(); // seq 4, a reply or stream message: not counted
    a.push(ev(2), true).ok(); // seq 5
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.len(), 5);
    assert_eq!(a.on_ack(2, false, t0), 2);
    assert_eq!(a.on_ack(2, false, t0), 0, "a repeated ack releases nothing");
    assert_eq!(a.on_ack(5, false, t0), 2);
    assert_eq!(a.backlog(), 0);
}

#[test]
fn window_limits_in_flight_and_transport_change_resends() {
    let t0 = Instant::now();
    let mut a = Link::new("b", 4, 1 << 20, t0);
    for i in 0..10 {
        a.push(ev(i), true).ok();
    }
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.len(), 4);
    out.clear();
    a.poll_transmit(&mut out, t0);
    assert!(out.is_empty());
    a.on_ack(2, false, t0);
    a.poll_transmit(&mut out, t0);
    assert_eq!(out.len(), 2);
    out.clear();
    a.on_transport_change(t0);
    a.poll_transmit(&mut out, t0);
    let seqs: Vec<u64> = out.iter().map(|f| data_of(f).0).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
}

#[test]
fn after_a_transport_change_the_first_resend_follows_the_measured_round_trip() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut a = Link::new("b", 64, 1 << 20, t0);
    // Nothing measured yet: the first timeout on the new transport is 40 ms.
    a.push(ev(0), true).ok();
    let mut out = Vec::new();
    a.poll_transmit(&mut out, t0);
    a.on_transport_change(t0);
    a.poll_transmit(&mut out, t0);
    assert_eq!(a.poll_timeout(), Some(t0 + ms(40)));
    // A 1 ms round trip measured: 2 × 1 ms + the 5 ms ack delay is below the 20 ms floor.
    a.on_ack(1, false, t0 + ms(1));
    a.push(ev(1), true).ok();
    let t1 = t0 + ms(10);
    a.poll_transmit(&mut out, t1);
    a.on_ack(2, false, t1 + ms(1));
    a.push(ev(2), true).ok();
    let t2 = t0 + ms(20);
    a.poll_transmit(&mut out, t2);
    a.on_transport_change(t2);
    out.clear();
    a.poll_transmit(&mut out, t2);
    assert_eq!(out.len(), 1);
    assert_eq!(a.poll_timeout(), Some(t2 + ms(20)));
    // The frame is resent then, and the timeout doubles as usual.
    a.on_tick(t2 + ms(20));
    out.clear();
    a.poll_transmit(&mut out, t2 + ms(20));
    assert_eq!(out.len(), 1);
    assert_eq!(a.poll_timeout(), Some(t2 + ms(60)));
}
