//! Webhook receiver: a signed POST triggers a sync at once. GitHub's `X-Hub-Signature-256`
//! (`sha256=<hex HMAC-SHA256 of the body>`) and a generic `X-Signature-256` header with the same
//! format are accepted; anything unsigned or badly signed gets 401 and changes nothing.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;

const SIGNATURE_HEADERS: &[&str] = &["x-hub-signature-256", "x-signature-256"];

#[derive(Clone)]
struct Hook {
    secret: Arc<Vec<u8>>,
    trigger: Arc<Notify>,
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`. The MAC
/// library compares in constant time.
pub fn signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn receive(
    State(hook): State<Hook>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let sig = SIGNATURE_HEADERS
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok());
    match sig {
        Some(s) if signature_valid(&hook.secret, &body, s) => {
            hook.trigger.notify_one();
            (StatusCode::ACCEPTED, "sync triggered\n")
        }
        Some(_) => {
            tracing::warn!("webhook with a bad signature refused");
            (StatusCode::UNAUTHORIZED, "bad signature\n")
        }
        None => {
            tracing::warn!("unsigned webhook refused");
            (
                StatusCode::UNAUTHORIZED,
                "missing signature (X-Hub-Signature-256)\n",
            )
        }
    }
}

pub async fn serve(addr: &str, secret: Vec<u8>, trigger: Arc<Notify>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind webhook listener {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "webhook receiver listening");
    let app = Router::new()
        .route("/", post(receive))
        .route("/hook", post(receive))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(Hook {
            secret: Arc::new(secret),
            trigger,
        });
    axum::serve(listener, app).await.context("serve webhook")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_signature_example() {
        // HMAC-SHA256("It's a Secret to Everybody", "Hello, World!") as in GitHub's docs.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            sig
        ));
        assert!(!signature_valid(b"wrong", b"Hello, World!", sig));
        assert!(!signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            sig
        ));
        assert!(!signature_valid(b"k", b"b", "sha1=abcd"));
        assert!(!signature_valid(b"k", b"b", "sha256=zz"));
    }
}
