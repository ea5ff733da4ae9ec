//! Property tests of the protocol: every message round-trips, arbitrary and
//! mutated bytes never panic nor allocate past the limits (through the
//! sans-IO `Decoder` and through `FrameReader`, which the node reads its
//! sockets with), and a stream fed one byte at a time decodes exactly as in
//! one piece.

use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use tensorlink::capabilities::{DeviceCapabilities, Flops};
use tensorlink::net::connection::{ConnectionError, FrameReader};
use tensorlink::protocol::frame::MIN_MAX_META;
use tensorlink::protocol::message::MAX_ERROR_MESSAGE;
use tensorlink::protocol::{
    Assignment, DType, Decoder, ErrorCode, Frame, FrameType, Hello, HelloMessage, InferenceState,
    Limits, Message, ProtocolError, Reject, RingContext, SamplingParams, Shard, Tensor,
};
use tensorlink::topology::{Edge, ModelInfo, Topology};

#[path = "common/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{peak_of, PeakAlloc};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const LIMITS: Limits = Limits {
    max_meta: 4096,
    max_payload: 64 << 10,
};

fn decode_all(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, ProtocolError> {
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = decoder.decode(&mut buf)? {
        frames.push(f);
    }
    Ok(frames)
}

fn decode_bytewise(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, ProtocolError> {
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &b in bytes {
        buf.extend_from_slice(&[b]);
        while let Some(f) = decoder.decode(&mut buf)? {
            frames.push(f);
        }
    }
    Ok(frames)
}

/// The node's socket path over the same bytes: `FrameReader` reading from
/// memory, to the end of the stream.
fn read_all(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, ConnectionError> {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
    }
    RT.with(|rt| {
        rt.block_on(async {
            let mut reader =
                FrameReader::new(bytes, BytesMut::new(), limits, Duration::from_secs(5));
            let mut frames = Vec::new();
            while let Some(f) = reader.read_frame(None).await? {
                frames.push(f);
            }
            Ok(frames)
        })
    })
}

/// What a reader of `limits` may allocate at most for one frame: its
/// metadata and payload, and one read chunk of slack.
fn allowance(limits: Limits) -> usize {
    limits.max_payload as usize + limits.max_meta as usize + (64 << 10)
}

// ---- strategies ----

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.:/é-]{0,24}"
}

fn finite() -> impl Strategy<Value = f32> {
    -1.0e6f32..1.0e6f32
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (
        prop::sample::select(DType::ALL.to_vec()),
        prop::collection::vec(0u64..5, 0..4),
    )
        .prop_flat_map(|(dtype, shape)| {
            let len = shape.iter().product::<u64>() as usize * dtype.size();
            prop::collection::vec(any::<u8>(), len)
                .prop_map(move |data| Tensor::new(dtype, shape.clone(), data).unwrap())
        })
}

fn shard() -> impl Strategy<Value = Shard> {
    (text(), 1u32..64).prop_flat_map(|(model_sha256, n)| {
        (0..n).prop_flat_map(move |start| {
            let model_sha256 = model_sha256.clone();
            (start..n).prop_map(move |end| Shard {
                model_sha256: model_sha256.clone(),
                start_layer: start,
                end_layer: end,
                n_layers: n,
            })
        })
    })
}

fn context() -> impl Strategy<Value = RingContext> {
    let hop = (text(), any::<u32>(), any::<u32>()).prop_map(|(node_id, start, end)| Assignment {
        node_id,
        start_layer: start,
        end_layer: end,
    });
    let sampling =
        (finite(), finite(), any::<u64>()).prop_map(|(temperature, top_p, seed)| SamplingParams {
            temperature,
            top_p,
            seed,
        });
    (
        text(),
        prop::collection::vec(hop, 0..6),
        sampling,
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(origin, ring, sampling, max_positions, top_logprobs)| RingContext {
                origin,
                ring,
                sampling,
                max_positions,
                top_logprobs,
            },
        )
}

fn state() -> impl Strategy<Value = Option<InferenceState>> {
    prop::option::of(
        (any::<u64>(), prop::option::of(context()))
            .prop_map(|(position, context)| InferenceState { position, context }),
    )
}

fn caps() -> impl Strategy<Value = DeviceCapabilities> {
    (text(), text(), any::<u64>(), finite(), finite(), finite()).prop_map(
        |(model, chip, memory, a, b, c)| DeviceCapabilities {
            model,
            chip,
            memory,
            flops: Flops {
                fp32: a,
                fp16: b,
                int8: c,
            },
        },
    )
}

