//! The origin's loop (`Inference::generate`) and a shard's forwarding
//! (`Inference::answer`) over a fake ring: nodes in this process, each with
//! the real test model, joined by a [`Ring`] that carries messages between
//! them by calling the receiver directly and that can cut a link. No sockets,
//! no node: what each node is sent is recorded and checked.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::model::test_model;
use common::wait_until;
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::inference::ring::BoxFuture;
use tensorlink::inference::runtime::MAX_STEP_TOKENS;
use tensorlink::inference::{
    GenerateRequest, Generation, Inference, InferenceError, LoadOptions, Ring, SamplingParams,
    StreamEvent,
};
use tensorlink::net::client::RequestError;
use tensorlink::protocol::{FrameType, Message};
use tensorlink::topology::{Edge, Topology};

/// What one node was sent: the frame and, for a step, its position.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    to: String,
    frame: FrameType,
    position: Option<u64>,
}

/// Every node of the fake cluster, the links that are up, and what was sent.
struct World {
    nodes: BTreeMap<String, Inference>,
    up: Mutex<BTreeSet<(String, String)>>,
    sent: Mutex<Vec<Sent>>,
    /// Steps after which every link goes down, as a cable pulled mid-request.
    cut_after: Mutex<Option<usize>>,
    /// MiB each node offers the model.
    memory: Mutex<u64>,
}

impl World {
    fn new(ids: &[&str]) -> Arc<World> {
        let model = test_model();
        let nodes = ids
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    Inference::load(id, &model, &LoadOptions::default()).unwrap(),
                )
            })
            .collect();
        let up = ids
            .iter()
            .flat_map(|a| ids.iter().map(move |b| (a.to_string(), b.to_string())))
            .filter(|(a, b)| a != b)
            .collect();
        Arc::new(World {
            nodes,
            up: Mutex::new(up),
            sent: Mutex::new(Vec::new()),
            cut_after: Mutex::new(None),
            memory: Mutex::new(16 << 10),
        })
    }

    fn ring(self: &Arc<Self>, me: &str) -> Arc<dyn Ring> {
        Arc::new(FakeRing {
            me: me.to_owned(),
            world: self.clone(),
        })
    }

    fn node(&self, id: &str) -> &Inference {
        &self.nodes[id]
    }

    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
}

struct FakeRing {
    me: String,
    world: Arc<World>,
}

impl Ring for FakeRing {
    fn topology(&self) -> BoxFuture<'_, Topology> {
        let mut topo = Topology::default();
        for (id, inference) in &self.world.nodes {
            let caps = DeviceCapabilities {
                memory: *self.world.memory.lock().unwrap(),
                ..DeviceCapabilities::unknown(id)
            };
            topo.add_node(id, caps);
            topo.models.insert(id.clone(), inference.info().clone());
        }
        for (from, to) in self.world.up.lock().unwrap().iter() {
            topo.add_edge(Edge {
                from_id: from.clone(),
                to_id: to.clone(),
                description: "fake".into(),
            });
        }
        topo.active_node_id = Some(self.me.clone());
        Box::pin(std::future::ready(topo))
    }

    fn send(
        &self,
        to: &str,
        message: Message,
    ) -> Option<BoxFuture<'static, Result<Message, RequestError>>> {
        let world = self.world.clone();
        if !world
            .up
            .lock()
            .unwrap()
            .contains(&(self.me.clone(), to.to_owned()))
        {
            return None;
        }
        let position = match &message {
            Message::SendTensor {
                inference_state, ..
            } => inference_state.as_ref().map(|s| s.position),
            _ => None,
        };
        let steps = {
            let mut sent = world.sent.lock().unwrap();
            sent.push(Sent {
                to: to.to_owned(),
                frame: message.frame_type(),
                position,
            });
            sent.iter()
                .filter(|s| s.frame == FrameType::SendTensor)
                .count()
        };
        if world.cut_after.lock().unwrap().is_some_and(|n| steps > n) {
            world.up.lock().unwrap().clear();
            return Some(Box::pin(std::future::ready(Err(RequestError::Closed(
                "connection lost: the cable was pulled".into(),
            )))));
        }
        let to = to.to_owned();
        Some(Box::pin(async move {
            let node = world.node(&to).clone();
            let answer = match message {
                Message::SendOpaqueStatus { request_id, status } => {
                    node.status(&request_id, &status);
                    Message::StatusAck
                }
                step => node.answer(step, world.ring(&to)).await,
            };
            match answer {
                Message::Error { code, message } => Err(RequestError::Remote { code, message }),
                other => Ok(other),
            }
        }))
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        },
        stop: Vec::new(),
        top_logprobs: None,
    }
}

