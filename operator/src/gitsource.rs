//! The Git source: a bare repository in the operator's state dir, fetched incrementally with
//! git2 (file://, git://, https with a token, ssh with a key and known_hosts), and manifests read
//! straight from the commit's tree (no checkout: nothing is written per file).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use git2::{
    CertificateCheckStatus, Cred, CredentialType, FetchOptions, Oid, RemoteCallbacks, Repository,
    TreeWalkMode, TreeWalkResult,
};
use hyperbox_api::validate::MAX_MANIFEST_BYTES;

use crate::manifests::{is_manifest, parse_file, ParsedFile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitRef {
    /// The remote's default branch (its HEAD).
    Head,
    Branch(String),
    Tag(String),
    Commit(String),
}

impl std::fmt::Display for GitRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitRef::Head => write!(f, "HEAD"),
            GitRef::Branch(b) => write!(f, "branch {b}"),
            GitRef::Tag(t) => write!(f, "tag {t}"),
            GitRef::Commit(c) => write!(f, "commit {c}"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    /// HTTPS: a token or password, read from this file at each fetch (so it can rotate).
    pub token_file: Option<PathBuf>,
    pub username: Option<String>,
    /// SSH: private key file.
    pub ssh_key: Option<PathBuf>,
    /// SSH: known_hosts file the server's host key must be in (plain, unhashed entries).
    pub known_hosts: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct GitConfig {
    pub url: String,
    pub reference: GitRef,
    /// Directory inside the repository holding the manifests ("" for the root).
    pub path: String,
    pub auth: GitAuth,
}

pub struct GitSource {
    repo: Repository,
    cfg: GitConfig,
    /// Parsed manifests by blob id: a commit that changes one file re-parses one file.
    cache: HashMap<Oid, Arc<ParsedFile>>,
}

const TRACKING_REF: &str = "refs/hyperbox/source";

/// Defaults for libgit2's network timeouts: a server that accepts and then stalls fails the
/// fetch (and so the sync, which is retried) instead of hanging it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What `set_network_timeouts` set, in milliseconds, for error messages.
static CONNECT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);
static READ_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

fn timeout_ms(what: &str, d: Duration) -> Result<libc::c_int> {
    match libc::c_int::try_from(d.as_millis()) {
        Ok(0) => bail!("{what} must be at least 1ms (0 would mean no timeout)"),
        Ok(ms) => Ok(ms),
        Err(_) => bail!("{what} of {d:?} is too long"),
    }
}

/// Set libgit2's server connect timeout and server (read and write) timeout, for every fetch
/// in this process. They apply to the socket under git://, http(s):// and ssh://.
///
/// # Safety
/// libgit2 keeps these in unsynchronized globals: call this before any other thread exists
/// (before the async runtime starts), and never while a fetch may be running.
pub unsafe fn set_network_timeouts(connect: Duration, read: Duration) -> Result<()> {
    let connect_ms = timeout_ms("the git connect timeout", connect)?;
    let read_ms = timeout_ms("the git timeout", read)?;
    // SAFETY: the caller guarantees no other thread touches libgit2 meanwhile.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(connect_ms)
            .context("set the git server connect timeout")?;
        git2::opts::set_server_timeout_in_milliseconds(read_ms)
            .context("set the git server timeout")?;
    }
    CONNECT_TIMEOUT_MS.store(connect_ms as u64, Ordering::Relaxed);
    READ_TIMEOUT_MS.store(read_ms as u64, Ordering::Relaxed);
    tracing::debug!(?connect, ?read, "git network timeouts set");
    Ok(())
}

/// Whether libgit2 gave up waiting for the server.
fn is_timeout(e: &git2::Error) -> bool {
    e.code() == git2::ErrorCode::Timeout || e.message().contains("timed out")
}