fn topology() -> impl Strategy<Value = Topology> {
    (
        prop::collection::btree_map(text(), caps(), 0..4),
        prop::collection::vec((text(), text(), text()), 0..4),
        prop::option::of(text()),
        prop::collection::btree_map(text(), (text(), text(), any::<u32>()), 0..3),
    )
        .prop_map(|(nodes, edges, active, models)| {
            let mut t = Topology {
                nodes,
                ..Topology::default()
            };
            t.models = models
                .into_iter()
                .map(|(id, (name, sha256, n_layers))| {
                    let model = ModelInfo {
                        name,
                        sha256,
                        n_layers,
                    };
                    (id, model)
                })
                .collect();
            for (from_id, to_id, description) in edges {
                t.add_edge(Edge {
                    from_id,
                    to_id,
                    description,
                });
            }
            t.active_node_id = active;
            t
        })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (0u16..13).prop_map(ErrorCode::from_u16)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::HealthCheck),
        (shard(), text(), text(), state()).prop_map(
            |(shard, prompt, request_id, inference_state)| {
                Message::SendPrompt {
                    shard,
                    prompt,
                    request_id,
                    inference_state,
                }
            }
        ),
        (shard(), tensor(), text(), state()).prop_map(
            |(shard, tensor, request_id, inference_state)| {
                Message::SendTensor {
                    shard,
                    tensor,
                    request_id,
                    inference_state,
                }
            }
        ),
        (shard(), tensor(), tensor(), tensor(), any::<bool>(), text()).prop_map(
            |(shard, example, target, length, train, request_id)| Message::SendExample {
                shard,
                example,
                target,
                length,
                train,
                request_id
            }
        ),
        (prop::collection::vec(text(), 0..5), any::<u32>())
            .prop_map(|(visited, max_depth)| Message::CollectTopology { visited, max_depth }),
        (
            text(),
            prop::collection::vec(any::<u32>(), 0..8),
            prop::option::of(tensor()),
            any::<bool>()
        )
            .prop_map(
                |(request_id, tokens, tensor, finished)| Message::SendResult {
                    request_id,
                    tokens,
                    tensor,
                    finished
                }
            ),
        (text(), text())
            .prop_map(|(request_id, status)| Message::SendOpaqueStatus { request_id, status }),
        (any::<bool>(), text())
            .prop_map(|(healthy, status)| Message::HealthStatus { healthy, status }),
        prop::option::of(tensor()).prop_map(Message::PromptResult),
        prop::option::of(tensor()).prop_map(Message::TensorResult),
        (finite(), prop::option::of(tensor()))
            .prop_map(|(loss, gradients)| Message::Loss { loss, gradients }),
        topology().prop_map(Message::Topology),
        Just(Message::ResultAck),
        Just(Message::StatusAck),
        (text(), text()).prop_map(|(sha256, name)| Message::QueryModelFile { sha256, name }),
        (text(), any::<u64>(), any::<u32>()).prop_map(|(sha256, offset, len)| {
            Message::ReadModelFile {
                sha256,
                offset,
                len,
            }
        }),
        (text(), text(), any::<u64>()).prop_map(|(name, sha256, size)| Message::ModelFileInfo {
            name,
            sha256,
            size
        }),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(offset, data)| {
            Message::ModelBytes {
                offset,
                data: data.into(),
            }
        }),
        (error_code(), text()).prop_map(|(code, message)| Message::Error { code, message }),
    ]
}

fn hello() -> impl Strategy<Value = HelloMessage> {
    prop_oneof![
        (
            "[a-z0-9]{1,16}",
            "[a-z0-9]{0,16}",
            MIN_MAX_META..,
            any::<u64>(),
            caps()
        )
            .prop_map(
                |(node_id, expected_peer, max_meta, max_payload, capabilities)| {
                    HelloMessage::Hello(Hello {
                        node_id,
                        expected_peer,
                        limits: Limits {
                            max_meta,
                            max_payload,
                        },
                        capabilities,
                    })
                }
            ),
        (error_code(), text())
            .prop_map(|(code, message)| HelloMessage::Reject(Reject { code, message })),
    ]
}

