//! Types shared by the HyperBox node runtime and the operator, and the node API client.
//! This crate must stay free of Kubernetes dependencies: the node runs without them.

pub mod client;
pub mod cliutil;
pub mod quantity;
pub mod reference;
pub mod spec;
pub mod status;
pub mod validate;

pub use spec::*;
pub use status::*;
