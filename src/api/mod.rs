//! The HTTP API on `--chatgpt-api-port`: exo's `/topology` and `/healthcheck`,
//! `/peers` with the state of each configured link (what `install --check`
//! and a curious user read), the OpenAI-compatible endpoints ([`openai`]), `/cluster` for the web UI ([`cluster`]) and the UI itself
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

use crate::cluster::{Cluster, TOPOLOGY_DEPTH};
use crate::engine::ModelSlot;
use crate::inference::Inference;
use crate::peers::PeerView;
use crate::power::KeepAwake;
use crate::topology::Topology;

/// What the API serves from: the cluster as this node reaches it, the model
/// it runs, and its hold on the Mac's sleep.
pub struct AppState {
    pub cluster: Arc<Cluster>,
    pub model: ModelSlot,
    pub power: Arc<KeepAwake>,
}

impl AppState {
    pub fn inference(&self) -> Option<&Inference> {
        self.model.get()
    }

    /// Why this node has no model: how its fetch stands, or that none was named.
    fn no_model(&self) -> String {
        match self.model.fetch_status() {
            Some(f) => format!(
                "node `{}` has no model yet: {}",
                self.cluster.id(),
                f.describe()
            ),
            None => format!(
                "node `{}` has no model loaded: start it with --model",
                self.cluster.id()
            ),
        }
    }
}

type Shared = State<Arc<AppState>>;

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/topology", get(topology))
        .route("/peers", get(peers))
        .route("/cluster", get(cluster::cluster))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/", get(ui::index))
        .with_state(state)
}

pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let app = router(state);
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

async fn topology(State(app): Shared) -> Json<Topology> {
    Json(
        app.cluster
            .collect_topology(BTreeSet::new(), TOPOLOGY_DEPTH)
            .await,
    )
}

async fn peers(State(app): Shared) -> Json<Vec<PeerView>> {
    Json(app.cluster.peers().views())
}
