//! Fencing of elected leaders. A write made by an elected operator carries its epoch (the
//! Lease's transitions) for a scope (`kubernetes:<cluster>`). The node keeps the newest epoch
//! it has seen per scope, durably in `<state>/fences.json`, and refuses a write with an older
//! one: a leader that lost its lease without knowing it (cut off from the API server, or
//! paused) cannot undo what its successor did. Writes without an epoch (by hand, Git sources)
//! are not fenced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result};

const FILE: &str = "fences.json";

pub struct Fences {
    path: PathBuf,
    newest: Mutex<BTreeMap<String, u64>>,
}

/// Why a write was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its epoch is older than the newest seen for its scope.
    Stale {
        scope: String,
        epoch: u64,
        newest: u64,
    },
    /// The header is not `<scope>=<epoch>`.
    Malformed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Stale {
                scope,
                epoch,
                newest,
            } => write!(
                f,
                "fenced: {scope} is at leader epoch {newest}, this write is from epoch {epoch} (a newer leader took over)"
            ),
            Refusal::Malformed(v) => write!(
                f,
                "x-hyperbox-fence: {v:?} is not <scope>=<epoch>"
            ),
        }
    }
}

/// Parse `<scope>=<epoch>`.
pub fn parse(value: &str) -> Result<(&str, u64), Refusal> {
    let malformed = || Refusal::Malformed(value.chars().take(200).collect());
    let (scope, epoch) = value.rsplit_once('=').ok_or_else(malformed)?;
    let epoch = epoch.trim().parse::<u64>().map_err(|_| malformed())?;
    let scope = scope.trim();
    if scope.is_empty() || scope.len() > 253 {
        return Err(malformed());
    }
    Ok((scope, epoch))
}

impl Fences {
    /// Load the epochs seen before (none on a new state dir).
    pub fn open(state_dir: &Path) -> Result<Fences> {
        let path = state_dir.join(FILE);
        let newest = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{}: not a map of scopes to epochs; move it away to forget them",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(Fences {
            path,
            newest: Mutex::new(newest),
        })
    }

    /// Admit a write that carries `header`: refused when its epoch is older than the newest
    /// seen for its scope; a newer epoch is recorded durably before the write goes on.
    pub fn admit(&self, header: &str) -> Result<Result<(), Refusal>> {
        let (scope, epoch) = match parse(header) {
            Ok(v) => v,
            Err(r) => return Ok(Err(r)),
        };
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        match newest.get(scope).copied() {
            Some(n) if epoch < n => {
                return Ok(Err(Refusal::Stale {
                    scope: scope.to_string(),
                    epoch,
                    newest: n,
                }))
            }
            Some(n) if epoch == n => return Ok(Ok(())),
            _ => {}
        }
        let mut next = newest.clone();
        next.insert(scope.to_string(), epoch);
        let bytes = serde_json::to_vec_pretty(&next).context("serialize fences")?;
        crate::fsutil::write_atomic(&self.path, &bytes)
            .with_context(|| format!("write {}", self.path.display()))?;
        *newest = next;
        tracing::info!(
            scope,
            epoch,
            "a new leader epoch: writes of older ones are refused"
        );
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_epochs_are_refused_and_the_newest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fences::open(dir.path()).unwrap();
        assert_eq!(f.admit("kubernetes:prod=3").unwrap(), Ok(()));
        assert_eq!(f.admit("kubernetes:prod=3").unwrap(), Ok(()));
        assert_eq!(f.admit("kubernetes:prod=4").unwrap(), Ok(()));
        let stale = f.admit("kubernetes:prod=3").unwrap().unwrap_err();
        assert_eq!(
            stale,
            Refusal::Stale {
                scope: "kubernetes:prod".into(),
                epoch: 3,
                newest: 4
            }
        );
        assert!(stale.to_string().contains("a newer leader took over"));
        // Scopes are separate.
        assert_eq!(f.admit("kubernetes:staging=1").unwrap(), Ok(()));
        drop(f);
        let f = Fences::open(dir.path()).unwrap();
        assert!(f.admit("kubernetes:prod=3").unwrap().is_err());
        assert_eq!(f.admit("kubernetes:prod=4").unwrap(), Ok(()));
        for bad in ["", "=3", "prod", "prod=x", "prod=-1"] {
            assert!(
                matches!(f.admit(bad).unwrap(), Err(Refusal::Malformed(_))),
                "{bad}"
            );
        }
    }
}
