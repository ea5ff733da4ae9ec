//! `/cluster`: the cluster as the web UI draws it: each node with its memory,
//! its model, the layers the current partition gives it and the health of the
//! link to it, plus the reason inference cannot run, if there is one, and
//! how the fetch of a missing model stands.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

use super::Shared;
use crate::cluster::TOPOLOGY_DEPTH;
use crate::fetch::status::FetchStatus;
use crate::peers::LinkState;
use crate::power::PowerStatus;

#[derive(Serialize)]
pub struct ClusterView {
    model: Option<ModelView>,
    self_id: String,
    nodes: Vec<NodeView>,
    problem: Option<String>,
    /// Requests with a cache on this node: zero once every request has ended
    /// or been cancelled.
    active_requests: usize,
    /// Whether this node keeps its Mac from sleeping, and why.
    power: PowerStatus,
    /// The model's fetch from a peer, while it runs and after it is done.
    fetch: Option<FetchStatus>,
}

#[derive(Serialize)]
struct ModelView {
    id: String,
    sha256: String,
    n_layers: u32,
    /// Where this node runs its layers: `metal`, or `cpu` (also when Metal was
    /// not available to it, as for a LaunchDaemon with nobody logged in).
    device: &'static str,
}

#[derive(Serialize)]
struct NodeView {
    id: String,
    chip: String,
    memory_mib: u64,
    model_sha256: Option<String>,
    layers: Option<[u32; 2]>,
    /// `self`, `up`, `connecting` or `refused` for this node's own peers;
    /// `up` for nodes seen only through another node.
    link: &'static str,
}

pub async fn cluster(State(app): Shared) -> Json<ClusterView> {
    let node = &app.cluster;
    let topology = node.collect_topology(BTreeSet::new(), TOPOLOGY_DEPTH).await;
    let inference = app.inference();
    let fetch = app.model.fetch_status();
    let (ring, problem) = match &inference {
        None => (Vec::new(), Some(app.no_model())),
        Some(inference) => match inference.plan(&topology) {
            Ok(ring) => (ring, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        },
    };
    let layers: BTreeMap<&str, [u32; 2]> = ring
        .iter()
        .map(|a| (a.node_id.as_str(), [a.start_layer, a.end_layer]))
        .collect();
    let views = node.peers().views();
    let mut nodes: Vec<NodeView> = topology
        .nodes
        .iter()
        .map(|(id, caps)| NodeView {
            id: id.clone(),
            chip: caps.chip.clone(),
            memory_mib: caps.memory,
            model_sha256: topology.models.get(id).map(|m| m.sha256.clone()),
            layers: layers.get(id.as_str()).copied(),
            link: if id == node.id() {
                "self"
            } else {
                views
                    .iter()
                    .find(|v| &v.id == id)
                    .map_or("up", |v| link_name(v.state))
            },
        })
        .collect();
    // Configured peers that are down are not in the topology, but the user
    // wants to see them, red.
    for v in views.iter().filter(|v| !topology.nodes.contains_key(&v.id)) {
        nodes.push(NodeView {
            id: v.id.clone(),
            chip: v.device_capabilities.chip.clone(),
            memory_mib: v.device_capabilities.memory,
            model_sha256: None,
            layers: None,
            link: match v.state {
                LinkState::Up => "up",
                _ => "down",
            },
        });
    }
    Json(ClusterView {
        active_requests: inference.as_ref().map_or(0, |i| i.active_requests()),
        model: inference.map(|i| ModelView {
            id: i.info().name.clone(),
            sha256: i.info().sha256.clone(),
            n_layers: i.info().n_layers,
            device: i.device_name(),
        }),
        self_id: node.id().to_owned(),
        nodes,
        problem,
        power: app.power.status(),
        fetch,
    })
}

fn link_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Up => "up",
        LinkState::Connecting => "connecting",
        LinkState::Refused => "refused",
    }
}
