//! Container creation and exec in a single-threaded helper process.
//!
//! libcontainer starts its helper processes with a raw `clone3`. From the daemon, which has
//! many threads, the child can inherit a lock another thread held at that instant (a malloc
//! arena lock and a Rust std lock were both seen by the chaos soak) and deadlock before it
//! ever execs; the create then never returns. The child also inherits every descriptor of
//! the daemon, live API connections included, and keeps them open if it is orphaned.
//!
//! So the daemon never clones through libcontainer itself. It starts `hyperbox-node
//! __spawner`, a fresh exec of itself that runs one thread and owns only a pipe to the daemon,
//! and sends it requests. libcontainer runs there with `as_sibling`: the container's init
//! (and an exec's process) become children of the daemon, which waits for them and collects
//! exit codes as before. libcontainer's short-lived intermediate process is a child of the
//! daemon as well; the daemon reaps those ([`reap_intermediates`]).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use serde::{Deserialize, Serialize};

/// The argument that turns `hyperbox-node` into the spawner.
pub const SPAWNER_ARG: &str = "__spawner";

/// Longest a create or exec may take inside the spawner before the daemon gives up on it
/// (and replaces the spawner).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    #[serde(rename_all = "camelCase")]
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        log: PathBuf,
        /// Bring up `lo` in the container's own network namespace before it starts.
        loopback: bool,
        /// A cgroup v2 directory to move the container's init into before it starts (hybrid
        /// hosts, where libcontainer only uses the v1 controllers).
        #[serde(default)]
        v2_cgroup: Option<PathBuf>,
    },
    #[serde(rename_all = "camelCase")]
    Exec {
        id: String,
        root: PathBuf,
        args: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// One spawner per daemon; requests are serialized (libcontainer also changes the spawner's
/// working directory while it creates).
static SPAWNER: Mutex<Option<Running>> = Mutex::new(None);

/// Pids of container inits and exec processes the daemon waits for itself: never reaped as
/// strays.
static OWNED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Send a request to the spawner (started, or restarted, on demand) and wait for its answer.
/// The returned pid is already registered as the daemon's own ([`disown`] it once reaped).
pub fn request(req: &Request) -> Result<i32> {
    let mut guard = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
    let alive = guard
        .as_mut()
        .is_some_and(|r| matches!(r.child.try_wait(), Ok(None)));
    if !alive {
        *guard = Some(start()?);
    }
    let r = guard.as_mut().expect("spawner running");
    let result = exchange(r, req);
    if result.is_err() {
        // Out of step or stuck: this spawner is not trusted with another request.
        if let Some(mut dead) = guard.take() {
            let _ = dead.child.kill();
            let _ = dead.child.wait();
        }
    }
    let reply = result?;
    if let Some(pid) = reply.pid {
        OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashSet::new)
            .insert(pid);
    }
    reap_intermediates();
    match (reply.pid, reply.error) {
        (Some(pid), None) => Ok(pid),
        (_, Some(e)) => Err(anyhow!(e)),
        (None, None) => bail!("spawner answered neither a pid nor an error"),
    }
}

/// The daemon has reaped `pid`: it is no longer one of its own children.
pub fn disown(pid: i32) {
    if let Some(set) = OWNED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        set.remove(&pid);
    }
}

