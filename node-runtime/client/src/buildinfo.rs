//! What a binary is and was built from: version, Git commit and features, printed by
//! `--version` and `version` so a support request says exactly what runs.

use std::fmt::Write as _;

/// The package version (the workspace's, shared by both binaries).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Git commit the binary was built from (see `build.rs`), or "unknown".
pub const GIT_COMMIT: &str = env!("HYPERBOX_GIT_COMMIT");

/// One line of the feature list: a name and what state it is in on this build or machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub state: String,
}

impl Feature {
    pub fn new(name: &'static str, state: impl Into<String>) -> Feature {
        Feature {
            name,
            state: state.into(),
        }
    }
}

/// The one-line version for `-V`: `0.1.0 (commit 0123456789ab)`.
pub fn short_version() -> String {
    format!("{VERSION} (commit {GIT_COMMIT})")
}

/// The full version for `--version` and `version`, without the binary name (clap prints it
/// first): the version line, the commit and one line per feature.
pub fn long_version(features: &[Feature]) -> String {
    let mut s = format!("{VERSION}\ncommit: {GIT_COMMIT}\nfeatures:");
    for f in features {
        let _ = write!(s, "\n  {}: {}", f.name, f.state);
    }
    s
}

/// Whether the command line asks for the long version. The features are only detected then
/// (detection reads /proc and may load a kernel module), not on every command.
pub fn long_version_requested() -> bool {
    std::env::args_os().skip(1).any(|a| a == "--version")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_version_lists_commit_and_features() {
        let v = long_version(&[
            Feature::new("ebpf", "not built"),
            Feature::new("erofs", "available"),
        ]);
        let lines: Vec<&str> = v.lines().collect();
        assert_eq!(lines[0], VERSION);
        assert_eq!(lines[1], format!("commit: {GIT_COMMIT}"));
        assert_eq!(lines[2], "features:");
        assert_eq!(lines[3], "  ebpf: not built");
        assert_eq!(lines[4], "  erofs: available");
    }

    #[test]
    fn commit_is_one_word() {
        assert!(!GIT_COMMIT.is_empty());
        // A hash from git, "unknown", or whatever a packager set: one word either way.
        assert!(!GIT_COMMIT.contains(char::is_whitespace), "{GIT_COMMIT:?}");
    }

    #[test]
    fn short_version_names_the_commit() {
        assert_eq!(short_version(), format!("{VERSION} (commit {GIT_COMMIT})"));
    }
}
