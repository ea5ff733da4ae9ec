//! Every message of the protocol and its metadata layout.
//!
//! The operations are exo's node service, with the same meaning, so that the
//! inference flow (prompt → hidden states → result tokens) maps one to one.
//! Fields are written in declaration order with the primitives of `codec`;
//! tensors put their dtype and shape here and their bytes in the payload, in the
//! order the tensors appear.

use bytes::Bytes;

use super::codec::{Reader, Writer};
use super::frame::{EncodedFrame, FrameHeader, FrameType, HEADER_LEN};
use super::handshake::{read_capabilities, write_capabilities};
use super::ring::{read_context, write_context, RingContext};
use super::tensor::{read_desc, write_desc, PayloadCursor, Tensor};
use super::{ErrorCode, ProtocolError};
use crate::topology::{Edge, ModelInfo, Topology};

/// The longest message an Error carries, in bytes: with its code and length
/// prefix an Error's metadata is at most 1030 bytes, within the least
/// `max_meta` a Hello may announce ([`crate::frame::MIN_MAX_META`]).
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// The contiguous layers `[start_layer, end_layer]` of a model that one node runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    /// The sha256 of the model file, as 64 lowercase hex digits: nodes run
    /// one request only on the very same file.
    pub model_sha256: String,
    pub start_layer: u32,
    /// Inclusive, as in exo.
    pub end_layer: u32,
    pub n_layers: u32,
}

impl Shard {
    pub fn is_first(&self) -> bool {
        self.start_layer == 0
    }

    pub fn is_last(&self) -> bool {
        self.end_layer + 1 == self.n_layers
    }

    /// `start <= end < n_layers`. Checked by the node when a request arrives,
    /// not by the decoder: a bad shard is a bad request, answered with an error,
    /// not a broken stream that must be closed.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.start_layer > self.end_layer || self.end_layer >= self.n_layers {
            return Err(ProtocolError::BadShard {
                start: self.start_layer,
                end: self.end_layer,
                count: self.n_layers,
            });
        }
        Ok(())
    }
}

