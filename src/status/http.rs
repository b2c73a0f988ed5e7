//! The HTTP listener (`http.bind`): `/metrics` in the Prometheus text format, and the
//! probes `/healthz` ([`Progress::liveness`]) and `/readyz` ([`Progress::readiness`]).
//! Each probe answers 200 or 503 with a short JSON body that says why.
//!
//! Invariant kept here: the probes and the metrics read the same [`Progress`] as the
//! run summary; nothing here changes it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics;
use super::{Progress, Verdict};

/// Binds `bind` and serves until `shutdown`; records the bound address in `progress`.
///
/// # Errors
/// When the address cannot be bound (in use, not local): the message names `http.bind`.
pub async fn start(bind: &str, progress: Arc<Progress>, shutdown: CancellationToken) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(bind.trim()).await.map_err(|e| {
        format!("cannot listen on http.bind = {bind:?}: {e}; choose another port, or \"\" to turn it off")
    })?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let _ = progress.http_address.set(address);
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(progress);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            warn!(%error, "the HTTP listener stopped");
        }
    });
    info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(address)
}

async fn metrics(State(progress): State<Arc<Progress>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::render(&progress))
}

async fn healthz(State(progress): State<Arc<Progress>>) -> impl IntoResponse {
    answer(progress.liveness())
}

async fn readyz(State(progress): State<Arc<Progress>>) -> impl IntoResponse {
    answer(progress.readiness())
}

fn answer(verdict: Verdict) -> impl IntoResponse {
    let status = if verdict.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ok": verdict.ok, "reason": verdict.reason })))
}
