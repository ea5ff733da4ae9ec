//! The `tensorlink-node` command line: exo's flags as the seed uses them, so the
//! seed's `python -m exo.main …` line works with only the program name changed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::inference::fingerprint;
use crate::inference::memory::default_limit_mib;
use crate::inference::LoadOptions;
use crate::node::NodeConfig;
use crate::peers::LinkTiming;
use crate::protocol::Limits;
use crate::server::ServerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "tensorlink-node",
    version,
    about = "A tensorlink node: links to its peers and runs a model split across them",
    long_about = "A tensorlink node: links to the peers in its peer file (normally the loopback ends \
of ssh tunnels), speaks the tensorlink binary tensor protocol on --node-port, runs its layers of the \
model (--model) and serves on --chatgpt-api-port: the web UI (/), OpenAI's chat API \
(/v1/chat/completions, /v1/models), the cluster as the UI draws it (/cluster), and \
/healthcheck, /topology and /peers.\n\nLog level: TENSORLINK_LOG (e.g. info, debug, \
tensorlink::peers=debug)."
)]
pub struct Args {
    /// This node's id: the key the other nodes' peer files use for it. Defaults to the host name.
    #[arg(long, value_name = "ID", default_value_t = default_node_id(), value_parser = parse_node_id)]
    pub node_id: String,

    /// Address the node protocol listens on. Loopback by default: the ssh tunnel is the
    /// door between Macs. Listening wider is an explicit choice.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub node_host: IpAddr,

    /// Port of the node protocol (what peers' files and tunnels point at).
    #[arg(long, value_name = "PORT", default_value_t = 50051, value_parser = clap::value_parser!(u16).range(1..))]
    pub node_port: u16,

    /// Address the HTTP API listens on.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub api_host: IpAddr,

    /// Port of the HTTP API (exo's default: 52415).
    #[arg(long = "chatgpt-api-port", value_name = "PORT", default_value_t = 52415, value_parser = clap::value_parser!(u16).range(1..))]
    pub api_port: u16,

    /// How peers are found. Only `manual` exists: the peer file lists them.
    #[arg(long, value_name = "MODULE", default_value = "manual", value_parser = parse_discovery)]
    pub discovery_module: String,

    /// The peer file (the seed's mac1_peers.json format). Edits are followed while running.
    #[arg(long, value_name = "FILE")]
    pub discovery_config_path: PathBuf,

    /// The GGUF model this node serves (llama, qwen2, qwen3 or gemma3): a file, or a
    /// name in the models directory. Every node of the cluster must hold the same file. Without it,
    /// the node serves a lone .gguf from the models directory, else none.
    #[arg(long, value_name = "PATH|NAME")]
    pub model: Option<String>,

    /// The sha256 the model file must have (cluster.toml's `[model] sha256`, which the
    /// installer passes): a node holding another file refuses to start, naming both.
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    pub model_sha256: Option<String>,

    /// Positions a request may fill, prompt and answer together; the rotary tables
    /// and every request's cache are bounded by it. Give every node the same
    /// [default: the model's trained context, at most 8192].
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx_size: Option<u32>,

    /// MiB of memory this node lends the model: its layers and the KV cache of every
    /// request it serves. Layers are split in proportion to it, a split that does not fit
    /// is refused, and a request whose cache would not fit waits (HTTP 429)
    /// [default: three quarters of this machine's memory].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_limit: Option<u64>,

    /// Where models are looked up by name [default: ~/Library/Application
    /// Support/tensorlink/models on macOS, $XDG_DATA_HOME/tensorlink/models elsewhere].
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Threads for the model's arithmetic [default: every core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// Accepted for compatibility with exo's command line; tensorlink has no TUI.
    #[arg(long)]
    pub disable_tui: bool,

    /// Most simultaneous inbound connections; more are closed on arrival.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Largest tensor payload accepted in one frame, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_payload_bytes: u64,

    /// Largest frame metadata (prompt, shapes, topology) accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(4096..))]
    pub max_meta_bytes: u32,