/// Text and the outcome of a generation, read to its end.
async fn collect(mut generation: Generation) -> (String, Result<Vec<u32>, InferenceError>) {
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            StreamEvent::Text { text: t, .. } => text.push_str(&t),
            StreamEvent::Done(summary) => return (text, Ok(summary.tokens)),
            StreamEvent::Failed(e) => return (text, Err(e)),
        }
    }
    panic!("the generation ended without Done or Failed");
}

fn prompt(world: &World, words: usize) -> Vec<u32> {
    let text = "cables link the Macs together ".repeat(words / 5 + 1);
    world.node("a").tokenizer().encode(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_goes_round_the_fake_ring_in_steps_and_every_node_is_told_the_end() {
    let solo = World::new(&["a"]);
    let long = prompt(&solo, 700);
    assert!(long.len() > MAX_STEP_TOKENS, "{} tokens", long.len());
    let generation = solo
        .node("a")
        .generate(solo.ring("a"), greedy(long.clone(), 6))
        .await
        .unwrap();
    let (solo_text, solo_tokens) = collect(generation).await;
    let solo_tokens = solo_tokens.unwrap();
    assert_eq!(solo_tokens.len(), 6);
    assert!(solo.sent().is_empty(), "one node sends nothing");

    let pair = World::new(&["a", "b"]);
    let generation = pair
        .node("a")
        .generate(pair.ring("a"), greedy(long.clone(), 6))
        .await
        .unwrap();
    let ring: Vec<_> = generation
        .ring
        .iter()
        .map(|a| (a.node_id.as_str(), a.start_layer, a.end_layer))
        .collect();
    let n = pair.node("a").info().n_layers;
    assert_eq!(ring, [("a", 0, n / 2 - 1), ("b", n / 2, n - 1)]);
    let (text, tokens) = collect(generation).await;
    assert_eq!(
        tokens.unwrap(),
        solo_tokens,
        "split or not, the same tokens"
    );
    assert_eq!(text, solo_text);

    // b gets the hidden states of each step: the prompt in steps of at most
    // MAX_STEP_TOKENS, then one position per generated token.
    let steps: Vec<u64> = pair
        .sent()
        .iter()
        .filter(|s| s.frame == FrameType::SendTensor)
        .map(|s| {
            assert_eq!(s.to, "b");
            s.position.unwrap()
        })
        .collect();
    let p = long.len() as u64;
    let mut expected = vec![0, MAX_STEP_TOKENS as u64];
    expected.extend((0..5).map(|i| p + i));
    assert_eq!(steps, expected);
    wait_until(Duration::from_secs(5), "b to free the request", || {
        pair.node("b").active_requests() == 0
    });
    assert_eq!(pair.node("a").active_requests(), 0);
    assert!(pair
        .sent()
        .iter()
        .any(|s| s.to == "b" && s.frame == FrameType::SendOpaqueStatus));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_mid_request_fails_it_naming_the_link() {
    let world = World::new(&["a", "b"]);
    *world.cut_after.lock().unwrap() = Some(3);
    let generation = world
        .node("a")
        .generate(world.ring("a"), greedy(prompt(&world, 10), 20))
        .await
        .unwrap();
    let (_, outcome) = collect(generation).await;
    match outcome {
        Err(InferenceError::Unavailable(why)) => assert!(
            why.contains("node `a` lost its link to node `b` mid-request")
                && why.contains("the cable was pulled"),
            "{why}"
        ),
        other => panic!("expected the lost link, got {other:?}"),
    }
    assert_eq!(world.node("a").active_requests(), 0, "the origin frees it");

    // With the link gone, a new request cannot be planned, and says why.
    let refused = world
        .node("a")
        .generate(world.ring("a"), greedy(prompt(&world, 10), 2))
        .await;
    match refused {
        Err(InferenceError::Unavailable(why)) => {
            assert!(why.contains("has no link to node `b`"), "{why}")
        }
        Err(e) => panic!("expected no link, got {e}"),
        Ok(_) => panic!("a ring without its link was planned"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_leaves_ends_the_request_on_every_node() {
    let world = World::new(&["a", "b"]);
    let mut generation = world
        .node("a")
        .generate(world.ring("a"), greedy(prompt(&world, 10), 200))
        .await
        .unwrap();
    // The first text means b holds a cache for the request.
    match generation.events.recv().await {
        Some(StreamEvent::Text { .. }) => {}
        other => panic!("expected text first, got {other:?}"),
    }
    assert_eq!(world.node("b").active_requests(), 1);
    drop(generation);
    wait_until(
        Duration::from_secs(10),
        "every node to free the cancelled request",
        || world.node("a").active_requests() == 0 && world.node("b").active_requests() == 0,
    );
    let steps = world
        .sent()
        .iter()
        .filter(|s| s.frame == FrameType::SendTensor)
        .count();
    assert!(steps < 200, "the loop stopped early ({steps} steps)");
}

/// Log-probabilities come back from the last shard through every hop, one
/// per token, with the same tokens as without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_travel_back_through_the_ring_with_each_token() {
    let world = World::new(&["a", "b"]);
    let ids = prompt(&world, 10);
    let plain = world
        .node("a")
        .generate(world.ring("a"), greedy(ids.clone(), 8))
        .await
        .unwrap();
    let (_, want) = collect(plain).await;
    let mut generation = world
        .node("a")
        .generate(
            world.ring("a"),
            GenerateRequest {
                top_logprobs: Some(3),
                ..greedy(ids, 8)
            },
        )
        .await
        .unwrap();
    assert_eq!(generation.ring.len(), 2, "both nodes run layers");
    let mut listed = Vec::new();
    let tokens = loop {
        match generation.events.recv().await.unwrap() {
            StreamEvent::Text { logprobs, .. } => listed.extend(logprobs),
            StreamEvent::Done(summary) => break summary.tokens,
            StreamEvent::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(tokens, want.unwrap());
    let eog = tokens
        .iter()
        .filter(|&&t| world.node("a").tokenizer().is_end_of_generation(t))
        .count();
    assert_eq!(listed.len(), tokens.len() - eog);
    for (lp, &token) in listed.iter().zip(&tokens) {
        assert_eq!(lp.token.0, token);
        assert_eq!(lp.top.len(), 3);
        // Greedy: the sampled token is the likeliest.
        assert_eq!(lp.top[0], lp.token, "{lp:?}");
    }
}

/// A split whose layers and one full-context cache do not fit a node's memory
/// is refused before any step, naming the node, the figures and what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_a_node_cannot_hold_is_refused_naming_it() {
    let world = World::new(&["a", "b"]);
    *world.memory.lock().unwrap() = 64;
    let refused = world
        .node("a")
        .generate(world.ring("a"), greedy(prompt(&world, 5), 4))
        .await
        .err()
        .expect("refused");
    let message = refused.to_string();
    assert!(
        matches!(refused, InferenceError::Unavailable(_)),
        "{message}"
    );
    for says in [
        "node `a` would run layers 0–14",
        "more than the 64.0 MiB it offers",
        "--memory-limit",
    ] {
        assert!(message.contains(says), "`{says}` in: {message}");
    }
    assert!(world.sent().is_empty(), "no step was sent");
}