fn start() -> Result<Running> {
    let mut child = Command::new("/proc/self/exe")
        .arg(SPAWNER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the container spawner")?;
    let stdin = child.stdin.take().context("spawner stdin")?;
    let stdout = BufReader::new(child.stdout.take().context("spawner stdout")?);
    tracing::debug!(pid = child.id(), "container spawner started");
    Ok(Running {
        child,
        stdin,
        stdout,
    })
}

fn exchange(r: &mut Running, req: &Request) -> Result<Reply> {
    let mut line = serde_json::to_vec(req).context("encode spawner request")?;
    line.push(b'\n');
    r.stdin
        .write_all(&line)
        .and_then(|()| r.stdin.flush())
        .context("send to the container spawner")?;
    // Bounded wait: a stuck create must not hold every other create of the node forever.
    if r.stdout.buffer().is_empty() {
        let mut pfd = libc::pollfd {
            fd: r.stdout.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, REQUEST_TIMEOUT.as_millis() as i32) };
        if n == 0 {
            bail!(
                "the container spawner did not answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            );
        }
    }
    let mut answer = String::new();
    let n = r
        .stdout
        .read_line(&mut answer)
        .context("read from the container spawner")?;
    if n == 0 {
        bail!("the container spawner exited");
    }
    serde_json::from_str(&answer).with_context(|| format!("spawner answer {answer:?}"))
}

/// Reap libcontainer's intermediate processes: children of the daemon (through `as_sibling`)
/// that exit right after starting a container and that nobody else waits for. Only zombies
/// named like them, and never a pid the daemon waits for itself, are touched.
pub fn reap_intermediates() {
    let owned: HashSet<i32> = OWNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    // Only the daemon's own children: each thread's `children` file (cheap, unlike a scan of
    // every process of the machine).
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for pid in list
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if owned.contains(&pid) {
                continue;
            }
            let Ok(stat) = procfs::process::Process::new(pid).and_then(|p| p.stat()) else {
                continue;
            };
            if stat.state == 'Z' && stat.comm.starts_with("youki:[1:INTER") {
                let mut status = 0;
                // SAFETY: non-blocking waitpid of one specific zombie child.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
            }
        }
    }
}

/// The spawner's main loop: one request per line on stdin, one answer per line on stdout.
/// Runs single-threaded (apart from a short-lived thread for `lo`, joined before the next
/// request), so libcontainer's clones never copy a lock held by another thread.
pub fn serve() -> ! {
    // Die with the daemon rather than linger.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match handle(req) {
                Ok(pid) => Reply {
                    pid: Some(pid),
                    error: None,
                },
                Err(e) => Reply {
                    pid: None,
                    error: Some(format!("{e:#}")),
                },
            },
            Err(e) => Reply {
                pid: None,
                error: Some(format!("bad spawner request: {e}")),
            },
        };
        let mut text = serde_json::to_vec(&reply).unwrap_or_default();
        text.push(b'\n');
        if out.write_all(&text).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

fn devnull() -> Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?
        .into())
}

fn handle(req: Request) -> Result<i32> {
    match req {
        Request::Create {
            id,
            root,
            bundle,
            log,
            loopback,
            v2_cgroup,
        } => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("open log {}", log.display()))?;
            let log_err: OwnedFd = log.try_clone().context("dup log fd")?.into();
            let mut container = ContainerBuilder::new(id.clone(), SyscallType::default())
                .with_executor(DefaultExecutor {})
                .with_root_path(&root)
                .map_err(|e| anyhow!("libcontainer root: {e}"))?
                .with_stdin(devnull()?)
                .with_stdout(OwnedFd::from(log))
                .with_stderr(log_err)
                .validate_id()
                .map_err(|e| anyhow!("container id {id}: {e}"))?
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| anyhow!("create container {id}: {e}"))?;
            let pid = container
                .pid()
                .ok_or_else(|| anyhow!("container {id} has no pid after create"))?
                .as_raw();
            if loopback {
                super::netns::bring_up_loopback(pid)?;
            }
            if let Some(dir) = &v2_cgroup {
                // Before start: everything the init runs is then accounted there (PSI, and
                // the cgroup id eBPF attributes by).
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()))
                    .with_context(|| format!("move container {id} into {}", dir.display()))?;
            }
            container
                .start()
                .map_err(|e| anyhow!("start container {id}: {e}"))?;
            Ok(pid)
        }
        Request::Exec { id, root, args } => {
            let pid = ContainerBuilder::new(id.clone(), SyscallType::default())
                .with_executor(DefaultExecutor {})
                .with_root_path(&root)
                .map_err(|e| anyhow!("libcontainer root: {e}"))?
                .with_stdin(devnull()?)
                .with_stdout(devnull()?)
                .with_stderr(devnull()?)
                .as_tenant()
                .with_container_args(args)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| anyhow!("exec in {id}: {e}"))?;
            Ok(pid.as_raw())
        }
    }
}
