//! The HTTP listener (`http.bind`): `/metrics` in the Prometheus text format, and the
//! probes `/healthz` (the process is alive and its loop turns) and `/readyz` (it can do
//! its job: a broker is reachable, it has joined its group, Delta writes are not
//! failing). Each probe answers 200 or 503 with a short JSON body that says why.
//!
//! Invariant kept here: the probes and the metrics read the same [`Progress`] as the
//! run summary; nothing here changes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::Progress;

/// A loop that has not turned for this long is stuck: `/healthz` fails. The loop
/// turns at least once per `flush.interval`, and while a flush runs it still waits on it.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

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
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::render(&progress))
}

async fn healthz(State(progress): State<Arc<Progress>>) -> impl IntoResponse {
    let (ok, reason) = liveness(&progress);
    answer(ok, reason)
}

async fn readyz(State(progress): State<Arc<Progress>>) -> impl IntoResponse {
    let (ok, reason) = readiness(&progress);
    answer(ok, reason)
}

fn answer(ok: bool, reason: String) -> impl IntoResponse {
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ok": ok, "reason": reason })))
}

/// Whether the process is alive and its loop turns, and why.
pub fn liveness(progress: &Progress) -> (bool, String) {
    if progress.health.is_stopped() {
        return (false, "the worker has stopped".to_string());
    }
    let idle = progress.since_last_turn();
    if idle > STUCK_AFTER {
        return (false, format!("the worker's loop has not turned for {} s", idle.as_secs()));
    }
    (true, format!("the worker's loop turned {} ms ago", idle.as_millis()))
}

/// Whether the worker can do its job right now, and why.
pub fn readiness(progress: &Progress) -> (bool, String) {
    let health = &progress.health;
    if health.is_stopped() {
        return (false, "the worker has stopped".to_string());
    }
    if !health.is_broker_reachable() {
        return (false, "no Kafka broker is reachable".to_string());
    }
    if !health.is_storage_ok() {
        return (false, "Delta writes are failing and being retried".to_string());
    }
    if let Some(batch) = health.unreadable() {
        return (false, format!("a Kafka batch cannot be read and is being read again: {batch}"));
    }
    if !progress.joined.load(std::sync::atomic::Ordering::Relaxed) {
        return (false, "joining the consumer group: no assignment yet".to_string());
    }
    let assigned = Progress::get(&progress.assigned_partitions);
    (true, format!("{assigned} partitions assigned; broker reachable; Delta writes succeed"))
}