fn encode_stream(messages: &[(u64, Message)]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|(id, m)| m.encode(*id).to_vec())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn messages_round_trip_whole_and_bytewise(msgs in prop::collection::vec((any::<u64>(), message()), 1..4)) {
        let bytes = encode_stream(&msgs);
        let whole = decode_all(&bytes, Limits::default()).unwrap();
        let bytewise = decode_bytewise(&bytes, Limits::default()).unwrap();
        let read = read_all(&bytes, Limits::default()).unwrap();
        let expected: Vec<Frame> = msgs.into_iter().map(|(request_id, message)| Frame { request_id, message }).collect();
        prop_assert_eq!(&whole, &expected);
        prop_assert_eq!(&bytewise, &expected);
        prop_assert_eq!(&read, &expected);
    }
}

// The hostile-input properties get the most cases: 60 000 each, 120 000 in all.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(60_000))]

    #[test]
    fn arbitrary_bytes_never_panic_nor_overallocate(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (_, peak) = peak_of(|| decode_all(&bytes, LIMITS));
        prop_assert!(peak <= LIMITS.max_payload as usize + LIMITS.max_meta as usize, "allocated {peak} bytes");
        let (_, peak) = peak_of(|| read_all(&bytes, LIMITS));
        prop_assert!(peak <= allowance(LIMITS), "FrameReader allocated {peak} bytes");
        let (_, peak) = peak_of(|| HelloMessage::decode(&bytes));
        prop_assert!(peak <= 64 << 10, "hello allocated {peak} bytes");
    }

    #[test]
    fn mutated_frames_never_panic_nor_overallocate(
        msg in message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = msg.encode(7).to_vec();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let keep = cut.index(bytes.len() + 1);
        let (result, peak) = peak_of(|| decode_all(&bytes[..keep], LIMITS));
        prop_assert!(peak <= LIMITS.max_payload as usize + LIMITS.max_meta as usize, "allocated {peak} bytes");
        let (read, peak) = peak_of(|| read_all(&bytes[..keep], LIMITS));
        prop_assert!(peak <= allowance(LIMITS), "FrameReader allocated {peak} bytes");
        // The socket path accepts exactly what the sans-IO decoder accepts
        // (a cut mid-frame is an error for a stream that ends there).
        match (&result, &read) {
            (Ok(frames), Ok(read)) => prop_assert_eq!(frames, read),
            (Ok(_), Err(ConnectionError::TruncatedStream)) => {}
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "Decoder {a:?} but FrameReader {b:?}"),
        }
        // Whatever decodes must itself re-encode to a decodable frame.
        if let Ok(frames) = result {
            for f in frames {
                let again = decode_all(&f.message.encode(f.request_id).to_vec(), Limits::default()).unwrap();
                prop_assert_eq!(again, vec![f]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn hellos_round_trip_and_survive_mutation(h in hello(), flip in any::<(prop::sample::Index, u8)>()) {
        let bytes = h.encode();
        let (decoded, used) = HelloMessage::decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decoded, h);
        for n in 0..bytes.len() {
            prop_assert!(matches!(HelloMessage::decode(&bytes[..n]), Ok(None)), "prefix of {n} bytes is incomplete");
        }
        let mut bad = bytes.clone();
        let i = flip.0.index(bad.len());
        bad[i] = flip.1;
        let _ = HelloMessage::decode(&bad);
    }
}

#[test]
fn every_dtype_holds_its_size_in_bytes() {
    for dtype in DType::ALL {
        let t = Tensor::new(dtype, vec![2, 3], vec![7u8; 6 * dtype.size()]).unwrap();
        assert_eq!(t.data().len(), 6 * dtype.size());
        assert!(Tensor::new(dtype, vec![2, 3], vec![7u8; 6 * dtype.size() + 1]).is_err());
    }
}

/// docs/PROTOCOL.md §5.1, code by code. The match has no wildcard: a new
/// frame type does not compile until the spec's code for it is written here.
fn spec_code(t: FrameType) -> u8 {
    match t {
        FrameType::HealthCheck => 0x01,
        FrameType::SendPrompt => 0x02,
        FrameType::SendTensor => 0x03,
        FrameType::SendExample => 0x04,
        FrameType::CollectTopology => 0x05,
        FrameType::SendResult => 0x06,
        FrameType::SendOpaqueStatus => 0x07,
        FrameType::QueryModelFile => 0x08,
        FrameType::ReadModelFile => 0x09,
        FrameType::HealthStatus => 0x81,
        FrameType::PromptResult => 0x82,
        FrameType::TensorResult => 0x83,
        FrameType::Loss => 0x84,
        FrameType::Topology => 0x85,
        FrameType::ResultAck => 0x86,
        FrameType::StatusAck => 0x87,
        FrameType::ModelFileInfo => 0x88,
        FrameType::ModelBytes => 0x89,
        FrameType::Error => 0xFF,
    }
}

#[test]
fn every_frame_type_round_trips_through_its_spec_code() {
    let spec: &[u8] = &[
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86,
        0x87, 0x88, 0x89, 0xFF,
    ];
    for code in 0..=255u8 {
        match FrameType::from_code(code) {
            Ok(t) => {
                assert!(spec.contains(&code), "{code:#04x} is not in the spec");
                assert_eq!(spec_code(t), code, "{t:?}");
                assert_eq!(t.is_request(), code < 0x80, "{t:?}");
                // A request's response is its code with the top bit set.
                match t.response() {
                    Some(r) => assert_eq!(spec_code(r), code | 0x80, "{t:?}"),
                    None => assert!(!t.is_request(), "{t:?} has no response"),
                }
            }
            Err(ProtocolError::UnknownFrameType(c)) => {
                assert_eq!(c, code);
                assert!(!spec.contains(&code), "the spec's {code:#04x} is refused");
            }
            Err(e) => panic!("{code:#04x}: {e}"),
        }
    }
}

#[test]
fn shape_and_length_must_agree() {
    assert!(matches!(
        Tensor::new(DType::F32, vec![2, 2], vec![0u8; 15]),
        Err(ProtocolError::ShapeMismatch {
            expected: 16,
            actual: 15
        })
    ));
    // A frame whose payload is one byte short of its shape is refused on decode.
    let t = Tensor::new(DType::F16, vec![4], vec![1u8; 8]).unwrap();
    let shard = Shard {
        model_sha256: "m".into(),
        start_layer: 0,
        end_layer: 0,
        n_layers: 1,
    };
    let msg = Message::SendTensor {
        shard,
        tensor: t,
        request_id: "r".into(),
        inference_state: None,
    };
    let mut bytes = msg.encode(1).to_vec();
    bytes.pop();
    let payload_len_at = 16;
    let len = u64::from_le_bytes(
        bytes[payload_len_at..payload_len_at + 8]
            .try_into()
            .unwrap(),
    ) - 1;
    bytes[payload_len_at..payload_len_at + 8].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode_all(&bytes, Limits::default()),
        Err(ProtocolError::ShapeMismatch { .. })
    ));
}

