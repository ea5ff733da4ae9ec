//! tonic gRPC, tuned fairly: TCP_NODELAY on both sides (set on each accepted
//! stream, since `serve_with_incoming` ignores the builder's nodelay), message
//! limits raised, no compression, large HTTP/2 windows, `Bytes` payloads.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

pub mod pb {
    tonic::include_proto!("bench");
}

use pb::node_service_client::NodeServiceClient;
use pb::node_service_server::{NodeService, NodeServiceServer};
use pb::{SendTensorRequest, SendTensorResponse, Tensor};

const MAX_MESSAGE: usize = 1 << 30;
/// HTTP/2 flow-control windows: large, so a 64 MiB message is not throttled by
/// window updates (the protocol's maximum is 2^31-1).
const WINDOW: u32 = 256 << 20;
/// HTTP/2 frames of the protocol's maximum size (2^24-1) instead of 16 KiB.
const MAX_FRAME: u32 = (1 << 24) - 1;

struct Service;

#[tonic::async_trait]
impl NodeService for Service {
    async fn send_tensor(
        &self,
        request: Request<SendTensorRequest>,
    ) -> Result<Response<SendTensorResponse>, Status> {
        let r = request.into_inner();
        let tensor = if r.echo { r.tensor } else { None };
        Ok(Response::new(SendTensorResponse { tensor }))
    }
}

pub async fn serve(port: u16) -> Result<()> {
    let listener = tensorlink::net::socket::listen(([127, 0, 0, 1], port).into(), 128)?;
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|stream| {
            let _ = tensorlink::net::socket::tune_stream(stream);
        })
    });
    let svc = NodeServiceServer::new(Service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Server::builder()
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME)
        .tcp_nodelay(true)
        .add_service(svc)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

pub type Client = NodeServiceClient<Channel>;

pub async fn connect(port: u16) -> Result<Client> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("tonic connect")?;
    Ok(NodeServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

pub fn request(payload: &Bytes, shape: &[i64], echo: bool) -> SendTensorRequest {
    SendTensorRequest {
        tensor: Some(Tensor {
            tensor_data: payload.clone(),
            shape: shape.to_vec(),
            dtype: "float16".into(),
        }),
        echo,
    }
}

pub async fn round_trip(client: &mut Client, req: &SendTensorRequest) -> Result<()> {
    let answer = client.send_tensor(req.clone()).await?.into_inner();
    anyhow::ensure!(answer.tensor.is_some(), "no tensor echoed");
    Ok(())
}

/// One-way transfer of `warmup` then `count` tensors with at most `window`
/// calls in flight; the seconds the `count` took.
pub async fn transfer(
    client: &Client,
    payload: &Bytes,
    warmup: usize,
    count: usize,
    window: usize,
) -> Result<f64> {
    let req = request(payload, &[payload.len() as i64], false);
    windowed(client, &req, warmup, window).await?;
    let start = std::time::Instant::now();
    windowed(client, &req, count, window).await?;
    Ok(start.elapsed().as_secs_f64())
}

async fn windowed(
    client: &Client,
    req: &SendTensorRequest,
    count: usize,
    window: usize,
) -> Result<()> {
    crate::workload::windowed(count, window, || {
        let (mut client, req) = (client.clone(), req.clone());
        async move {
            client
                .send_tensor(req)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await
}