/// Where a request's generation stands when its input moves to the next
/// shard: the position of the first token in the tensor and, on the request's
/// first step only, its ring context.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceState {
    pub position: u64,
    pub context: Option<RingContext>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    // Requests.
    HealthCheck,
    SendPrompt {
        shard: Shard,
        prompt: String,
        request_id: String,
        inference_state: Option<InferenceState>,
    },
    SendTensor {
        shard: Shard,
        tensor: Tensor,
        request_id: String,
        inference_state: Option<InferenceState>,
    },
    SendExample {
        shard: Shard,
        example: Tensor,
        target: Tensor,
        length: Tensor,
        train: bool,
        request_id: String,
    },
    CollectTopology {
        visited: Vec<String>,
        max_depth: u32,
    },
    SendResult {
        request_id: String,
        tokens: Vec<u32>,
        tensor: Option<Tensor>,
        finished: bool,
    },
    SendOpaqueStatus {
        request_id: String,
        status: String,
    },
    /// Asks for the model file a node loaded, by its sha256, its file name or
    /// both (an empty field matches anything). A node describes only the file
    /// it runs: no request names a path.
    QueryModelFile {
        sha256: String,
        name: String,
    },
    /// `len` bytes from `offset` of the loaded model file named by its sha256.
    ReadModelFile {
        sha256: String,
        offset: u64,
        len: u32,
    },
    // Responses.
    HealthStatus {
        healthy: bool,
        status: String,
    },
    PromptResult(Option<Tensor>),
    TensorResult(Option<Tensor>),
    Loss {
        loss: f32,
        gradients: Option<Tensor>,
    },
    Topology(Topology),
    ResultAck,
    StatusAck,
    ModelFileInfo {
        /// The file's name, without its directory.
        name: String,
        sha256: String,
        size: u64,
    },
    /// The bytes from `offset`, in the payload: as many as asked for.
    ModelBytes {
        offset: u64,
        data: Bytes,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Message {
    /// An Error whose message is cut to [`MAX_ERROR_MESSAGE`] bytes (at a
    /// character boundary, marked with `…`), so that it fits any peer's limits.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE - '…'.len_utf8();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Message::Error { code, message }
    }

    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::HealthCheck => FrameType::HealthCheck,
            Message::SendPrompt { .. } => FrameType::SendPrompt,
            Message::SendTensor { .. } => FrameType::SendTensor,
            Message::SendExample { .. } => FrameType::SendExample,
            Message::CollectTopology { .. } => FrameType::CollectTopology,
            Message::SendResult { .. } => FrameType::SendResult,
            Message::SendOpaqueStatus { .. } => FrameType::SendOpaqueStatus,
            Message::QueryModelFile { .. } => FrameType::QueryModelFile,
            Message::ReadModelFile { .. } => FrameType::ReadModelFile,
            Message::HealthStatus { .. } => FrameType::HealthStatus,
            Message::PromptResult(_) => FrameType::PromptResult,
            Message::TensorResult(_) => FrameType::TensorResult,
            Message::Loss { .. } => FrameType::Loss,
            Message::Topology(_) => FrameType::Topology,
            Message::ResultAck => FrameType::ResultAck,
            Message::StatusAck => FrameType::StatusAck,
            Message::ModelFileInfo { .. } => FrameType::ModelFileInfo,
            Message::ModelBytes { .. } => FrameType::ModelBytes,
            Message::Error { .. } => FrameType::Error,
        }
    }

    /// Encodes the message as a frame for `request_id`. Tensor bytes are not
    /// copied: they ride along as the payload's buffers.
    pub fn encode(&self, request_id: u64) -> EncodedFrame {
        let mut w = Writer::with_prefix(&[0u8; HEADER_LEN]);
        let mut payload: Vec<Bytes> = Vec::new();
        let mut tensor = |w: &mut Writer, t: &Tensor| {
            write_desc(w, t);
            if !t.data().is_empty() {
                payload.push(t.data().clone());
            }
        };
        match self {
            Message::HealthCheck | Message::ResultAck | Message::StatusAck => {}
            Message::SendPrompt {
                shard,
                prompt,
                request_id,
                inference_state,
            } => {
                write_shard(&mut w, shard);
                w.str(prompt);
                w.str(request_id);
                write_state(&mut w, inference_state);
            }
            Message::SendTensor {
                shard,
                tensor: t,
                request_id,
                inference_state,
            } => {
                write_shard(&mut w, shard);
                tensor(&mut w, t);
                w.str(request_id);
                write_state(&mut w, inference_state);
            }
            Message::SendExample {
                shard,
                example,
                target,
                length,
                train,
                request_id,
            } => {
                write_shard(&mut w, shard);
                tensor(&mut w, example);
                tensor(&mut w, target);
                tensor(&mut w, length);
                w.bool(*train);
                w.str(request_id);
            }
            Message::CollectTopology { visited, max_depth } => {
                w.count(visited.len());
                for id in visited {
                    w.str(id);
                }
                w.u32(*max_depth);
            }
            Message::SendResult {
                request_id,
                tokens,
                tensor: t,
                finished,
            } => {
                w.str(request_id);
                w.count(tokens.len());
                for &tok in tokens {
                    w.u32(tok);
                }
                w.bool(t.is_some());
                if let Some(t) = t {
                    tensor(&mut w, t);
                }
                w.bool(*finished);
            }
            Message::SendOpaqueStatus { request_id, status } => {
                w.str(request_id);
                w.str(status);
            }
            Message::QueryModelFile { sha256, name } => {
                w.str(sha256);
                w.str(name);
            }
            Message::ReadModelFile {
                sha256,
                offset,
                len,
            } => {
                w.str(sha256);
                w.u64(*offset);
                w.u32(*len);
            }
            Message::HealthStatus { healthy, status } => {
                w.bool(*healthy);
                w.str(status);
            }
            Message::ModelFileInfo { name, sha256, size } => {
                w.str(name);
                w.str(sha256);
                w.u64(*size);
            }
            Message::ModelBytes { offset, data } => {
                w.u64(*offset);
                if !data.is_empty() {
                    payload.push(data.clone());
                }
            }
            Message::PromptResult(t) | Message::TensorResult(t) => {
                w.bool(t.is_some());
                if let Some(t) = t {
                    tensor(&mut w, t);
                }
            }
            Message::Loss { loss, gradients } => {
                w.f32(*loss);
                w.bool(gradients.is_some());
                if let Some(t) = gradients {
                    tensor(&mut w, t);
                }
            }
            Message::Topology(topo) => write_topology(&mut w, topo),
            Message::Error { code, message } => {
                w.u16(*code as u16);
                w.str(message);
            }
        }
        let header = FrameHeader {
            frame_type: self.frame_type(),
            request_id,
            meta_len: u32::try_from(w.buf.len() - HEADER_LEN).unwrap_or(u32::MAX),
            payload_len: payload.iter().map(|p| p.len() as u64).sum(),
        };
        w.buf[..HEADER_LEN].copy_from_slice(&header.encode());
        EncodedFrame {
            head: Bytes::from(w.buf),
            payload,
        }
    }

    /// Decodes a frame body whose header has already been validated.
    pub fn decode(
        frame_type: FrameType,
        meta: &[u8],
        payload: Bytes,
    ) -> Result<Message, ProtocolError> {
        let mut r = Reader::new(meta);
        let mut p = PayloadCursor::new(payload);
        let msg = match frame_type {
            FrameType::HealthCheck => Message::HealthCheck,
            FrameType::ResultAck => Message::ResultAck,
            FrameType::StatusAck => Message::StatusAck,
            FrameType::SendPrompt => Message::SendPrompt {
                shard: read_shard(&mut r)?,
                prompt: r.str("prompt")?,
                request_id: r.str("request id")?,
                inference_state: read_state(&mut r)?,
            },
            FrameType::SendTensor => Message::SendTensor {
                shard: read_shard(&mut r)?,
                tensor: p.take(read_desc(&mut r)?)?,
                request_id: r.str("request id")?,
                inference_state: read_state(&mut r)?,
            },
            FrameType::SendExample => Message::SendExample {
                shard: read_shard(&mut r)?,
                example: p.take(read_desc(&mut r)?)?,
                target: p.take(read_desc(&mut r)?)?,
                length: p.take(read_desc(&mut r)?)?,
                train: r.bool("train flag")?,
                request_id: r.str("request id")?,
            },
            FrameType::CollectTopology => {
                let n = r.count(4, "visited set")?;
                let visited = (0..n)
                    .map(|_| r.str("visited node id"))
                    .collect::<Result<_, _>>()?;
                Message::CollectTopology {
                    visited,
                    max_depth: r.u32("max depth")?,
                }
            }
            FrameType::SendResult => {
                let request_id = r.str("request id")?;
                let n = r.count(4, "result tokens")?;
                let tokens = (0..n)
                    .map(|_| r.u32("result token"))
                    .collect::<Result<_, _>>()?;
                let tensor = read_opt_tensor(&mut r, &mut p)?;
                Message::SendResult {
                    request_id,
                    tokens,
                    tensor,
                    finished: r.bool("finished flag")?,
                }
            }
            FrameType::SendOpaqueStatus => Message::SendOpaqueStatus {
                request_id: r.str("request id")?,
                status: r.str("status")?,
            },
            FrameType::QueryModelFile => Message::QueryModelFile {
                sha256: r.str("model file sha256")?,
                name: r.str("model file name")?,
            },
            FrameType::ReadModelFile => Message::ReadModelFile {
                sha256: r.str("model file sha256")?,
                offset: r.u64("read offset")?,
                len: r.u32("read length")?,
            },
            FrameType::ModelFileInfo => Message::ModelFileInfo {
                name: r.str("model file name")?,
                sha256: r.str("model file sha256")?,
                size: r.u64("model file size")?,
            },
            FrameType::ModelBytes => Message::ModelBytes {
                offset: r.u64("bytes offset")?,
                data: p.rest(),
            },
            FrameType::HealthStatus => Message::HealthStatus {
                healthy: r.bool("healthy flag")?,
                status: r.str("health status")?,
            },
            FrameType::PromptResult => Message::PromptResult(read_opt_tensor(&mut r, &mut p)?),
            FrameType::TensorResult => Message::TensorResult(read_opt_tensor(&mut r, &mut p)?),
            FrameType::Loss => Message::Loss {
                loss: r.f32("loss")?,
                gradients: read_opt_tensor(&mut r, &mut p)?,
            },
            FrameType::Topology => Message::Topology(read_topology(&mut r)?),
            FrameType::Error => Message::Error {
                code: ErrorCode::from_u16(r.u16("error code")?),
                message: r.str("error message")?,
            },
        };
        r.finish("frame metadata")?;
        p.finish()?;
        Ok(msg)
    }
}

