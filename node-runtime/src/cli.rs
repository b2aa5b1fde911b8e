//! Client commands of `hyperbox-node`: apply, get, logs, delete, node.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyperbox_api::validate::{parse_documents, ParsedDocument};
use hyperbox_api::Reason;
use hyperbox_api::{ApplyAction, Phase, PullProgress, WorkloadStatus};
use hyperbox_client::NodeClient;

/// Reasons after which waiting for a workload to start is pointless.
const TERMINAL_REASONS: &[Reason] = &[
    Reason::InvalidImage,
    Reason::ErrImagePull,
    Reason::ImagePullBackOff,
    Reason::CreateContainerError,
    Reason::ErrImagePrepare,
];

pub async fn apply(
    client: &NodeClient,
    file: &Path,
    wait: bool,
    timeout: Duration,
) -> Result<bool> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    let shown = file.display().to_string();
    let docs = parse_documents(&text).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let mut ok = true;
    let mut workloads = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        match d {
            ParsedDocument::Workload(w) => workloads.push(*w),
            ParsedDocument::OtherKind { api_version, kind } => {
                eprintln!("{shown}: document {}: skipping {kind} ({api_version}): not a hyperbox Workload", i + 1)
            }
            ParsedDocument::Invalid { errors, .. } => {
                ok = false;
                for e in errors {
                    print_field_error(&shown, &e);
                }
            }
            ParsedDocument::Unreadable(e) => {
                ok = false;
                print_field_error(&shown, &e);
            }
        }
    }
    if workloads.is_empty() {
        if ok {
            bail!("{shown}: no Workload documents found");
        }
        return Ok(false);
    }
    let results = client.apply(workloads).await?;
    let mut to_watch = Vec::new();
    for r in &results {
        let action = match r.action {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
            ApplyAction::Unknown => "applied",
        };
        println!("workload/{} {action}", r.key());
        if r.action != ApplyAction::Unchanged {
            to_watch.push(r.key());
        }
    }
    if wait {
        for name in to_watch {
            ok &= wait_started(client, &name, timeout).await?;
        }
    }
    Ok(ok)
}

fn print_field_error(file: &str, e: &hyperbox_api::validate::FieldError) {
    match e.line {
        Some(l) => eprintln!("{file}:{l}: {}: {}", display_field(&e.field), e.message),
        None => eprintln!("{file}: {}: {}", display_field(&e.field), e.message),
    }
}

fn display_field(f: &str) -> &str {
    if f.is_empty() {
        "document"
    } else {
        f
    }
}

/// Prints pull progress: one redrawn line on a terminal, a line per quarter otherwise.
struct ProgressPrinter {
    tty: bool,
    printed: bool,
    last_bucket: Option<(String, u64)>,
}

impl ProgressPrinter {
    fn new() -> ProgressPrinter {
        ProgressPrinter {
            tty: std::io::stderr().is_terminal(),
            printed: false,
            last_bucket: None,
        }
    }

    fn show(&mut self, who: &str, image: &str, p: &PullProgress) {
        let pct = if p.bytes_total > 0 {
            p.bytes_done as f64 * 100.0 / p.bytes_total as f64
        } else {
            0.0
        };
        let line = format!(
            "{who}: pulling {image}: {} layers {}/{}, {:.1}/{:.1} MB ({pct:.0}%)",
            p.stage,
            p.layers_done,
            p.layers_total,
            p.bytes_done as f64 / 1e6,
            p.bytes_total as f64 / 1e6
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            self.printed = true;
        } else {
            let bucket = (p.stage.clone(), (pct as u64) / 25);
            if self.last_bucket.as_ref() != Some(&bucket) {
                eprintln!("{line}");
                self.last_bucket = Some(bucket);
            }
        }
    }

    fn done(&mut self) {
        if self.tty && self.printed {
            eprintln!();
            self.printed = false;
        }
    }
}

