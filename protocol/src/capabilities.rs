//! What a node can do, as exo describes it: model, chip, memory and peak flops.
//!
//! A node detects its own capabilities and sends them in its hello, so every
//! node shows the same figures for a given machine; a peer file's
//! `device_capabilities` only stand in until that peer is first reached.
//! Detection itself is the node's (`tensorlink::capabilities::detect`).

use serde::{Deserialize, Serialize};

/// Peak throughput in TFLOPS, as exo's `DeviceFlops`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Flops {
    pub fp32: f32,
    pub fp16: f32,
    pub int8: f32,
}

/// Missing fields in a peer file default to exo's "unknown device".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceCapabilities {
    pub model: String,
    pub chip: String,
    /// Total memory in MiB, as exo reports it.
    pub memory: u64,
    pub flops: Flops,
}

impl Default for DeviceCapabilities {
    fn default() -> Self {
        DeviceCapabilities::unknown("Unknown Model")
    }
}

impl DeviceCapabilities {
    pub fn unknown(model: &str) -> Self {
        DeviceCapabilities {
            model: model.to_owned(),
            chip: "Unknown Chip".to_owned(),
            memory: 0,
            flops: Flops::default(),
        }
    }
}
