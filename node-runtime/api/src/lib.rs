//! Types shared by the HyperBox node runtime and the operator: the Workload schema, its
//! validation, statuses and small shared helpers. No Kubernetes and no async runtime here
//! (the node API client is `hyperbox-client`).

pub mod backoff;
pub mod hypernode;
pub mod key;
pub mod quantity;
pub mod reason;
pub mod reference;
pub mod spec;
pub mod status;
pub mod util;
pub mod validate;

pub use key::{normalize_key, split_key, workload_key, DEFAULT_NAMESPACE};
pub use reason::Reason;
pub use spec::*;

/// Largest request body `hyperbox-node serve` accepts (its server's `MAX_BODY_BYTES`). Clients
/// that batch keep each request under it.
pub const NODE_MAX_BODY_BYTES: usize = 4 << 20;

pub use status::*;