/// Follow a workload until its containers run (or it fails), showing pull progress. Uses the
/// API's long-poll so it answers as soon as the state changes.
async fn wait_started(client: &NodeClient, name: &str, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut printer = ProgressPrinter::new();
    let mut version = 0;
    loop {
        let s = if version == 0 {
            client.get(name).await?
        } else {
            client
                .watch(name, version, Duration::from_millis(250))
                .await?
        };
        version = s.resource_version;
        if let Some(p) = &s.pull {
            printer.show(name, &s.image, p);
        }
        let started = matches!(s.phase, Phase::Running | Phase::Succeeded | Phase::Failed)
            && s.replicas.iter().all(|r| r.phase != Phase::Pending);
        if started || s.suspended {
            printer.done();
            eprintln!(
                "{name}: {:?}{}",
                s.phase,
                s.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
            return Ok(s.phase != Phase::Failed);
        }
        if let Some(r) = s.reason.as_ref() {
            if TERMINAL_REASONS.contains(r) {
                printer.done();
                eprintln!("{name}: {r}: {}", s.message.unwrap_or_default());
                return Ok(false);
            }
        }
        if Instant::now() > deadline {
            printer.done();
            eprintln!("{name}: still {:?} after {:?}", s.phase, timeout);
            return Ok(false);
        }
    }
}

/// `pull IMAGE`: prepare an image on the node, with progress.
pub async fn pull(client: &NodeClient, image: &str) -> Result<bool> {
    let c2 = client.clone();
    let img = image.to_string();
    let mut task = tokio::spawn(async move { c2.pull(&img).await });
    let mut printer = ProgressPrinter::new();
    loop {
        tokio::select! {
            r = &mut task => {
                printer.done();
                let r = r.context("pull task")??;
                println!("{} {} ({}, {} ms)", r.image, r.digest, r.rootfs, r.elapsed_ms);
                return Ok(true);
            }
            _ = tokio::time::sleep(Duration::from_millis(if printer.printed || printer.last_bucket.is_some() { 200 } else { 50 })) => {
                if let Ok(Some(p)) = client.pull_progress(image).await {
                    printer.show("pull", image, &p);
                }
            }
        }
    }
}

pub async fn get(client: &NodeClient, name: Option<&str>, output: &str) -> Result<()> {
    let list: Vec<WorkloadStatus> = match name {
        Some(n) => vec![client.get(n).await?],
        None => client.list().await?,
    };
    match output {
        "json" => {
            if name.is_some() {
                println!("{}", serde_json::to_string_pretty(&list[0])?);
            } else {
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
        }
        "yaml" => {
            if name.is_some() {
                print!("{}", serde_norway::to_string(&list[0])?);
            } else {
                print!("{}", serde_norway::to_string(&list)?);
            }
        }
        "wide" | "" | "table" => {
            let wide = output == "wide";
            let mut rows = vec![];
            let mut header = vec!["NAME", "PHASE", "READY", "RESTARTS", "REASON"];
            if wide {
                header.extend([
                    "EXIT",
                    "CONTAINER",
                    "PSI CPU/MEM/IO",
                    "ROOTFS",
                    "DIGEST",
                    "REVISION",
                    "IMAGE",
                ]);
            }
            rows.push(header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            for s in &list {
                let ready = s.replicas.iter().filter(|r| r.ready).count();
                let mut row = vec![
                    s.key(),
                    format!("{:?}", s.phase),
                    format!("{ready}/{}", s.replicas.len()),
                    s.restarts.to_string(),
                    s.reason
                        .as_ref()
                        .map_or_else(|| "-".to_string(), |r| r.to_string()),
                ];
                if wide {
                    row.extend([
                        s.last_exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.container_id.clone().unwrap_or_else(|| "-".into()),
                        psi_column(&s.replicas),
                        s.rootfs.clone().unwrap_or_else(|| "-".into()),
                        s.image_digest
                            .as_deref()
                            .map(|d| d.chars().take(19).collect())
                            .unwrap_or_else(|| "-".into()),
                        s.revision.clone().unwrap_or_else(|| "-".into()),
                        s.image.clone(),
                    ]);
                }
                rows.push(row);
            }
            print_table(&rows);
        }
        other => bail!("unknown output format {other:?} (use json, yaml or wide)"),
    }
    Ok(())
}

/// The highest `some avg10` of each resource over the replicas (`cpu/memory/io`, percent),
/// `-` when none has a reading.
fn psi_column(replicas: &[hyperbox_api::ReplicaStatus]) -> String {
    let mut max: Option<[f32; 3]> = None;
    for p in replicas.iter().filter_map(|r| r.pressure.as_ref()) {
        let v = [p.cpu.some.avg10, p.memory.some.avg10, p.io.some.avg10];
        max = Some(match max {
            None => v,
            Some(m) => [m[0].max(v[0]), m[1].max(v[1]), m[2].max(v[2])],
        });
    }
    match max {
        Some([c, m, i]) => format!("{c:.1}/{m:.1}/{i:.1}"),
        None => "-".into(),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

pub async fn node(client: &NodeClient, output: &str) -> Result<()> {
    let n = client.node().await?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&n)?),
        "yaml" => print!("{}", serde_norway::to_string(&n)?),
        _ => {
            println!("node:        {} (hyperbox-node {})", n.name, n.version);
            println!("id:          {}", n.id);
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("labels:      {}", labels.join(", "));
            println!(
                "capacity:    {} mCPU, {} MiB",
                n.capacity.cpu_millis,
                n.capacity.memory_bytes >> 20
            );
            println!(
                "allocatable: {} mCPU, {} MiB",
                n.allocatable.cpu_millis,
                n.allocatable.memory_bytes >> 20
            );
            println!(
                "requested:   {} mCPU, {} MiB",
                n.requested.cpu_millis,
                n.requested.memory_bytes >> 20
            );
            println!(
                "limits of running containers: {} mCPU, {} MiB ({} containers, {} workloads)",
                n.allocations.cpu_millis,
                n.allocations.memory_bytes >> 20,
                n.containers,
                n.workloads
            );
            match &n.pressure {
                Some(p) => println!(
                    "pressure:    cpu some {:.2}%  memory some {:.2}% full {:.2}%  io some {:.2}% full {:.2}% (avg10)",
                    p.cpu.some.avg10, p.memory.some.avg10, p.memory.full.avg10, p.io.some.avg10, p.io.full.avg10
                ),
                None => println!("pressure:    unavailable (no PSI)"),
            }
            let programs = &n.features.ebpf_programs;
            let attached = programs
                .values()
                .filter(|s| *s == crate::telemetry::ebpf::ATTACHED)
                .count();
            println!(
                "features:    erofs={}{} ebpf={} ({attached}/{} programs attached{}) cgroup={} psi={}",
                n.features.erofs,
                n.features
                    .erofs_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                n.features.ebpf,
                programs.len(),
                n.features
                    .ebpf_reason
                    .as_deref()
                    .map(|r| format!("; {r}"))
                    .unwrap_or_default(),
                n.features.cgroup,
                n.features.psi
            );
        }
    }
    Ok(())
}
