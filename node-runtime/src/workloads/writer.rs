//! One thread writes every workload record.
//!
//! Actors used to write their own records on tokio's blocking pool. A bulk apply (a Git sync
//! of 1,000 new workloads) then asked for 1,000 blocking tasks at once: the pool grew to
//! hundreds of threads that all renamed files in one directory, and the apply took 1.1 s
//! instead of tens of milliseconds. Here the writes queue up for one thread, which takes what
//! has accumulated, writes each path once (the newest record wins; a later record always
//! contains an earlier one's facts) and answers every waiter.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::fsutil::{write_atomic, write_atomic_nosync};

type Done = oneshot::Sender<Result<(), String>>;

struct Job {
    path: PathBuf,
    data: Vec<u8>,
    /// fsync the file and its directory before answering.
    durable: bool,
    done: Done,
}

#[derive(Clone)]
pub(crate) struct RecordWriter {
    tx: mpsc::Sender<Job>,
}

impl RecordWriter {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hyperbox-records".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter());
                    write_batch(jobs);
                }
            })?;
        Ok(Self { tx })
    }

    /// Replace the file at `path` with `data` (atomically; fsynced when `durable`). Answers
    /// when the write is done.
    pub async fn write(&self, path: PathBuf, data: Vec<u8>, durable: bool) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            path,
            data,
            durable,
            done,
        };
        self.tx
            .send(job)
            .map_err(|_| "the record writer stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the record writer stopped".to_string())?
    }
}

/// Write a batch: per path only the newest data, durable when any request for it was.
fn write_batch(jobs: Vec<Job>) {
    let mut by_path: HashMap<PathBuf, (Vec<u8>, bool, Vec<Done>)> =
        HashMap::with_capacity(jobs.len());
    let mut order = Vec::with_capacity(jobs.len());
    for job in jobs {
        let entry = by_path.entry(job.path.clone()).or_insert_with(|| {
            order.push(job.path.clone());
            (Vec::new(), false, Vec::new())
        });
        entry.0 = job.data;
        entry.1 |= job.durable;
        entry.2.push(job.done);
    }
    for path in order {
        let (data, durable, waiters) = by_path.remove(&path).expect("queued path");
        let result = if durable {
            write_atomic(&path, &data)
        } else {
            write_atomic_nosync(&path, &data)
        }
        .map_err(|e| format!("{e:#}"));
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writes_land_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let w = RecordWriter::start().unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let w = w.clone();
            let path = dir.path().join(format!("{}.json", i % 20));
            tasks.push(tokio::spawn(async move {
                w.write(path, i.to_string().into_bytes(), i % 7 == 0).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for k in 0..20u32 {
            let got = std::fs::read_to_string(dir.path().join(format!("{k}.json"))).unwrap();
            assert_eq!(got.parse::<u32>().unwrap() % 20, k, "{got}");
        }
        // Writes from one task land in order.
        for round in 0..3u32 {
            w.write(dir.path().join("0.json"), format!("r{round}").into(), false)
                .await
                .unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("0.json")).unwrap(),
            "r2"
        );
        // Only the records are left: no temporary files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 20);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_to_its_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let w = RecordWriter::start().unwrap();
        // The parent is a regular file: the directory cannot be created.
        let err = w
            .write(blocker.join("r.json"), b"{}".to_vec(), false)
            .await
            .unwrap_err();
        assert!(err.contains("r.json"), "{err}");
    }

    #[test]
    fn a_batch_keeps_the_newest_data_and_the_strongest_durability() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        let mut answers = Vec::new();
        let jobs = (0..3)
            .map(|i| {
                let (done, answer) = oneshot::channel();
                answers.push(answer);
                Job {
                    path: p.clone(),
                    data: format!("v{i}").into_bytes(),
                    durable: i == 0,
                    done,
                }
            })
            .collect();
        write_batch(jobs);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "v2");
        for mut a in answers {
            assert_eq!(a.try_recv().unwrap(), Ok(()));
        }
    }
}
