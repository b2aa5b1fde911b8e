//! An in-memory [`Runtime`]: containers are records, processes are condition variables a test
//! ends with [`FakeRuntime::exit`]. It checks the rules the real runtime must keep (no start of
//! an id twice, no signal to a container that is not running) and counts every call.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};

use super::lifecycle::StartRequest;
use super::process::{ProcHandle, ProcIdentity};
use super::runtime::{Runtime, Started};

#[derive(Debug, Default, Clone)]
pub struct FakeContainer {
    pub pid: i32,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub oom: bool,
    pub killed: bool,
    pub destroyed: bool,
    pub image: String,
}

#[derive(Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    next_pid: i32,
    /// Ids whose next start fails with this message.
    fail_start: BTreeMap<String, String>,
    fail_all_starts: Option<String>,
    starts: usize,
    destroys: usize,
}

#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
    changed: Condvar,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// End a container's init with this exit code.
    pub fn exit(&self, id: &str, code: i32) {
        let mut st = self.state.lock().unwrap();
        if let Some(c) = st.containers.get_mut(id) {
            if c.running {
                c.running = false;
                c.exit_code = Some(code);
            }
        }
        self.changed.notify_all();
    }

    pub fn fail_starts(&self, message: Option<&str>) {
        self.state.lock().unwrap().fail_all_starts = message.map(str::to_string);
    }

    pub fn containers(&self) -> BTreeMap<String, FakeContainer> {
        self.state.lock().unwrap().containers.clone()
    }

    /// Ids of containers whose init is running.
    pub fn running(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .iter()
            .filter(|(_, c)| c.running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn starts(&self) -> usize {
        self.state.lock().unwrap().starts
    }

    /// Put a container in place as if a previous daemon had started it.
    pub fn preexisting(&self, id: &str, pid: i32) {
        let mut st = self.state.lock().unwrap();
        st.containers.insert(
            id.to_string(),
            FakeContainer {
                pid,
                running: true,
                ..Default::default()
            },
        );
    }
}

impl Runtime for FakeRuntime {
    fn start(&self, req: &StartRequest<'_>) -> Result<Started> {
        let mut st = self.state.lock().unwrap();
        st.starts += 1;
        if let Some(m) = st.fail_all_starts.clone() {
            bail!("{m}");
        }
        if let Some(m) = st.fail_start.remove(req.id) {
            bail!("{m}");
        }
        if st.containers.contains_key(req.id) {
            bail!("container {} already exists", req.id);
        }
        st.next_pid += 1;
        let pid = 1000 + st.next_pid;
        st.containers.insert(
            req.id.to_string(),
            FakeContainer {
                pid,
                running: true,
                image: req.image.digest.clone(),
                ..Default::default()
            },
        );
        Ok(Started {
            proc: ProcHandle::detached(pid, true),
            identity: ProcIdentity {
                pid,
                boot_id: "fake-boot".into(),
                start_ticks: pid as u64,
            },
        })
    }

    fn adopt(&self, id: &str, identity: &ProcIdentity) -> Result<ProcHandle, String> {
        let st = self.state.lock().unwrap();
        match st.containers.get(id) {
            Some(c) if c.running && c.pid == identity.pid && identity.boot_id == "fake-boot" => {
                Ok(ProcHandle::detached(c.pid, false))
            }
            _ => Err(format!(
                "container {id} is not running as pid {}",
                identity.pid
            )),
        }
    }

    fn signal(&self, id: &str, _proc: &ProcHandle, sig: i32) {
        let mut st = self.state.lock().unwrap();
        if let Some(c) = st.containers.get_mut(id) {
            if c.running && sig == libc::SIGTERM {
                c.running = false;
                c.exit_code = Some(143);
            }
        }
        self.changed.notify_all();
    }

    fn wait(&self, proc: &ProcHandle) -> Option<i32> {
        let mut st = self.state.lock().unwrap();
        loop {
            let c = st.containers.values().find(|c| c.pid == proc.pid)?;
            if !c.running {
                return if proc.own_child { c.exit_code } else { None };
            }
            st = self.changed.wait(st).unwrap();
        }
    }

    fn kill_all(&self, id: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(c) = st.containers.get_mut(id) {
            if c.running {
                c.running = false;
                c.killed = true;
                c.exit_code = Some(137);
            }
        }
        self.changed.notify_all();
    }

    fn oom_kills(&self, id: &str) -> u64 {
        let st = self.state.lock().unwrap();
        st.containers.get(id).map_or(0, |c| u64::from(c.oom))
    }

    fn destroy(&self, id: &str) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.destroys += 1;
        if let Some(c) = st.containers.get_mut(id) {
            c.running = false;
            c.destroyed = true;
        }
        st.containers.remove(id);
        self.changed.notify_all();
        Ok(())
    }

    fn list(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
            .collect()
    }

    fn exec(&self, id: &str, _command: &[String], _timeout: Duration) -> Result<i32> {
        let st = self.state.lock().unwrap();
        match st.containers.get(id) {
            Some(c) if c.running => Ok(0),
            _ => bail!("container {id} is not running"),
        }
    }

    fn http_get(&self, _: &ProcHandle, _: &str, _: u16, _: &str, _: Duration) -> bool {
        false
    }
}
