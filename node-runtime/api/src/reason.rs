//! Why a replica or a workload is in its phase, as it travels on the wire and is kept in
//! records. The reasons this build knows are variants (Kubernetes' words where one exists);
//! any other is kept as it was written ([`Reason::Other`]), so an older operator reading a
//! newer node passes a new reason on unchanged instead of failing or dropping it.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    ContainerCreating,
    ErrImagePull,
    ErrImagePrepare,
    ImagePullBackOff,
    InvalidImage,
    CreateContainerError,
    CrashLoopBackOff,
    /// `OOMKilled` on the wire.
    OomKilled,
    Completed,
    Error,
    Unknown,
    Terminating,
    /// Stopped on purpose by the node or a controller (pressure, placement): not restarted
    /// until someone restarts or re-places it.
    Evicted,
    /// Evicted by the node's pressure protection (lowest priority first); restarted when the
    /// node has been calm for a while, or placed elsewhere by a source with other nodes.
    EvictedForPressure,
    /// A workload's: suspended (`spec.suspend`), its replicas stopped.
    Suspended,
    /// A workload's: a standby copy (`spec.standby`) that runs no replica.
    Standby,
    /// A workload's: its record on the node could not be read.
    RecordUnreadable,
    /// A workload's: its rollout made no progress within `progressDeadlineSeconds`.
    ProgressDeadlineExceeded,
    /// A reason this build does not know, as written.
    Other(String),
}

const KNOWN: &[(&str, Reason)] = &[
    ("ContainerCreating", Reason::ContainerCreating),
    ("ErrImagePull", Reason::ErrImagePull),
    ("ErrImagePrepare", Reason::ErrImagePrepare),
    ("ImagePullBackOff", Reason::ImagePullBackOff),
    ("InvalidImage", Reason::InvalidImage),
    ("CreateContainerError", Reason::CreateContainerError),
    ("CrashLoopBackOff", Reason::CrashLoopBackOff),
    ("OOMKilled", Reason::OomKilled),
    ("Completed", Reason::Completed),
    ("Error", Reason::Error),
    ("Unknown", Reason::Unknown),
    ("Terminating", Reason::Terminating),
    ("Evicted", Reason::Evicted),
    ("EvictedForPressure", Reason::EvictedForPressure),
    ("Suspended", Reason::Suspended),
    ("Standby", Reason::Standby),
    ("RecordUnreadable", Reason::RecordUnreadable),
    ("ProgressDeadlineExceeded", Reason::ProgressDeadlineExceeded),
];

impl Reason {
    /// The reason named `s`: a known one, or [`Reason::Other`].
    pub fn parse(s: &str) -> Reason {
        KNOWN
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Reason::Other(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        if let Reason::Other(s) = self {
            return s;
        }
        KNOWN
            .iter()
            .find(|(_, r)| r == self)
            .map(|(name, _)| *name)
            .expect("every known reason has its name")
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Reason, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        Ok(Reason::parse(&s))
    }
}

impl JsonSchema for Reason {
    fn schema_name() -> Cow<'static, str> {
        "Reason".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reasons_round_trip_and_unknown_ones_are_kept_as_written() {
        for (name, r) in KNOWN {
            assert_eq!(Reason::parse(name), *r);
            assert_eq!(r.as_str(), *name);
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), *r);
        }
        // A newer node's reason: kept, and written back unchanged.
        let r: Reason = serde_json::from_str("\"NodeDraining\"").unwrap();
        assert_eq!(r, Reason::Other("NodeDraining".into()));
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"NodeDraining\"");
        assert_eq!(Reason::OomKilled.to_string(), "OOMKilled");
    }
}