    /// Seconds a connecting peer has to complete its handshake.
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_secs)]
    pub handshake_timeout: f64,

    /// Let the Mac sleep when idle even while peers are linked or requests run. By default the
    /// node holds a "prevent idle system sleep" assertion while it serves the cluster (an idle
    /// Mac that sleeps drops every tunnel); a closed laptop lid sleeps regardless.
    #[arg(long)]
    pub allow_sleep: bool,

    /// Keep every .log file in DIR under --log-max-bytes, renaming a larger one to .log.1 (launchd
    /// never rotates the job logs it writes; the installer points this at ~/Library/Logs/tensorlink).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// The size past which --log-dir rotates a log.
    #[arg(long, value_name = "BYTES", default_value_t = crate::logfiles::DEFAULT_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_max_bytes: u64,

    /// Seconds a frame may stall part-way (a peer that stops mid-frame is dropped).
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub stall_timeout: f64,
}

fn parse_discovery(s: &str) -> Result<String, String> {
    if s == "manual" {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "only `manual` discovery is supported: tensorlink finds peers through the peer file \
             given with --discovery-config-path (mDNS/UDP discovery does not work across ssh tunnels); \
             `{s}` is not available"
        ))
    }
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let max = crate::protocol::handshake::MAX_NODE_ID;
    if s.is_empty() || s.len() > max {
        Err(format!("a node id must be 1 to {max} bytes long"))
    } else {
        Ok(s.to_owned())
    }
}

/// 64 hexadecimal digits, kept lowercase as the node prints its own.
fn parse_sha256(s: &str) -> Result<String, String> {
    if fingerprint::is_sha256(s) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("`{s}` is not a sha256: 64 hexadecimal digits"))
    }
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && (0.1..=600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.1 to 600 seconds"))
    }
}

fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.trim_end_matches(".local").to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

impl Args {
    /// This machine, offering the memory it lends the model (`--memory-limit`):
    /// what the partition weighs and checks, on every node alike.
    fn capabilities(&self) -> crate::capabilities::DeviceCapabilities {
        let mut caps = crate::capabilities::detect();
        caps.memory = self
            .memory_limit
            .unwrap_or_else(|| default_limit_mib(caps.memory));
        caps
    }

    /// `--models-dir`, or this platform's default.
    pub fn models_dir(&self) -> Option<PathBuf> {
        self.models_dir
            .clone()
            .or_else(crate::inference::models_dir::default_dir)
    }

    /// How the model is loaded, given the memory `config` offers.
    pub fn load_options(&self, config: &NodeConfig) -> LoadOptions {
        LoadOptions {
            ctx_size: self.ctx_size.map(|n| n as usize),
            memory_limit_mib: Some(config.capabilities.memory),
            hash_records: fingerprint::default_dir(),
            expected_sha256: self.model_sha256.clone(),
        }
    }

    pub fn node_config(&self) -> NodeConfig {
        let handshake_timeout = Duration::from_secs_f64(self.handshake_timeout);
        let stall_timeout = Duration::from_secs_f64(self.stall_timeout);
        NodeConfig {
            node_id: self.node_id.clone(),
            node_addr: SocketAddr::new(self.node_host, self.node_port),
            api_addr: SocketAddr::new(self.api_host, self.api_port),
            peer_file: self.discovery_config_path.clone(),
            capabilities: self.capabilities(),
            limits: Limits {
                max_meta: self.max_meta_bytes,
                max_payload: self.max_payload_bytes,
            },
            server: ServerConfig {
                max_connections: self.max_connections as usize,
                handshake_timeout,
                stall_timeout,
                ..ServerConfig::default()
            },
            timing: LinkTiming {
                handshake_timeout,
                stall_timeout,
                ..LinkTiming::default()
            },
            allow_sleep: self.allow_sleep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_command_line_parses_verbatim() {
        let args = Args::try_parse_from([
            "tensorlink-node",
            "--node-id",
            "mac1",
            "--node-port",
            "50060",
            "--chatgpt-api-port",
            "52416",
            "--discovery-module",
            "manual",
            "--discovery-config-path",
            "mac1_peers.json",
            "--disable-tui",
        ])
        .unwrap();
        let c = args.node_config();
        assert_eq!(c.node_id, "mac1");
        assert_eq!(c.node_addr.to_string(), "127.0.0.1:50060");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:52416");
    }

    #[test]
    fn other_discovery_modules_are_refused_clearly() {
        let err = Args::try_parse_from([
            "tensorlink-node",
            "--discovery-module",
            "udp",
            "--discovery-config-path",
            "p.json",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .contains("only `manual` discovery is supported"),
            "{err}"
        );
    }

    #[test]
    fn bad_port_is_a_usage_error() {
        let err = Args::try_parse_from([
            "tensorlink-node",
            "--node-port",
            "70000",
            "--discovery-config-path",
            "p",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
