//! The Prometheus listener: `/metrics`, the OpenMetrics text of the node's telemetry snapshot.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use axum::Router;

use super::request::AppState;
use crate::workloads::Supervisor;

/// OpenMetrics text of the node's telemetry snapshot.
pub async fn metrics_text(sup: &Supervisor) -> String {
    crate::telemetry::prom::encode(sup.telemetry_snapshot().await)
}

pub async fn serve_metrics(sup: Arc<Supervisor>, addr: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, max_connections = super::listen::ConnLimits::METRICS.max_connections, "metrics listening");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(sup): State<AppState>| async move {
                (
                    [(header::CONTENT_TYPE, crate::telemetry::prom::CONTENT_TYPE)],
                    metrics_text(&sup).await,
                )
            }),
        )
        .with_state(sup);
    super::listen::serve_connections(listener, app, None, super::listen::ConnLimits::METRICS).await;
    Ok(())
}
