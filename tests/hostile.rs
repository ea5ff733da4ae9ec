//! Broken and hostile input against a live node that is linked to a real peer:
//! each gets a clear error or a closed connection, the node stays healthy, and
//! its link to the peer is never disturbed.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{linked_pair, wait_until};
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::protocol::{
    DType, Decoder, ErrorCode, Frame, FrameHeader, FrameType, Hello, HelloMessage, Limits, Message,
    Shard, Tensor,
};

const HANDSHAKE_TIMEOUT_S: f64 = 1.0;
const STALL_TIMEOUT_S: f64 = 1.0;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Reads until the node closes the connection; fails if it stays open 5 s.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "node kept a bad connection open"
        );
    }
}

fn hello() -> Vec<u8> {
    HelloMessage::Hello(Hello {
        node_id: "intruder".into(),
        expected_peer: String::new(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::unknown("intruder"),
    })
    .encode()
}

fn reject_of(bytes: &[u8]) -> (ErrorCode, String) {
    match HelloMessage::decode(bytes) {
        Ok(Some((HelloMessage::Reject(r), _))) => (r.code, r.message),
        other => panic!("expected a reject, got {other:?}"),
    }
}

/// Handshakes as a well-behaved node, sends `bytes`, returns the frames the
/// node answered with before closing.
fn after_handshake(port: u16, bytes: &[u8], finish_writing: bool) -> Vec<Frame> {
    let mut s = connect(port);
    s.write_all(&hello()).unwrap();
    s.write_all(bytes).unwrap();
    if finish_writing {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let got = read_until_closed(&mut s);
    let Ok(Some((HelloMessage::Hello(h), used))) = HelloMessage::decode(&got) else {
        panic!("no hello from the node")
    };
    assert_eq!(h.node_id, "mac1");
    let mut buf = BytesMut::from(&got[used..]);
    let mut decoder = Decoder::new(Limits::default());
    let mut frames = Vec::new();
    while let Ok(Some(f)) = decoder.decode(&mut buf) {
        frames.push(f);
    }
    frames
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match &f.message {
        Message::Error { code, .. } => Some(*code),
        _ => None,
    })
}

fn header(frame_type: FrameType, meta_len: u32, payload_len: u64) -> Vec<u8> {
    FrameHeader {
        frame_type,
        request_id: 9,
        meta_len,
        payload_len,
    }
    .encode()
    .to_vec()
}

#[test]
fn hostile_input_is_refused_and_the_real_link_survives() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = linked_pair(
        dir.path(),
        &[
            "--handshake-timeout",
            &HANDSHAKE_TIMEOUT_S.to_string(),
            "--stall-timeout",
            &STALL_TIMEOUT_S.to_string(),
        ],
    );
    let pa = a.node_port;

    // Stalls run alongside the rest: a stalled peer must not slow anyone else.
    let stalls = std::thread::spawn(move || {
        let mut silent = connect(pa);
        let start = Instant::now();
        read_until_closed(&mut silent);
        let silent_closed = start.elapsed();

        let mut half = connect(pa);
        half.write_all(&hello()[..5]).unwrap();
        read_until_closed(&mut half);

        let mut body = connect(pa);
        body.write_all(&hello()).unwrap();
        body.write_all(&header(FrameType::SendPrompt, 1000, 0))
            .unwrap();
        body.write_all(&[1, 2, 3]).unwrap();
        let start = Instant::now();
        read_until_closed(&mut body);
        (silent_closed, start.elapsed())
    });

    // Not our protocol at all.
    let mut s = connect(pa);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (code, message) = reject_of(&read_until_closed(&mut s));
    assert_eq!(code, ErrorCode::BadMagic, "{message}");

    // Another protocol version.
    let mut v9 = hello();
    v9[4] = 9;
    let mut s = connect(pa);
    s.write_all(&v9).unwrap();
    let (code, message) = reject_of(&read_until_closed(&mut s));
    assert_eq!(code, ErrorCode::VersionMismatch);
    assert!(
        message.contains("version 1") && message.contains("version 9"),
        "{message}"
    );

    // A hello announcing an absurd body.
    let mut huge = hello();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut s = connect(pa);
    s.write_all(&huge[..12]).unwrap();
    assert_eq!(reject_of(&read_until_closed(&mut s)).0, ErrorCode::TooLarge);

    // After a good handshake: every length field at its maximum.
    let frames = after_handshake(pa, &header(FrameType::SendTensor, 0, u64::MAX), false);
    assert_eq!(error_code(&frames), Some(ErrorCode::TooLarge));
    let frames = after_handshake(pa, &header(FrameType::SendTensor, u32::MAX, 0), false);
    assert_eq!(error_code(&frames), Some(ErrorCode::TooLarge));

    // Unknown frame type.
    let mut unknown = header(FrameType::HealthCheck, 0, 0);
    unknown[0] = 0x42;
    assert_eq!(
        error_code(&after_handshake(pa, &unknown, false)),
        Some(ErrorCode::UnknownType)
    );

    // A tensor whose bytes do not match its shape.
    let t = Tensor::new(DType::F32, vec![4, 4], vec![0u8; 64]).unwrap();
    let msg = Message::SendTensor {
        shard: Shard {
            model_sha256: "m".into(),
            start_layer: 0,
            end_layer: 0,
            n_layers: 1,
        },
        tensor: t,
        request_id: "r".into(),
        inference_state: None,
    };
    let mut bytes = msg.encode(3).to_vec();
    bytes.truncate(bytes.len() - 4);
    let short = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) - 4;
    bytes[16..24].copy_from_slice(&short.to_le_bytes());
    assert_eq!(
        error_code(&after_handshake(pa, &bytes, false)),
        Some(ErrorCode::ShapeMismatch)
    );

    // A frame cut off by the peer closing its side.
    let mut cut = header(FrameType::SendPrompt, 100, 0);
    cut.extend_from_slice(&[0u8; 10]);
    after_handshake(pa, &cut, true);

    // Garbage after a good handshake, and a good request in the same breath
    // before it: the good one is answered, then the connection is closed.
    let mut mixed = Message::HealthCheck.encode(1).to_vec();
    mixed.extend_from_slice(&[0xEE; 64]);
    let frames = after_handshake(pa, &mixed, false);
    assert!(frames
        .iter()
        .any(|f| f.request_id == 1
            && matches!(f.message, Message::HealthStatus { healthy: true, .. })));
    assert!(error_code(&frames).is_some());

    // Request id 0 is the connection-level Error's: a request with it ends
    // the connection unanswered.
    let frames = after_handshake(pa, &Message::HealthCheck.encode(0).to_vec(), false);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(
        matches!(&frames[0].message, Message::Error { code: ErrorCode::Malformed, message }
        if message.contains("request id 0 is reserved"))
    );

    // An id already in flight: the first request (a topology walk that asks
    // mac2, so it waits) is still answered, the second is refused with the
    // connection.
    let ask = Message::CollectTopology {
        visited: vec![],
        max_depth: 1,
    };
    let mut twice = ask.encode(4).to_vec();
    twice.extend(ask.encode(4).to_vec());
    let frames = after_handshake(pa, &twice, false);
    assert!(
        frames
            .iter()
            .any(|f| f.request_id == 4 && matches!(f.message, Message::Topology(_))),
        "{frames:?}"
    );
    assert!(frames.iter().any(|f| f.request_id == 0
        && matches!(&f.message, Message::Error { code: ErrorCode::Malformed, message }
            if message.contains("request id 4 is already in flight"))));

    // EOF in the middle of a frame: what was read before is answered, with no
    // Error (the stream just ended), then the node closes.
    let mut asked_then_cut = ask.encode(6).to_vec();
    asked_then_cut.extend_from_slice(&header(FrameType::SendPrompt, 100, 0)[..10]);
    let frames = after_handshake(pa, &asked_then_cut, true);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(frames[0].request_id == 6 && matches!(frames[0].message, Message::Topology(_)));

    // A hello announcing a metadata limit an Error could not fit in.
    let tiny = HelloMessage::Hello(Hello {
        node_id: "intruder".into(),
        expected_peer: String::new(),
        limits: Limits {
            max_meta: 100,
            max_payload: 1 << 20,
        },
        capabilities: DeviceCapabilities::unknown("intruder"),
    })
    .encode();
    let mut s = connect(pa);
    s.write_all(&tiny).unwrap();
    let (code, message) = reject_of(&read_until_closed(&mut s));
    assert_eq!(code, ErrorCode::Malformed);
    assert!(message.contains("at least 4096"), "{message}");

    // A response frame sent as if it were a request.
    let ack = Message::ResultAck.encode(5).to_vec();
    assert_eq!(
        error_code(&after_handshake(pa, &ack, false)),
        Some(ErrorCode::UnknownType)
    );

    let (silent, body) = stalls.join().unwrap();
    common::figure(&format!(
        "stalled handshake closed after {silent:?}; stalled body after {body:?}"
    ));
    // Dropped once the timeout has passed, and within "a few seconds" even on a
    // loaded machine.
    assert!(
        silent >= Duration::from_secs_f64(HANDSHAKE_TIMEOUT_S * 0.9)
            && silent < Duration::from_secs(6)
    );
    assert!(
        body >= Duration::from_secs_f64(STALL_TIMEOUT_S * 0.9) && body < Duration::from_secs(6)
    );

    // The node is healthy and its real link was never dropped.
    assert!(common::get_json(a.api_port, "/healthcheck").is_some());
    assert!(a.peer_up("mac2") && b.peer_up("mac1"));
    assert_eq!(
        a.peer("mac2").unwrap()["links"],
        1,
        "mac1's link to mac2 was disturbed"
    );
    assert_eq!(
        b.peer("mac1").unwrap()["links"],
        1,
        "mac2's link to mac1 was disturbed"
    );
    let log = a.log_text();
    assert!(
        log.contains("closed connection"),
        "refusals are logged:\n{log}"
    );
    // At most one line a second (plus the first), however many refusals.
    let lines = log
        .lines()
        .filter(|l| l.contains("closed connection"))
        .count();
    let allowed = started.elapsed().as_secs() as usize + 2;
    assert!(
        lines <= allowed,
        "{lines} refusal lines in {:?}:\n{log}",
        started.elapsed()
    );
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_link_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = linked_pair(dir.path(), &["--max-connections", "8"]);
    let pa = a.node_port;

    // mac2's own link holds one slot; 7 strangers fill the rest, the 8th is closed.
    let holders: Vec<TcpStream> = (0..7).map(|_| connect(pa)).collect();
    // An accepted stranger would be held until the 3 s handshake timeout; a
    // refused one is closed on arrival.
    wait_until(
        Duration::from_secs(10),
        "an extra connection to be closed at once",
        || {
            let mut extra = connect(pa);
            let start = Instant::now();
            read_until_closed(&mut extra).is_empty() && start.elapsed() < Duration::from_millis(500)
        },
    );
    assert!(a.peer_up("mac2") && b.peer_up("mac1"));
    assert_eq!(b.peer("mac1").unwrap()["links"], 1);
    assert!(a.log_text().contains("connection limit of 8 reached"));
    drop(holders);
}
