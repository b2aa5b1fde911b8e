//! `hyperbox-operator validate PATH...`: the Git source's checks, offline.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::manifests::{assemble, is_manifest, parse_file};

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("read {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() {
                collect(&e, out)?;
            } else if is_manifest(&e.to_string_lossy()) {
                out.push(e);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Prints every problem as `file:line: field: message`; returns the number of problems.
pub fn run(paths: &[PathBuf]) -> Result<usize> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut parsed = Vec::new();
    for f in &files {
        let meta = std::fs::metadata(f).with_context(|| format!("stat {}", f.display()))?;
        let shown = f.display().to_string();
        let p = if meta.len() as usize > hyperbox_api::validate::MAX_MANIFEST_BYTES {
            crate::manifests::oversized(meta.len() as usize)
        } else {
            parse_file(&std::fs::read(f).with_context(|| format!("read {shown}"))?)
        };
        parsed.push((shown, Arc::new(p)));
    }
    let set = assemble(parsed);
    for f in &set.files {
        for e in &f.errors {
            println!("{e}");
        }
    }
    eprintln!(
        "{} files, {} valid workloads, {} problems",
        set.files.len(),
        set.workloads.len(),
        set.error_count()
    );
    Ok(set.error_count())
}
