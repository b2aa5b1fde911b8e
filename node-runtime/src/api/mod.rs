//! The node API: HTTP/JSON over a unix socket (mode 0600) and, optionally, TCP guarded by a
//! bearer token (`listen`), and the Prometheus `/metrics` listener (`metrics`). One file
//! per resource: `workloads`, `replicas`, `logs`, `digests`, `images`, `node`.
//! Bodies are size-capped; invalid specs get 400 with the field paths.
//!
//! It only translates: a request is checked and handed to `crate::workloads` (the
//! `Supervisor`), and its answer is encoded. It may call `crate::workloads` and, to encode
//! metrics, `crate::telemetry`; nothing in the node calls it but the daemon.

mod digests;
mod images;
mod listen;
mod logs;
mod metrics;
mod node;
mod replicas;
mod request;
mod router;
mod workloads;

pub use listen::{serve_tcp, serve_unix, server_config, ServerTls};
pub use metrics::{metrics_text, serve_metrics};
pub use router::{router, DIGESTS_VERSION_HEADER, MAX_BODY_BYTES};
pub use workloads::parse_apply_body;