fn write_shard(w: &mut Writer, s: &Shard) {
    w.str(&s.model_sha256);
    w.u32(s.start_layer);
    w.u32(s.end_layer);
    w.u32(s.n_layers);
}

fn read_shard(r: &mut Reader<'_>) -> Result<Shard, ProtocolError> {
    Ok(Shard {
        model_sha256: r.str("shard model sha256")?,
        start_layer: r.u32("shard start layer")?,
        end_layer: r.u32("shard end layer")?,
        n_layers: r.u32("shard layer count")?,
    })
}

fn write_state(w: &mut Writer, s: &Option<InferenceState>) {
    w.bool(s.is_some());
    if let Some(s) = s {
        w.u64(s.position);
        w.bool(s.context.is_some());
        if let Some(c) = &s.context {
            write_context(w, c);
        }
    }
}

fn read_state(r: &mut Reader<'_>) -> Result<Option<InferenceState>, ProtocolError> {
    if !r.present("inference state tag")? {
        return Ok(None);
    }
    let position = r.u64("inference position")?;
    let context = match r.present("ring context tag")? {
        true => Some(read_context(r)?),
        false => None,
    };
    Ok(Some(InferenceState { position, context }))
}

fn read_opt_tensor(
    r: &mut Reader<'_>,
    p: &mut PayloadCursor,
) -> Result<Option<Tensor>, ProtocolError> {
    if !r.present("tensor tag")? {
        return Ok(None);
    }
    Ok(Some(p.take(read_desc(r)?)?))
}

