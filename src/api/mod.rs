//! The HTTP API on `--chatgpt-api-port`: exo's `/topology` and `/healthcheck`,
//! `/peers` with the state of each configured link (what `install --check`
//! and a curious user read), the OpenAI-compatible chat endpoints
//! ([`openai`]), `/cluster` for the web UI ([`cluster`]) and the UI itself
//! ([`ui`]).

mod cluster;
mod openai;
mod ui;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::{Node, TOPOLOGY_DEPTH};
use crate::peers::PeerView;
use crate::topology::Topology;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/topology", get(topology))
        .route("/peers", get(peers))
        .route("/cluster", get(cluster::cluster))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/", get(ui::index))
        .with_state(node)
}

pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let app = router(node);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(target: "tensorlink::api", "HTTP API stopped: {e}");
    }
}

async fn healthcheck() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn topology(State(node): State<Arc<Node>>) -> Json<Topology> {
    Json(node.collect_topology(BTreeSet::new(), TOPOLOGY_DEPTH).await)
}

async fn peers(State(node): State<Arc<Node>>) -> Json<Vec<PeerView>> {
    Json(node.peers().views())
}