#[test]
fn limits_are_checked_before_the_body_arrives() {
    let big = Message::HealthCheck.encode(1);
    let mut head = big.head.to_vec();
    head[16..24].copy_from_slice(&(LIMITS.max_payload + 1).to_le_bytes());
    // Only the 24 header bytes: the verdict must not wait for the body.
    let err = decode_all(&head[..24], LIMITS).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::TooLarge {
                what: "frame payload",
                ..
            }
        ),
        "{err}"
    );
    head[16..24].copy_from_slice(&0u64.to_le_bytes());
    head[4..8].copy_from_slice(&(LIMITS.max_meta + 1).to_le_bytes());
    assert!(matches!(
        decode_all(&head[..24], LIMITS),
        Err(ProtocolError::TooLarge {
            what: "frame metadata",
            ..
        })
    ));
}

#[test]
fn bad_magic_version_and_type_are_named() {
    let hello = HelloMessage::Reject(Reject {
        code: ErrorCode::Busy,
        message: "x".into(),
    })
    .encode();
    let mut wrong_magic = hello.clone();
    wrong_magic[0] = b'X';
    assert!(matches!(
        HelloMessage::decode(&wrong_magic[..1]),
        Err(ProtocolError::BadMagic(_))
    ));
    let mut v2 = HelloMessage::Hello(Hello {
        node_id: "a".into(),
        expected_peer: "b".into(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::default(),
    })
    .encode();
    v2[4] = 2;
    let err = HelloMessage::decode(&v2).unwrap_err();
    assert_eq!(err, ProtocolError::VersionMismatch { ours: 1, theirs: 2 });
    assert!(err.to_string().contains("version 1") && err.to_string().contains("version 2"));
    // §3.1's order: the kind before the version, the version before the body's
    // length, and all three before the body has arrived.
    let mut kind_and_version = v2.clone();
    kind_and_version[6] = 9;
    assert!(matches!(
        HelloMessage::decode(&kind_and_version[..12]),
        Err(ProtocolError::UnknownHelloKind(9))
    ));
    let mut version_and_length = v2.clone();
    version_and_length[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        HelloMessage::decode(&version_and_length[..12]),
        Err(ProtocolError::VersionMismatch { ours: 1, theirs: 2 })
    );
    let mut frame = Message::HealthCheck.encode(1).to_vec();
    frame[0] = 0x42;
    assert_eq!(
        decode_all(&frame, LIMITS),
        Err(ProtocolError::UnknownFrameType(0x42))
    );
}

/// A Hello may not announce a metadata limit below 4096 bytes, and no Error
/// needs more: its message is cut to 1024 bytes.
#[test]
fn every_error_fits_the_least_metadata_limit_a_hello_may_announce() {
    let hello = |max_meta| {
        HelloMessage::Hello(Hello {
            node_id: "a".into(),
            expected_peer: String::new(),
            limits: Limits {
                max_meta,
                max_payload: 1,
            },
            capabilities: DeviceCapabilities::unknown("a"),
        })
        .encode()
    };
    assert!(matches!(
        HelloMessage::decode(&hello(MIN_MAX_META - 1)),
        Err(ProtocolError::Malformed(why)) if why.contains("4096")
    ));
    assert!(HelloMessage::decode(&hello(MIN_MAX_META))
        .unwrap()
        .is_some());

    // Long messages, with multi-byte characters across the cut.
    for len in [
        MAX_ERROR_MESSAGE - 1,
        MAX_ERROR_MESSAGE,
        MAX_ERROR_MESSAGE + 1,
        1 << 20,
    ] {
        for filler in ["x", "é", "日本"] {
            let long: String = filler.repeat(len / filler.len() + 1);
            let frame = Message::error(ErrorCode::Internal, long.clone()).encode(9);
            let least = Limits {
                max_meta: MIN_MAX_META,
                max_payload: 0,
            };
            assert!(least.admits(&frame).is_ok(), "{len} × {filler}");
            let Message::Error { message, .. } = decode_all(&frame.to_vec(), least).unwrap()[0]
                .message
                .clone()
            else {
                panic!("not an Error");
            };
            assert!(message.len() <= MAX_ERROR_MESSAGE);
            if long.len() <= MAX_ERROR_MESSAGE {
                assert_eq!(message, long);
            } else {
                assert!(message.ends_with('…'));
                assert!(long.starts_with(message.trim_end_matches('…')));
            }
        }
    }
}

/// The bytes of a worked example in docs/PROTOCOL.md §10: the hex dump under
/// `heading`, as a second implementation would read it.
fn worked_example(heading: &str) -> Vec<u8> {
    let spec =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let section = &spec[spec.find(heading).expect("the example's heading")..];
    let dump = section.split("```").nth(1).expect("the example's hex dump");
    dump.lines()
        .flat_map(|line| line.split_whitespace().skip(1))
        .map(|byte| u8::from_str_radix(byte, 16).unwrap())
        .collect()
}

#[test]
fn the_worked_send_tensor_example_is_what_a_node_writes_and_reads() {
    let msg = Message::SendTensor {
        shard: Shard {
            model_sha256: "m".into(),
            start_layer: 0,
            end_layer: 15,
            n_layers: 32,
        },
        tensor: Tensor::new(
            DType::F32,
            vec![2, 3],
            [1f32, 2., 3., 4., 5., 6.]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap(),
        request_id: "r1".into(),
        inference_state: Some(InferenceState {
            position: 3,
            context: None,
        }),
    };
    let spec = worked_example("### 10.3 SendTensor");
    assert_eq!(spec.len(), 99);
    assert_eq!(msg.encode(2).to_vec(), spec);
    let frames = decode_all(&spec, Limits::default()).unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!((frames[0].request_id, &frames[0].message), (2, &msg));
}

#[test]
fn the_worked_model_file_read_and_its_answer_are_what_a_node_writes_and_reads() {
    let read = Message::ReadModelFile {
        sha256: "m".into(),
        offset: 0,
        len: 8,
    };
    let answer = Message::ModelBytes {
        offset: 0,
        data: b"GGUF\x03\x00\x00\x00".as_slice().into(),
    };
    for (msg, heading, len) in [
        (read, "### 10.7 ReadModelFile", 41),
        (answer, "### 10.8 ModelBytes", 40),
    ] {
        let spec = worked_example(heading);
        assert_eq!(spec.len(), len, "{heading}");
        assert_eq!(msg.encode(3).to_vec(), spec, "{heading}");
        let frames = decode_all(&spec, Limits::default()).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].request_id, &frames[0].message), (3, &msg));
    }
}