impl GitSource {
    pub fn open(dir: &Path, cfg: GitConfig) -> Result<GitSource> {
        let repo = match Repository::open_bare(dir) {
            Ok(r) => r,
            Err(_) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                Repository::init_bare(dir)
                    .with_context(|| format!("init git repository in {}", dir.display()))?
            }
        };
        Ok(GitSource {
            repo,
            cfg,
            cache: HashMap::new(),
        })
    }

    pub fn config(&self) -> &GitConfig {
        &self.cfg
    }

    /// Fetch the configured reference and return the commit it points at.
    pub fn fetch(&self) -> Result<String> {
        let url = &self.cfg.url;
        let mut remote = self
            .repo
            .remote_anonymous(url)
            .with_context(|| format!("git remote {url}"))?;
        let (refspec, shallow) = match &self.cfg.reference {
            GitRef::Head => (format!("+HEAD:{TRACKING_REF}"), true),
            GitRef::Branch(b) => (format!("+refs/heads/{b}:{TRACKING_REF}"), true),
            GitRef::Tag(t) => (format!("+refs/tags/{t}:{TRACKING_REF}"), true),
            // Any commit: fetch the branches (servers rarely serve arbitrary SHAs).
            GitRef::Commit(_) => ("+refs/heads/*:refs/remotes/origin/*".to_string(), false),
        };
        // libgit2 replaces a refused host key's reason with a generic message: keep ours.
        let refusal: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let mut attempt = |depth: Option<i32>| -> Result<(), git2::Error> {
            let mut fo = FetchOptions::new();
            fo.remote_callbacks(self.callbacks(refusal.clone()));
            if let Some(d) = depth {
                fo.depth(d);
            }
            fo.download_tags(git2::AutotagOption::None);
            remote.fetch(&[refspec.as_str()], Some(&mut fo), None)
        };
        // Shallow where the transport allows it; libgit2's local transport does not.
        let result = if shallow && !url.starts_with("file://") && !url.starts_with('/') {
            match attempt(Some(1)) {
                Ok(()) => Ok(()),
                // A server that does not answer will not answer a full fetch either.
                Err(e) if is_timeout(&e) => Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "shallow fetch refused, fetching full history");
                    attempt(None)
                }
            }
        } else {
            attempt(None)
        };
        result.map_err(|e| {
            let mut reason = refusal
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| e.message().to_string());
            if is_timeout(&e) {
                let ms = |a: &AtomicU64| Duration::from_millis(a.load(Ordering::Relaxed));
                reason.push_str(&format!(
                    " (git timeouts: connect {:?}, read {:?}; see --git-connect-timeout, --git-timeout)",
                    ms(&CONNECT_TIMEOUT_MS),
                    ms(&READ_TIMEOUT_MS)
                ));
            }
            anyhow!("fetch {} from {url}: {reason}", self.cfg.reference)
        })?;
        let oid = match &self.cfg.reference {
            GitRef::Commit(c) => {
                let oid =
                    Oid::from_str(c).with_context(|| format!("--commit {c:?} is not a sha"))?;
                self.repo
                    .find_commit(oid)
                    .with_context(|| format!("commit {c} is not on any branch of {url}"))?
                    .id()
            }
            _ => self
                .repo
                .find_reference(TRACKING_REF)
                .and_then(|r| r.peel_to_commit())
                .with_context(|| format!("{} of {url} is not a commit", self.cfg.reference))?
                .id(),
        };
        Ok(oid.to_string())
    }

    fn callbacks(
        &self,
        refusal: Arc<std::sync::Mutex<Option<String>>>,
    ) -> RemoteCallbacks<'static> {
        let auth = self.cfg.auth.clone();
        let mut cb = RemoteCallbacks::new();
        let mut attempts = 0;
        cb.credentials(move |_url, username_from_url, allowed| {
            attempts += 1;
            if attempts > 3 {
                return Err(git2::Error::from_str(
                    "authentication failed (credentials refused)",
                ));
            }
            if allowed.contains(CredentialType::SSH_KEY) {
                if let Some(key) = &auth.ssh_key {
                    let user = auth
                        .username
                        .as_deref()
                        .or(username_from_url)
                        .unwrap_or("git");
                    return Cred::ssh_key(user, None, key, None);
                }
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                if let Some(f) = &auth.token_file {
                    let token = hyperbox_api::util::read_secret_file(f, "token")
                        .map_err(|e| git2::Error::from_str(&e))?;
                    let user = auth
                        .username
                        .as_deref()
                        .or(username_from_url)
                        .unwrap_or("git");
                    return Cred::userpass_plaintext(user, &token);
                }
            }
            Err(git2::Error::from_str(
                "the server wants credentials and none are configured",
            ))
        });
        let known_hosts = self.cfg.auth.known_hosts.clone();
        cb.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // TLS: libgit2 checks the certificate chain against the system roots.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let verdict = match (hostkey.hostkey(), &known_hosts) {
                (None, _) => Err("ssh server sent no host key".to_string()),
                (Some(_), None) => {
                    Err("refusing an unverified ssh host key: pass --known-hosts".to_string())
                }
                (Some(key), Some(file)) => match known_hosts_contains(file, host, key) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!("host key of {host} is not in {}", file.display())),
                    Err(e) => Err(format!("{e:#}")),
                },
            };
            match verdict {
                Ok(()) => Ok(CertificateCheckStatus::CertificateOk),
                Err(reason) => {
                    *refusal.lock().unwrap() = Some(reason.clone());
                    Err(git2::Error::from_str(&reason))
                }
            }
        });
        cb
    }

    /// The manifests of `commit` under the configured path, parsed (cached by blob id).
    pub fn manifests(&mut self, commit: &str) -> Result<Vec<(String, Arc<ParsedFile>)>> {
        let oid = Oid::from_str(commit)?;
        let tree = self.repo.find_commit(oid)?.tree()?;
        let dir = self.cfg.path.trim_matches('/');
        let tree = if dir.is_empty() || dir == "." {
            tree
        } else {
            let entry = tree
                .get_path(Path::new(dir))
                .with_context(|| format!("--path {dir} does not exist at {commit}"))?;
            entry
                .to_object(&self.repo)?
                .peel_to_tree()
                .with_context(|| format!("--path {dir} is not a directory at {commit}"))?
        };
        let mut found: Vec<(String, Oid)> = Vec::new();
        tree.walk(TreeWalkMode::PreOrder, |root, entry| {
            if entry.kind() == Some(git2::ObjectType::Blob) {
                if let Ok(name) = entry.name() {
                    if is_manifest(name) {
                        found.push((format!("{root}{name}"), entry.id()));
                    }
                }
            }
            TreeWalkResult::Ok
        })?;
        found.sort();
        let odb = self.repo.odb()?;
        let mut todo: Vec<(Oid, Vec<u8>)> = Vec::new();
        for (_, id) in &found {
            if self.cache.contains_key(id) || todo.iter().any(|(o, _)| o == id) {
                continue;
            }
            let (size, _) = odb.read_header(*id)?;
            if size > MAX_MANIFEST_BYTES {
                // Never load an oversized file: parse_file reports it from a placeholder.
                self.cache
                    .insert(*id, Arc::new(crate::manifests::oversized(size)));
                continue;
            }
            let blob = self.repo.find_blob(*id)?;
            todo.push((*id, blob.content().to_vec()));
        }
        // Parsing is the CPU-heavy part of a large sync: spread it over the cores.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let chunk = todo.len().div_ceil(threads).max(1);
        let parsed: Vec<(Oid, ParsedFile)> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(id, bytes)| (*id, parse_file(bytes)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("parser thread"))
                .collect()
        });
        for (id, p) in parsed {
            self.cache.insert(id, Arc::new(p));
        }
        // Keep the cache to what this revision uses.
        let live: std::collections::HashSet<Oid> = found.iter().map(|(_, id)| *id).collect();
        self.cache.retain(|id, _| live.contains(id));
        Ok(found
            .into_iter()
            .map(|(path, id)| (path, self.cache[&id].clone()))
            .collect())
    }

    /// `git verify-commit` semantics: the commit must carry a good signature from a key in
    /// `keyring` (a GnuPG home directory, or an SSH allowed-signers file).
    pub fn verify_signature(&self, commit: &str, keyring: &Path) -> Result<()> {
        let mut cmd = std::process::Command::new("git");
        cmd.arg("--git-dir").arg(self.repo.path());
        if keyring.is_dir() {
            cmd.env("GNUPGHOME", keyring);
        } else {
            cmd.arg("-c")
                .arg(format!("gpg.ssh.allowedSignersFile={}", keyring.display()));
        }
        let out = cmd
            .args(["verify-commit", commit])
            .output()
            .context("run git verify-commit")?;
        if !out.status.success() {
            bail!(
                "commit {commit} has no valid signature from {}: {}",
                keyring.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Whether `known_hosts` lists `host` (or `[host]:port`) with exactly this key.
fn known_hosts_contains(file: &Path, host: &str, key: &[u8]) -> Result<bool> {
    use base64::Engine;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read known_hosts {}", file.display()))?;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let matches = hosts.split(',').any(|h| {
            h == host
                || h.strip_prefix('[')
                    .and_then(|r| r.split_once("]:"))
                    .is_some_and(|(name, _port)| name == host)
        });
        if matches
            && base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_ok_and(|k| k == key)
        {
            return Ok(true);
        }
    }
    Ok(false)
}
