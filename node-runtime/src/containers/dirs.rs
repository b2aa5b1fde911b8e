//! Where the runtime keeps container state on disk.

use std::path::PathBuf;

/// Where the runtime keeps container state.
#[derive(Debug, Clone)]
pub struct RuntimeDirs {
    /// `<state>/containers/<id>`: bundle (config.json), rootfs, upper, work.
    pub containers: PathBuf,
    /// libcontainer's own state root: per boot, under the run dir (tmpfs), so that nothing
    /// from before a reboot (a pid above all) is ever taken for current.
    pub libcontainer_root: PathBuf,
    /// Where an older version kept libcontainer state (in the persistent state dir); only
    /// cleaned up.
    pub legacy_libcontainer_root: Option<PathBuf>,
    /// `<state>/volumes/<workload>/<volume>` for emptyDir volumes.
    pub volumes: PathBuf,
    /// cgroup parent, e.g. `/hyperbox`.
    pub cgroup_parent: String,
}

impl RuntimeDirs {
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }
}
