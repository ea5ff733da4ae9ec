//! `tensorlink-fuzz` (scripts/fuzz): millions of hostile inputs into the sans-IO
//! decoder on the stable toolchain — random bytes, mutated valid frames and
//! mutated hellos — counting panics and the largest single allocation any
//! decode makes, which must stay within the configured limits.
//!
//! (cargo-fuzz needs a nightly toolchain, which this project does not assume;
//! this driver is deterministic from its seed, so a failure replays exactly.)

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use bytes::BytesMut;
use clap::Parser;
use tensorlink::capabilities::{DeviceCapabilities, Flops};
use tensorlink::protocol::{
    Assignment, DType, Decoder, ErrorCode, Hello, HelloMessage, InferenceState, Limits, Message,
    Reject, RingContext, SamplingParams, Shard, Tensor,
};
use tensorlink::topology::{Edge, Topology};

#[path = "../../../../tests/common/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{peak_of, PeakAlloc};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const LIMITS: Limits = Limits {
    max_meta: 64 << 10,
    max_payload: 1 << 20,
};

#[derive(Parser)]
#[command(
    name = "tensorlink-fuzz",
    about = "Hostile inputs into the tensorlink decoder"
)]
struct Args {
    /// How many inputs.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of the input generator (the same seed replays the same inputs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut rng = fastrand::Rng::with_seed(args.seed);
    std::panic::set_hook(Box::new(|_| {})); // counted below, not printed 10 million times
    let start = Instant::now();
    let (mut panics, mut frames, mut errors, mut peak) = (0u64, 0u64, 0u64, 0usize);
    let (mut oversized, mut first_oversized) = (0u64, None);
    let mut first_panic = None;
    for i in 0..args.inputs {
        let input = generate(&mut rng);
        let mut buf = BytesMut::from(&input[..]);
        let (outcome, this_peak) = peak_of(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                let _ = HelloMessage::decode(&input);
                let mut decoder = Decoder::new(LIMITS);
                let mut n = 0u64;
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(_)) => n += 1,
                        Ok(None) => return (n, false),
                        Err(_) => return (n, true),
                    }
                }
            }))
        });
        peak = peak.max(this_peak);
        // A decode never allocates for bytes it has not seen: whatever the
        // lengths claim, at most about twice the input (strings copied out of
        // it, shapes, a topology's maps) plus small constant overhead.
        if this_peak > 2 * input.len() + 1024 {
            oversized += 1;
            first_oversized.get_or_insert((i, this_peak, input.len()));
        }
        match outcome {
            Ok((n, err)) => {
                frames += n;
                errors += err as u64;
            }
            Err(_) => {
                panics += 1;
                first_panic.get_or_insert(i);
            }
        }
        if i > 0 && i % 1_000_000 == 0 {
            eprintln!("fuzz: {i} inputs, {panics} panics, largest allocation {peak} bytes");
        }
    }
    let limit = (LIMITS.max_meta as u64 + LIMITS.max_payload) as usize;
    println!(
        "fuzz: {} inputs in {:.1} s (seed {}): {frames} frames decoded, {errors} inputs refused, {panics} panics, \
         largest allocation {peak} bytes (limit {limit}), {oversized} allocating beyond 2 × their size",
        args.inputs,
        start.elapsed().as_secs_f64(),
        args.seed
    );
    if let Some((i, bytes, len)) = first_oversized {
        println!("fuzz: {oversized} inputs allocated more than 2 × their size + 1 KiB; first: input {i}, {bytes} bytes for {len}");
    }
    if let Some(i) = first_panic {
        println!(
            "fuzz: first panic at input {i}: replay with --seed {} --inputs {}",
            args.seed,
            i + 1
        );
    }
    if panics > 0 || peak > limit || oversized > 0 {
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// One input: random bytes, a mutated stream of valid frames, or a mutated hello.
fn generate(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut bytes = match rng.u8(0..4) {
        0 => {
            let mut b = vec![0u8; rng.usize(0..512)];
            rng.fill(&mut b);
            b
        }
        1 if rng.bool() => HelloMessage::Reject(Reject {
            code: ErrorCode::from_u16(rng.u16(0..12)),
            message: text(rng, 0),
        })
        .encode(),
        1 => HelloMessage::Hello(Hello {
            node_id: text(rng, 1),
            expected_peer: text(rng, 0),
            limits: Limits {
                max_meta: rng.u32(..),
                max_payload: rng.u64(..),
            },
            capabilities: caps(rng),
        })
        .encode(),
        _ => (0..rng.usize(1..4))
            .flat_map(|_| message(rng).encode(rng.u64(..)).to_vec())
            .collect(),
    };
    mutate(rng, &mut bytes);
    bytes
}

fn mutate(rng: &mut fastrand::Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.usize(0..4) {
        if bytes.is_empty() {
            return;
        }
        let i = rng.usize(..bytes.len());
        match rng.u8(0..6) {
            0 => bytes[i] = rng.u8(..),
            1 => bytes[i] ^= 1 << rng.u8(0..8),
            2 => bytes.truncate(i),
            // A length field that lies: beyond the limits, or just within them
            // with nothing behind it (header lengths sit at 4..8 and 16..24).
            3 => {
                let at = [4usize, 8, 16][rng.usize(0..3)];
                let claim: u32 = match rng.u8(0..3) {
                    0 => 0xFF00_0000 | rng.u32(..0x00FF_FFFF),
                    1 => LIMITS.max_meta - rng.u32(0..2),
                    _ => LIMITS.max_payload as u32 - rng.u32(0..2),
                };
                if bytes.len() >= at + 4 {
                    bytes[at..at + 4].copy_from_slice(&claim.to_le_bytes());
                }
            }
            4 => {
                let extra: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
                bytes.splice(i..i, extra);
            }
            _ => {
                let j = rng.usize(..bytes.len());
                bytes.swap(i, j);
            }
        }
    }
}

fn text(rng: &mut fastrand::Rng, min: usize) -> String {
    (0..rng.usize(min..12))
        .map(|_| rng.alphanumeric())
        .collect()
}

fn caps(rng: &mut fastrand::Rng) -> DeviceCapabilities {
    DeviceCapabilities {
        model: text(rng, 0),
        chip: text(rng, 0),
        memory: rng.u64(..),
        flops: Flops {
            fp32: rng.f32(),
            fp16: rng.f32(),
            int8: rng.f32(),
        },
    }
}

fn tensor(rng: &mut fastrand::Rng) -> Tensor {
    let dtype = DType::ALL[rng.usize(..DType::ALL.len())];
    let shape: Vec<u64> = (0..rng.usize(0..4)).map(|_| rng.u64(0..5)).collect();
    let len = shape.iter().product::<u64>() as usize * dtype.size();
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    Tensor::new(dtype, shape, data).expect("length matches shape")
}

fn shard(rng: &mut fastrand::Rng) -> Shard {
    let n = rng.u32(1..64);
    let start = rng.u32(0..n);
    Shard {
        model_sha256: text(rng, 0),
        start_layer: start,
        end_layer: rng.u32(start..n),
        n_layers: n,
    }
}

fn message(rng: &mut fastrand::Rng) -> Message {
    let state = |rng: &mut fastrand::Rng| {
        rng.bool().then(|| InferenceState {
            position: rng.u64(..),
            context: rng.bool().then(|| RingContext {
                origin: text(rng, 0),
                ring: (0..rng.usize(0..4))
                    .map(|_| Assignment {
                        node_id: text(rng, 0),
                        start_layer: rng.u32(..),
                        end_layer: rng.u32(..),
                    })
                    .collect(),
                sampling: SamplingParams {
                    temperature: rng.f32(),
                    top_p: rng.f32(),
                    seed: rng.u64(..),
                },
                max_positions: rng.bool().then(|| rng.u64(..)),
                top_logprobs: rng.bool().then(|| rng.u32(..)),
            }),
        })
    };
    let opt_tensor = |rng: &mut fastrand::Rng| rng.bool().then(|| tensor(rng));
    match rng.u8(0..19) {
        0 => Message::HealthCheck,
        1 => Message::SendPrompt {
            shard: shard(rng),
            prompt: text(rng, 0),
            request_id: text(rng, 0),
            inference_state: state(rng),
        },
        2 => Message::SendTensor {
            shard: shard(rng),
            tensor: tensor(rng),
            request_id: text(rng, 0),
            inference_state: state(rng),
        },
        3 => Message::SendExample {
            shard: shard(rng),
            example: tensor(rng),
            target: tensor(rng),
            length: tensor(rng),
            train: rng.bool(),
            request_id: text(rng, 0),
        },
        4 => Message::CollectTopology {
            visited: (0..rng.usize(0..4)).map(|_| text(rng, 0)).collect(),
            max_depth: rng.u32(..),
        },
        5 => Message::SendResult {
            request_id: text(rng, 0),
            tokens: (0..rng.usize(0..8)).map(|_| rng.u32(..)).collect(),
            tensor: opt_tensor(rng),
            finished: rng.bool(),
        },
        6 => Message::SendOpaqueStatus {
            request_id: text(rng, 0),
            status: text(rng, 0),
        },
        7 => Message::HealthStatus {
            healthy: rng.bool(),
            status: text(rng, 0),
        },
        8 => Message::PromptResult(opt_tensor(rng)),
        9 => Message::TensorResult(opt_tensor(rng)),
        10 => Message::Loss {
            loss: rng.f32(),
            gradients: opt_tensor(rng),
        },
        11 => {
            let mut t = Topology::default();
            for _ in 0..rng.usize(0..3) {
                t.add_node(&text(rng, 1), caps(rng));
                t.add_edge(Edge {
                    from_id: text(rng, 1),
                    to_id: text(rng, 1),
                    description: text(rng, 0),
                });
            }
            Message::Topology(t)
        }
        12 => Message::ResultAck,
        13 => Message::StatusAck,
        14 => Message::QueryModelFile {
            sha256: text(rng, 0),
            name: text(rng, 0),
        },
        15 => Message::ReadModelFile {
            sha256: text(rng, 0),
            offset: rng.u64(..),
            len: rng.u32(..),
        },
        16 => Message::ModelFileInfo {
            name: text(rng, 0),
            sha256: text(rng, 0),
            size: rng.u64(..),
        },
        17 => Message::ModelBytes {
            offset: rng.u64(..),
            data: (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
        },
        _ => Message::Error {
            code: ErrorCode::from_u16(rng.u16(0..12)),
            message: text(rng, 0),
        },
    }
}
