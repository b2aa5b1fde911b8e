//! Error type of the crate.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where an error happened: the layer digest and, when known, the raw path of
/// the tar entry being applied.
///
/// Displays as `layer sha256:ab12..` or `layer sha256:ab12..: entry "etc/passwd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Digest of the layer, as given to [`crate::Unpacker::apply_layer`].
    pub layer: String,
    /// Raw (un-normalized) entry path from the archive, lossily decoded.
    pub entry: Option<String>,
}

impl Location {
    pub(crate) fn layer(layer: &str) -> Self {
        Location {
            layer: layer.to_owned(),
            entry: None,
        }
    }

    pub(crate) fn entry(layer: &str, raw_path: &[u8]) -> Self {
        Location {
            layer: layer.to_owned(),
            entry: Some(String::from_utf8_lossy(raw_path).into_owned()),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.layer)?;
        if let Some(entry) = &self.entry {
            write!(f, ": entry {entry:?}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong while applying layers.
///
/// Every variant raised while applying a layer carries a [`Location`] naming
/// the layer digest and (where there is one) the entry path.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The target directory could not be created or opened.
    #[error("open target directory {path:?}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The entry path is absolute or contains a `..` component.
    #[error("{at}: path escapes the root")]
    PathEscapes { at: Location },

    /// A parent component of the entry path is a symlink; it is never
    /// followed.
    #[error("{at}: parent is a symlink ({parent:?}), refusing to follow it")]
    ParentSymlink { at: Location, parent: String },

    /// A parent component of the entry path exists and is not a directory.
    #[error("{at}: parent {parent:?} is not a directory")]
    ParentNotDirectory { at: Location, parent: String },

    /// A character or block device entry while devices are not allowed.
    #[error("{at}: device nodes are not allowed")]
    DeviceNotAllowed { at: Location },

    /// A hardlink whose target is absolute or contains `..`.
    #[error("{at}: hardlink target {target:?} escapes the root")]
    HardlinkEscapes { at: Location, target: String },

    /// A hardlink whose target cannot be linked (missing, directory,
    /// symlink, reached through a symlink, ...).
    #[error("{at}: hardlink target {target:?} {reason}")]
    HardlinkTarget {
        at: Location,
        target: String,
        reason: &'static str,
    },

    /// The total expanded size of the image exceeds
    /// [`crate::UnpackOptions::max_bytes`].
    #[error("{at}: expanded size exceeds the limit of {limit} bytes")]
    SizeLimit { at: Location, limit: u64 },

    /// The total number of entries of the image exceeds
    /// [`crate::UnpackOptions::max_entries`].
    #[error("{at}: entry count exceeds the limit of {limit} entries")]
    EntryLimit { at: Location, limit: u64 },

    /// A malformed or unsupported entry (bad whiteout name, NUL in a path,
    /// sparse file, link without target, ...).
    #[error("{at}: {reason}")]
    InvalidEntry { at: Location, reason: String },

    /// A filesystem operation failed; `op` says which one.
    #[error("{at}: {op}: {source}")]
    Io {
        at: Location,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// Reading the layer failed: `stream` is `read layer blob` (the
    /// caller's reader), `gzip stream` / `zstd stream` (decompression) or
    /// `tar stream` (malformed archive).
    #[error("{at}: {stream}: {source}")]
    Stream {
        at: Location,
        stream: &'static str,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// The location (layer and entry) of the error, if it happened while
    /// applying a layer.
    pub fn location(&self) -> Option<&Location> {
        match self {
            UnpackError::Target { .. } => None,
            UnpackError::PathEscapes { at }
            | UnpackError::ParentSymlink { at, .. }
            | UnpackError::ParentNotDirectory { at, .. }
            | UnpackError::DeviceNotAllowed { at }
            | UnpackError::HardlinkEscapes { at, .. }
            | UnpackError::HardlinkTarget { at, .. }
            | UnpackError::SizeLimit { at, .. }
            | UnpackError::EntryLimit { at, .. }
            | UnpackError::InvalidEntry { at, .. }
            | UnpackError::Io { at, .. }
            | UnpackError::Stream { at, .. } => Some(at),
        }
    }
}
