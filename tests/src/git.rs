//! Git peers: a repository with a bare remote, `git daemon`, `git http-backend` behind HTTP
//! (optionally with Basic auth) and an SSH server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::*;

/// A real Git remote (a bare repository) and a working clone to commit and push from.
pub struct GitRepo {
    pub dir: tempfile::TempDir,
    pub bare: PathBuf,
    pub work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "HyperBox Test")
        .env("GIT_AUTHOR_EMAIL", "test@hyperbox.invalid")
        .env("GIT_COMMITTER_NAME", "HyperBox Test")
        .env("GIT_COMMITTER_EMAIL", "test@hyperbox.invalid")
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl GitRepo {
    pub fn new() -> Result<GitRepo> {
        let dir = tempfile::Builder::new().prefix("hbgit").tempdir()?;
        let bare = dir.path().join("remote.git");
        let work = dir.path().join("work");
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        )?;
        git(
            dir.path(),
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        )?;
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()])?;
        Ok(GitRepo { dir, bare, work })
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    pub fn write(&self, path: &str, content: &str) {
        let p = self.work.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn remove(&self, path: &str) {
        fs::remove_file(self.work.join(path)).unwrap();
    }

    /// Commit everything and push; returns the commit id.
    pub fn commit_push(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]).unwrap();
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]).unwrap();
        git(&self.work, &["push", "-q", "origin", "main"]).unwrap();
        git(&self.work, &["rev-parse", "HEAD"]).unwrap()
    }

    pub fn git(&self, args: &[&str]) -> Result<String> {
        git(&self.work, args)
    }
}

/// `git daemon` serving a directory of repositories over git:// on a free port.
pub struct GitDaemon {
    child: Child,
    pub port: u16,
    base: PathBuf,
}

impl GitDaemon {
    pub fn start(base: &Path, port: Option<u16>) -> Result<GitDaemon> {
        use std::os::unix::process::CommandExt;
        // Its own process group: `git daemon` runs git-daemon as a child, and stopping the
        // server must stop both.
        let spawn = |port: u16| {
            Command::new("git")
                .process_group(0)
                .arg("daemon")
                .arg("--reuseaddr")
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(base)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start git daemon")
        };
        let (child, port) = match port {
            // A restart keeps its port (clients know it); --reuseaddr makes that safe.
            Some(port) => {
                let child = spawn(port)?;
                wait_until(Duration::from_secs(10), "git daemon", || {
                    std::net::TcpStream::connect(("127.0.0.1", port)).ok()
                })?;
                (child, port)
            }
            None => spawn_on_free_port("git daemon", spawn)?,
        };
        Ok(GitDaemon {
            child,
            port,
            base: base.to_path_buf(),
        })
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling the process group we created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        *self = GitDaemon::start(&self.base.clone(), Some(self.port))?;
        Ok(())
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `git http-backend` behind a small HTTP server (tests/support/git_http_server.py), optionally
/// demanding Basic auth.
pub struct GitHttpServer {
    child: Child,
    pub port: u16,
}

impl GitHttpServer {
    pub fn start(project_root: &Path, creds: Option<&str>) -> Result<GitHttpServer> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/git_http_server.py");
        let (child, port) = spawn_on_free_port("git http server", |port| {
            let mut cmd = Command::new("python3");
            cmd.arg(&script).arg(port.to_string()).arg(project_root);
            if let Some(c) = creds {
                cmd.arg(c);
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start git http server")
        })?;
        Ok(GitHttpServer { child, port })
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OpenSSH server on a free loopback port that accepts one generated client key for
/// root, serving the repositories on this machine over `ssh://`.
pub struct SshServer {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub client_key: PathBuf,
    /// A known_hosts file holding this server's host key.
    pub known_hosts: PathBuf,
}

fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hyperbox-test", "-f"])
        .arg(path)
        .output()
        .context("run ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl SshServer {
    pub fn start() -> Result<SshServer> {
        let dir = tempfile::Builder::new().prefix("hbssh").tempdir()?;
        let host_key = dir.path().join("host_ed25519");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key)?;
        keygen(&client_key)?;
        fs::copy(
            client_key.with_extension("pub"),
            dir.path().join("authorized_keys"),
        )?;
        let config = dir.path().join("sshd_config");
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd")?;
        let (child, port) = spawn_on_free_port("sshd", |port| {
            fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
                    host_key.display(),
                    dir.path().join("authorized_keys").display()
                ),
            )?;
            Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("sshd.log"))?)
                .spawn()
                .context("start sshd (openssh-server)")
        })?;
        let host_pub = fs::read_to_string(host_key.with_extension("pub"))?;
        let mut parts = host_pub.split_whitespace();
        let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
        let known_hosts = dir.path().join("known_hosts");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {kind} {key}\n"))?;
        Ok(SshServer {
            child,
            dir,
            port,
            client_key,
            known_hosts,
        })
    }

    pub fn url(&self, repo: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, repo.display())
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
