//! What the state dir holds for one workload, and how it is read back after a restart.
//!
//! Each record has one writer (its workload actor) and is replaced atomically through a unique
//! temporary file. A record that cannot be read is never taken as "this workload does not
//! exist": it is moved aside into `quarantine/`, its containers are left alone, and the
//! workload is reported until someone applies or deletes it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hyperbox_api::{Phase, Workload};
use serde::{Deserialize, Serialize};

use super::replica::Replica;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRecord {
    pub workload: Workload,
    pub spec_hash: String,
    #[serde(default)]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub rootfs: Option<String>,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// A delete was accepted: a restart finishes it, it never brings the workload back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// The manager that owns it; another manager may not change or delete it without force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// Replicas of a previous spec that keep serving during a rolling update (at most one
    /// per ordinal); they are never restarted and go as their replacements get ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outgoing: Vec<Replica>,
    /// Images the outgoing replicas run (kept from garbage collection until they are gone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outgoing_digests: Vec<String>,
    /// Bumped on every change of the spec (Kubernetes' `metadata.generation`).
    #[serde(default = "first_generation")]
    pub generation: u64,
    /// While a rollout (or the first start) has not completed: when it last made progress,
    /// in unix milliseconds. Drives `ProgressDeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_ms: Option<u64>,
    /// `config_hash` of the workload (derived, in memory only): digests answer with it for
    /// every workload, so it is computed when the workload changes, not per request.
    #[serde(skip)]
    pub config_hash: String,
}

fn first_generation() -> u64 {
    1
}

impl WorkloadRecord {
    /// Every replica that may own a container: the current spec's, then the outgoing ones.
    pub fn all_replicas(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().chain(self.outgoing.iter())
    }
}

/// The record format before replicas became state machines: kept readable so an upgrade
/// keeps its workloads (their old containers are replaced).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyRecord {
    workload: Workload,
    spec_hash: String,
    #[serde(default)]
    replicas: Vec<LegacyReplica>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyReplica {
    index: u32,
    #[serde(default)]
    phase: Phase,
    #[serde(default)]
    restarts: u32,
    #[serde(default)]
    last_exit_code: Option<i32>,
}

/// Parse a record (current or legacy format). The spec hash is derived data: it is recomputed
/// from the stored workload, so a change in what the hash covers never restarts anything.
pub fn parse(bytes: &[u8]) -> Result<WorkloadRecord> {
    let mut rec = parse_stored(bytes)?;
    rec.spec_hash = hyperbox_api::spec_hash(&rec.workload);
    rec.config_hash = hyperbox_api::config_hash(&rec.workload);
    Ok(rec)
}

fn parse_stored(bytes: &[u8]) -> Result<WorkloadRecord> {
    match serde_json::from_slice::<WorkloadRecord>(bytes) {
        Ok(r) => Ok(r),
        Err(current) => {
            let Ok(legacy) = serde_json::from_slice::<LegacyRecord>(bytes) else {
                return Err(current.into());
            };
            Ok(WorkloadRecord {
                workload: legacy.workload,
                spec_hash: legacy.spec_hash,
                image_digest: None,
                rootfs: None,
                replicas: legacy
                    .replicas
                    .into_iter()
                    .map(|l| {
                        let mut r = Replica::new(l.index);
                        r.restarts = l.restarts;
                        r.last_exit_code = l.last_exit_code;
                        if matches!(l.phase, Phase::Succeeded | Phase::Failed) {
                            r.phase = l.phase;
                            r.stage = super::replica::Stage::Finished;
                        }
                        r
                    })
                    .collect(),
                deleting: false,
                manager: None,
                outgoing: Vec::new(),
                outgoing_digests: Vec::new(),
                generation: 1,
                progress_ms: None,
                config_hash: String::new(),
            })
        }
    }
}

/// Longest prefix of a container id (the id adds `-{ordinal}-{8 hex}`): container ids become
/// cgroup and state directory names, and stay short enough to read in `hyperbox-node get`.
const CONTAINER_PREFIX_MAX: usize = 53;

/// The stem of a workload's files and directories: its key, made safe (see
/// [`hyperbox_api::key::safe_name`]); it can never form a path.
pub fn stem(key: &str) -> String {
    hyperbox_api::key::file_stem(key)
}

/// File name of a workload's record.
pub fn file_name(key: &str) -> String {
    format!("{}.json", stem(key))
}

/// What every container id of the workload with this stem starts with (before `-{ordinal}`).
pub fn container_prefix(stem: &str) -> String {
    hyperbox_api::key::shorten(stem, CONTAINER_PREFIX_MAX)
}

/// The key a stem came from, as far as it can be told (a shortened one keeps its stem).
pub fn key_of_stem(stem: &str) -> String {
    if stem.contains("__") {
        stem.to_string()
    } else {
        stem.replacen('_', "/", 1)
    }
}

