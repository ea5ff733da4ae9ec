//! The cluster as one node sees it: nodes with their capabilities and the links
//! between them, in the JSON shape exo's `/topology` serves, so existing tools
//! and the web UI read it unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capabilities::DeviceCapabilities;

/// A directed link: `from_id` holds a healthy connection to `to_id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Edge {
    pub from_id: String,
    pub to_id: String,
    pub description: String,
}

/// The model a node holds: what the partition and the hash check need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The file name without `.gguf`, for people.
    pub name: String,
    /// sha256 of the whole file, for machines: nodes agree on this or not at all.
    pub sha256: String,
    pub n_layers: u32,
}

/// Ordered maps keep the JSON and the wire encoding deterministic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: BTreeMap<String, DeviceCapabilities>,
    /// Edges grouped by the node they leave, as exo does.
    pub peer_graph: BTreeMap<String, Vec<Edge>>,
    pub active_node_id: Option<String>,
    /// Node id → the model it holds; nodes without a model are absent. Not in
    /// exo's shape; its clients ignore the extra key.
    #[serde(default)]
    pub models: BTreeMap<String, ModelInfo>,
}

impl Topology {
    pub fn add_node(&mut self, id: &str, caps: DeviceCapabilities) {
        self.nodes.insert(id.to_owned(), caps);
    }

    /// Adds an edge once; a second report of the same link replaces the first.
    pub fn add_edge(&mut self, edge: Edge) {
        let edges = self.peer_graph.entry(edge.from_id.clone()).or_default();
        match edges.iter_mut().find(|e| e.to_id == edge.to_id) {
            Some(existing) => *existing = edge,
            None => {
                edges.push(edge);
                edges.sort();
            }
        }
    }

    pub fn edges(&self) -> impl Iterator<Item = &Edge> {
        self.peer_graph.values().flatten()
    }

    /// Folds in what a peer reported. What this node saw itself wins for its own
    /// entry: a peer's view of us is second-hand.
    pub fn merge(&mut self, own_id: &str, other: Topology) {
        for (id, caps) in other.nodes {
            if id != own_id {
                self.nodes.insert(id, caps);
            }
        }
        for (id, model) in other.models {
            if id != own_id {
                self.models.insert(id, model);
            }
        }
        for edge in other.peer_graph.into_values().flatten() {
            if edge.from_id != own_id {
                self.add_edge(edge);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: &str, to: &str) -> Edge {
        Edge {
            from_id: from.into(),
            to_id: to.into(),
            description: "test".into(),
        }
    }

    #[test]
    fn merge_keeps_own_view_and_adds_remote_links() {
        let mut mine = Topology::default();
        mine.add_node("a", DeviceCapabilities::unknown("a-model"));
        mine.add_edge(edge("a", "b"));
        let mut theirs = Topology::default();
        theirs.add_node("a", DeviceCapabilities::unknown("stale"));
        theirs.add_node("c", DeviceCapabilities::unknown("c-model"));
        theirs.add_edge(edge("a", "z"));
        theirs.add_edge(edge("b", "c"));
        mine.merge("a", theirs);
        assert_eq!(mine.nodes["a"].model, "a-model");
        assert!(mine.nodes.contains_key("c"));
        let edges: Vec<_> = mine
            .edges()
            .map(|e| (e.from_id.as_str(), e.to_id.as_str()))
            .collect();
        assert_eq!(edges, vec![("a", "b"), ("b", "c")]);
    }

    #[test]
    fn json_has_exo_shape() {
        let mut t = Topology::default();
        t.add_node("mac1", DeviceCapabilities::unknown("Mac"));
        t.add_edge(edge("mac1", "mac2"));
        t.active_node_id = Some("mac1".into());
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["nodes"]["mac1"]["flops"]["fp16"], 0.0);
        assert_eq!(v["peer_graph"]["mac1"][0]["to_id"], "mac2");
        assert_eq!(v["active_node_id"], "mac1");
    }
}
