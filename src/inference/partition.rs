//! Which node runs which layers: exo's memory-weighted ring. Nodes are ordered
//! by memory (largest first, then id), and each takes a run of layers in
//! proportion to its memory. A pure function of the node list, so every node
//! that sees the same topology computes the same ring.

pub use crate::protocol::Assignment;

/// `nodes` are `(id, memory in MiB)`. Nodes whose share rounds to no layer
/// are left out of the ring. Integer arithmetic, so no two machines can round
/// a boundary differently.
pub fn memory_weighted(nodes: &[(String, u64)], n_layers: u32) -> Vec<Assignment> {
    let mut nodes: Vec<(String, u64)> = nodes.to_vec();
    // Unknown memory everywhere: share alike rather than refuse.
    if nodes.iter().all(|(_, m)| *m == 0) {
        for node in &mut nodes {
            node.1 = 1;
        }
    }
    nodes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    nodes.dedup_by(|a, b| a.0 == b.0);
    let total: u128 = nodes.iter().map(|(_, m)| u128::from(*m)).sum();
    let n = u128::from(n_layers);
    let mut ring = Vec::new();
    let mut before: u128 = 0;
    for (i, (id, memory)) in nodes.iter().enumerate() {
        let start = (before * n / total) as u32;
        before += u128::from(*memory);
        let end = if i + 1 == nodes.len() {
            n_layers
        } else {
            (before * n / total) as u32
        };
        if end > start {
            ring.push(Assignment {
                node_id: id.clone(),
                start_layer: start,
                end_layer: end - 1,
            });
        }
    }
    ring
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(id, m)| (id.to_string(), *m)).collect()
    }

    #[test]
    fn splits_by_memory_largest_first() {
        let ring = memory_weighted(&nodes(&[("mac2", 16384), ("mac1", 32768)]), 30);
        let got: Vec<_> = ring
            .iter()
            .map(|a| (a.node_id.as_str(), a.start_layer, a.end_layer))
            .collect();
        assert_eq!(got, [("mac1", 0, 19), ("mac2", 20, 29)]);
    }

    #[test]
    fn equal_memory_splits_evenly_in_id_order() {
        let ring = memory_weighted(&nodes(&[("c", 8), ("a", 8), ("b", 8)]), 30);
        let got: Vec<_> = ring
            .iter()
            .map(|a| (a.node_id.as_str(), a.start_layer, a.end_layer))
            .collect();
        assert_eq!(got, [("a", 0, 9), ("b", 10, 19), ("c", 20, 29)]);
    }

    #[test]
    fn a_tiny_node_gets_no_layers_and_unknown_memory_shares_alike() {
        // As in exo, the last (smallest) node takes what is left, so it is the
        // one before it whose share can round to nothing.
        let ring = memory_weighted(&nodes(&[("big", 1000), ("b", 1), ("c", 1)]), 30);
        let got: Vec<_> = ring
            .iter()
            .map(|a| (a.node_id.as_str(), a.start_layer, a.end_layer))
            .collect();
        assert_eq!(got, [("big", 0, 28), ("c", 29, 29)]);
        let ring = memory_weighted(&nodes(&[("x", 0), ("y", 0)]), 3);
        assert_eq!(ring.len(), 2);
    }

    proptest! {
        /// Whatever the memories and their order: the ring covers every layer
        /// exactly once, in order, and does not depend on the input order.
        #[test]
        fn covers_every_layer_once_whatever_the_order(
            mems in prop::collection::vec(0u64..200_000, 1..8),
            n_layers in 1u32..200,
            rotate in 0usize..8,
        ) {
            let list: Vec<(String, u64)> =
                mems.iter().enumerate().map(|(i, m)| (format!("n{i}"), *m)).collect();
            let ring = memory_weighted(&list, n_layers);
            let mut next = 0;
            for a in &ring {
                prop_assert_eq!(a.start_layer, next);
                prop_assert!(a.end_layer >= a.start_layer);
                next = a.end_layer + 1;
            }
            prop_assert_eq!(next, n_layers);
            let mut rotated = list.clone();
            rotated.rotate_left(rotate % list.len());
            prop_assert_eq!(memory_weighted(&rotated, n_layers), ring);
        }
    }
}