/// A record that could not be read at start.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The record's file stem (see [`stem`]): the workload's key, made safe.
    pub name: String,
    pub moved_to: PathBuf,
    pub error: String,
}

/// Everything found in the records directory.
pub struct Loaded {
    pub records: Vec<WorkloadRecord>,
    pub quarantined: Vec<Quarantined>,
}

/// Read every record; move unreadable ones to `quarantine/` (and leftover temporary files of a
/// crashed writer away).
pub fn load_all(dir: &Path) -> Result<Loaded> {
    let mut out = Loaded {
        records: Vec::new(),
        quarantined: Vec::new(),
    };
    let qdir = dir.join("quarantine");
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        let fname = e.file_name().to_string_lossy().to_string();
        if fname.starts_with('.') && fname.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let Some(stem) = fname.strip_suffix(".json") else {
            continue;
        };
        let parsed = fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| parse(&b));
        match parsed {
            Ok(r) if file_name(&r.workload.key()) == fname => out.records.push(r),
            other => {
                let error = match other {
                    Ok(r) => format!(
                        "the record names workload {:?}, not the file's",
                        r.workload.key()
                    ),
                    Err(e) => format!("{e:#}"),
                };
                fs::create_dir_all(&qdir).with_context(|| format!("create {}", qdir.display()))?;
                let moved_to = qdir.join(format!("{fname}.{}", crate::fsutil::now_unix()));
                fs::rename(&path, &moved_to)
                    .with_context(|| format!("move {} aside", path.display()))?;
                tracing::error!(
                    file = %path.display(),
                    moved_to = %moved_to.display(),
                    error = %error,
                    "unreadable workload record quarantined; its containers are left running"
                );
                out.quarantined.push(Quarantined {
                    name: stem.to_string(),
                    moved_to,
                    error,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = r#"{"apiVersion":"hyperbox.dev/v1alpha1","kind":"Workload","metadata":{"name":"a"},"spec":{"image":"x"}}"#;

    #[test]
    fn legacy_records_still_load() {
        let legacy = format!(
            r#"{{"workload":{W},"specHash":"h","imageDigest":null,"rootfs":null,"replicas":[{{"index":0,"phase":"Running","reason":null,"message":null,"ready":true,"restarts":3,"lastExitCode":1,"containerId":"a-0-x","pid":5,"startedAtUnix":1}}]}}"#
        );
        let r = parse(legacy.as_bytes()).unwrap();
        assert_eq!(r.replicas[0].restarts, 3);
        assert_eq!(r.replicas[0].container_id(), None);
    }

    #[test]
    fn unreadable_records_are_quarantined_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json"), b"{\"workload\": tru").unwrap();
        fs::write(dir.path().join(".b.json.x1.tmp"), b"partial").unwrap();
        let good = WorkloadRecord {
            workload: serde_json::from_str(W).unwrap(),
            spec_hash: "h".into(),
            image_digest: None,
            rootfs: None,
            replicas: vec![],
            deleting: false,
            manager: None,
            outgoing: vec![],
            outgoing_digests: vec![],
            generation: 1,
            progress_ms: None,
            config_hash: String::new(),
        };
        let mut other = good.clone();
        other.workload.metadata.name = "c".into();
        crate::fsutil::write_json_atomic(&dir.path().join("c.json"), &other).unwrap();
        let loaded = load_all(dir.path()).unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.quarantined.len(), 1);
        assert_eq!(loaded.quarantined[0].name, "a");
        assert!(loaded.quarantined[0].moved_to.exists());
        assert!(!dir.path().join("a.json").exists());
        assert!(!dir.path().join(".b.json.x1.tmp").exists());
    }

    #[test]
    fn concurrent_writers_never_tear_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = path.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        crate::fsutil::write_atomic_nosync(&path, &vec![b'a' + i; 4096]).unwrap();
                    }
                });
            }
        });
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len(), 4096);
        assert!(data.iter().all(|b| *b == data[0]));
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn long_and_namespaced_keys_get_safe_file_names() {
        assert_eq!(file_name("web"), "web.json");
        assert_eq!(file_name("team-a/web"), "team-a_web.json");
        assert_eq!(key_of_stem("team-a_web"), "team-a/web");
        assert_eq!(key_of_stem("web"), "web");
        let long = format!("team-a/{}", "a".repeat(253));
        let f = file_name(&long);
        assert!(f.len() <= 255 && f.contains("__"), "{f}");
        let prefix = container_prefix(&stem(&long));
        assert!(prefix.len() <= CONTAINER_PREFIX_MAX);
        assert_eq!(
            prefix,
            hyperbox_api::key::safe_name(&long, CONTAINER_PREFIX_MAX)
        );
        assert_eq!(container_prefix("web"), "web");
    }
}
