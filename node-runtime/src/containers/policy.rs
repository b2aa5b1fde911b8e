//! What this node lets a workload do, whoever sent it: the box's operator sets it with flags,
//! and it bounds what anyone who can push to a watched Git path (or holds a node token) can run.
//!
//! - hostPath volumes only under allowed directories (by default only HyperBox's volumes dir);
//! - no `CAP_NET_RAW` unless allowed;
//! - a seccomp allow-list (see [`super::seccomp`]).
//!
//! Admission checks are pure and give field errors naming the rule; the runtime checks again
//! with symlinks resolved when it builds the container, since a path can change in between.

use std::path::{Component, Path, PathBuf};

use hyperbox_api::validate::FieldError;
use hyperbox_api::Workload;

#[derive(Debug, Clone)]
pub struct NodePolicy {
    /// Directories under which hostPath volumes may point.
    pub host_path_allow: Vec<PathBuf>,
    /// Grant `CAP_NET_RAW` (raw sockets, ping) to containers.
    pub allow_net_raw: bool,
}

impl NodePolicy {
    /// Errors for every hostPath outside the allow-list, with field paths relative to the
    /// workload (`spec.volumes[1].hostPath.path`).
    pub fn check(&self, w: &Workload) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (i, v) in w.spec.volumes.iter().enumerate() {
            let Some(h) = &v.host_path else {
                continue;
            };
            let field = format!("spec.volumes[{i}].hostPath.path");
            match normalize(Path::new(&h.path)) {
                None => out.push(FieldError {
                    field,
                    message: format!(
                        "{:?} must be an absolute path without \"..\" (node policy)",
                        h.path
                    ),
                    line: None,
                    reason: None,
                }),
                Some(p) if !self.host_path_allowed(&p) => out.push(FieldError {
                    field,
                    message: format!(
                        "{} is outside the host paths this node allows ({}); the node's operator can allow more with --allow-host-path",
                        p.display(),
                        self.allowed_list()
                    ),
                    line: None,
                    reason: None,
                }),
                Some(_) => {}
            }
        }
        out
    }

    /// Whether `p` (absolute, normalized) lies under an allowed directory.
    pub fn host_path_allowed(&self, p: &Path) -> bool {
        self.host_path_allow.iter().any(|a| p.starts_with(a))
    }

    pub fn allowed_list(&self) -> String {
        if self.host_path_allow.is_empty() {
            return "none".into();
        }
        self.host_path_allow
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An absolute path with `.` removed; `None` for relative paths or any `..`.
fn normalize(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(x) => out.push(x),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(paths: &[&str]) -> Workload {
        let vols: String = paths
            .iter()
            .enumerate()
            .map(|(i, p)| format!("  - {{name: v{i}, hostPath: {{path: '{p}'}}}}\n"))
            .collect();
        serde_norway::from_str(&format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: a}}\nspec:\n  image: x\n  volumes:\n{vols}"
        ))
        .unwrap()
    }

    fn policy() -> NodePolicy {
        NodePolicy {
            host_path_allow: vec!["/var/lib/hyperbox/volumes".into(), "/srv/data".into()],
            allow_net_raw: false,
        }
    }

    #[test]
    fn host_paths_must_sit_under_an_allowed_dir() {
        let errs = policy().check(&w(&[
            "/srv/data/app",
            "/srv/database",
            "/etc/shadow",
            "/srv/data/../../etc",
            "relative/x",
            "/srv/data",
        ]));
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.volumes[1].hostPath.path",
                "spec.volumes[2].hostPath.path",
                "spec.volumes[3].hostPath.path",
                "spec.volumes[4].hostPath.path",
            ]
        );
        assert!(
            errs[1].message.contains("--allow-host-path"),
            "{}",
            errs[1].message
        );
        assert!(errs[1].message.contains("/srv/data"));
    }

    #[test]
    fn nothing_allowed_means_no_host_paths() {
        let p = NodePolicy {
            host_path_allow: vec![],
            allow_net_raw: false,
        };
        assert_eq!(p.check(&w(&["/tmp"])).len(), 1);
        assert!(p.check(&w(&[])).is_empty());
    }
}