fn write_topology(w: &mut Writer, t: &Topology) {
    w.count(t.nodes.len());
    for (id, caps) in &t.nodes {
        w.str(id);
        write_capabilities(w, caps);
    }
    let edges: Vec<&Edge> = t.edges().collect();
    w.count(edges.len());
    for e in edges {
        w.str(&e.from_id);
        w.str(&e.to_id);
        w.str(&e.description);
    }
    w.bool(t.active_node_id.is_some());
    if let Some(id) = &t.active_node_id {
        w.str(id);
    }
    w.count(t.models.len());
    for (id, m) in &t.models {
        w.str(id);
        w.str(&m.name);
        w.str(&m.sha256);
        w.u32(m.n_layers);
    }
}

fn read_topology(r: &mut Reader<'_>) -> Result<Topology, ProtocolError> {
    let mut topo = Topology::default();
    // A node entry is at least an empty id and empty model/chip strings plus
    // memory and three flops figures: 4 + 4 + 4 + 8 + 12 bytes.
    let n = r.count(32, "topology nodes")?;
    for _ in 0..n {
        let id = r.str("topology node id")?;
        let caps = read_capabilities(r)?;
        topo.nodes.insert(id, caps);
    }
    let n = r.count(12, "topology edges")?;
    for _ in 0..n {
        topo.add_edge(Edge {
            from_id: r.str("edge from")?,
            to_id: r.str("edge to")?,
            description: r.str("edge description")?,
        });
    }
    if r.present("active node tag")? {
        topo.active_node_id = Some(r.str("active node id")?);
    }
    // An entry is at least three empty strings and a layer count.
    let n = r.count(16, "topology models")?;
    for _ in 0..n {
        let id = r.str("model node id")?;
        let model = ModelInfo {
            name: r.str("model name")?,
            sha256: r.str("model sha256")?,
            n_layers: r.u32("model layer count")?,
        };
        topo.models.insert(id, model);
    }
    Ok(topo)
}
