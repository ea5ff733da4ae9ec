//! The peer file, in the seed's format exactly (`mac1_peers.json`):
//!
//! ```json
//! {"peers": {"mac2": {"address": "127.0.0.1:50052",
//!                     "device_capabilities": {"model": "Mac #2", "chip": "Apple Silicon",
//!                                             "memory": 32768, "flops": {"fp32": 10.0, "fp16": 20.0, "int8": 40.0}}}}}
//! ```
//!
//! `address` is either `host:port`, or a host with a separate `port` (exo's
//! manual discovery). Parsing is pure so every malformed shape is unit-tested.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::capabilities::DeviceCapabilities;

/// One peer as the file describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    pub id: String,
    pub host: String,
    pub port: u16,
    /// Stand-in capabilities until the peer's own hello arrives.
    pub capabilities: Option<DeviceCapabilities>,
}

impl PeerSpec {
    /// `host:port`, bracketing IPv6 literals so the string parses back.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Peers by id. Ordered, so logs and the API list them the same way every time.
pub type PeerSet = BTreeMap<String, PeerSpec>;

#[derive(Debug, Error)]
pub enum PeerFileError {
    #[error("cannot read peer file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer file {} is not valid JSON of the form {{\"peers\": {{ID: {{\"address\": \"host:port\"}}}}}}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("peer file {}: peer `{peer}`: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        peer: String,
        problem: String,
    },
}

#[derive(Deserialize)]
struct RawFile {
    peers: BTreeMap<String, RawPeer>,
}

#[derive(Deserialize)]
struct RawPeer {
    address: String,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    device_capabilities: Option<DeviceCapabilities>,
}

/// Parses peer file contents. `path` only names the file in errors.
pub fn parse(bytes: &[u8], path: &Path, own_id: &str) -> Result<PeerSet, PeerFileError> {
    let raw: RawFile = serde_json::from_slice(bytes).map_err(|source| PeerFileError::Json {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |peer: &str, problem: String| PeerFileError::Invalid {
        path: path.to_owned(),
        peer: peer.to_owned(),
        problem,
    };
    let mut set = PeerSet::new();
    for (id, peer) in raw.peers {
        if id == own_id {
            continue;
        }
        if id.is_empty() || id.len() > crate::protocol::handshake::MAX_NODE_ID {
            return Err(invalid(&id, "node ids must be 1 to 255 bytes".into()));
        }
        let (host, port) = match peer.port {
            Some(port) => (peer.address.clone(), port),
            None => split_host_port(&peer.address).map_err(|p| invalid(&id, p))?,
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(invalid(
                &id,
                format!("address `{}` has no host", peer.address),
            ));
        }
        let port = u16::try_from(port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid(&id, format!("port {port} is out of range 1-65535")))?;
        set.insert(
            id.clone(),
            PeerSpec {
                id,
                host,
                port,
                capabilities: peer.device_capabilities,
            },
        );
    }
    Ok(set)
}

fn split_host_port(address: &str) -> Result<(String, i64), String> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| {
        format!("address `{address}` needs a port: write \"host:port\" or add \"port\": N")
    })?;
    let port = port
        .parse::<i64>()
        .map_err(|_| format!("address `{address}` has a port that is not a number"))?;
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_MAC1: &str = r#"{
      "peers": {
        "mac2": {
          "address": "127.0.0.1:50052",
          "device_capabilities": {
            "model": "Mac #2",
            "chip": "Apple Silicon",
            "memory": 32768,
            "flops": {"fp32": 10.0, "fp16": 20.0, "int8": 40.0}
          }
        }
      }
    }"#;

    fn parse_str(s: &str, own: &str) -> Result<PeerSet, PeerFileError> {
        parse(s.as_bytes(), Path::new("peers.json"), own)
    }

    #[test]
    fn seed_file_parses_as_written() {
        let set = parse_str(SEED_MAC1, "mac1").unwrap();
        let mac2 = &set["mac2"];
        assert_eq!((mac2.host.as_str(), mac2.port), ("127.0.0.1", 50052));
        let caps = mac2.capabilities.as_ref().unwrap();
        assert_eq!(caps.memory, 32768);
        assert_eq!(caps.flops.int8, 40.0);
    }

    #[test]
    fn separate_port_and_ipv6_and_own_id() {
        let set = parse_str(
            r#"{"peers": {"a": {"address": "localhost", "port": 7},
                          "b": {"address": "[::1]:8"},
                          "me": {"address": "127.0.0.1:9"}}}"#,
            "me",
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set["a"].address(), "localhost:7");
        assert_eq!(set["b"].address(), "[::1]:8");
    }

    #[test]
    fn broken_files_name_the_problem() {
        let cases = [
            (
                r#"{"peers": {"a": {"address": "127.0.0.1:70000"}}}"#,
                "port 70000 is out of range",
            ),
            (
                r#"{"peers": {"a": {"address": "127.0.0.1"}}}"#,
                "needs a port",
            ),
            (
                r#"{"peers": {"a": {"address": "h", "port": 0}}}"#,
                "port 0 is out of range",
            ),
            (r#"{"peers": {"a": {"address": ":5"}}}"#, "has no host"),
            (r#"{"peers": {"a": {"address": "h:x"}}}"#, "not a number"),
            (r#"{"peers": {"a": {"addr"#, "not valid JSON"),
            (r#"{"nodes": {}}"#, "not valid JSON"),
        ];
        for (text, expected) in cases {
            let err = parse_str(text, "me").unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("peers.json"), "names the file: {err}");
        }
    }
}
