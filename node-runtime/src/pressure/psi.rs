//! Pressure stall information: parsing `/proc/pressure/*` and a cgroup v2 directory's
//! `*.pressure` files, per container.
//!
//! The files are read by hand rather than with a strict parser: a kernel without the `full`
//! line in `cpu.pressure` (before 5.13), a file that is missing, or one line that does not
//! parse must not make the whole reading vanish. What is missing reads as zeros; a resource
//! whose file has no readable `some` line is left out.

use std::fs;
use std::path::{Path, PathBuf};

use hyperbox_api::{Pressure, PsiAverages, PsiResource};

/// One `some`/`full` line: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`.
fn parse_line(line: &str) -> Option<(&str, PsiAverages)> {
    let mut parts = line.split_whitespace();
    let kind = parts.next()?;
    let mut a = PsiAverages::default();
    let mut seen = 0;
    for kv in parts {
        let (k, v) = kv.split_once('=')?;
        match k {
            "avg10" => a.avg10 = v.parse().ok()?,
            "avg60" => a.avg60 = v.parse().ok()?,
            "avg300" => a.avg300 = v.parse().ok()?,
            "total" => a.total = v.parse().ok()?,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 4).then_some((kind, a))
}

/// A whole `*.pressure` file: `None` without a readable `some` line; a missing or malformed
/// `full` line reads as zeros.
pub fn parse(text: &str) -> Option<PsiResource> {
    let mut some = None;
    let mut full = PsiAverages::default();
    for line in text.lines() {
        match parse_line(line) {
            Some(("some", a)) => some = Some(a),
            Some(("full", a)) => full = a,
            _ => {}
        }
    }
    Some(PsiResource { some: some?, full })
}

/// One `*.pressure` file (see [`parse`]); `None` when it cannot be read.
pub fn read(path: &Path) -> Option<PsiResource> {
    parse(&fs::read_to_string(path).ok()?)
}

/// A percentage setting (`10`, `12.5%`) between 0 and 100.
pub fn parse_percent(value: &str) -> Result<f32, String> {
    let p: f32 = value
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{value:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{value:?}: a percentage is between 0 and 100"));
    }
    Ok(p)
}

/// Pressure from `dir/{cpu,memory,io}.pressure` (a cgroup v2 directory, or `/proc/pressure`
/// with bare names). `None` when no file could be read (PSI off, or not a v2 cgroup).
fn read_set(dir: &Path, suffix: &str) -> Option<Pressure> {
    let cpu = read(&dir.join(format!("cpu{suffix}")));
    let memory = read(&dir.join(format!("memory{suffix}")));
    let io = read(&dir.join(format!("io{suffix}")));
    if cpu.is_none() && memory.is_none() && io.is_none() {
        return None;
    }
    Some(Pressure {
        cpu: cpu.unwrap_or_default(),
        memory: memory.unwrap_or_default(),
        io: io.unwrap_or_default(),
    })
}

/// Node-wide PSI (`/proc/pressure`), `None` when the kernel does not expose it (`psi=0`).
pub fn node() -> Option<Pressure> {
    read_set(Path::new("/proc/pressure"), "")
}

/// PSI of one cgroup v2 directory.
pub fn cgroup(dir: &Path) -> Option<Pressure> {
    read_set(dir, ".pressure")
}

/// Where containers' cgroup v2 directories live on this host: the unified tree of a hybrid
/// host (which libcontainer's v1 manager does not use, so the runtime places containers there
/// itself) or the root of a pure v2 host (where libcontainer puts them). `None` on v1 only.
pub fn v2_root() -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Some(root.to_path_buf())
    } else if root.join("unified/cgroup.controllers").exists() {
        Some(root.join("unified"))
    } else {
        None
    }
}

/// Whether the runtime itself has to place containers in the v2 tree (hybrid hosts).
pub fn needs_v2_placement() -> bool {
    let root = Path::new("/sys/fs/cgroup");
    !root.join("cgroup.controllers").exists() && root.join("unified/cgroup.controllers").exists()
}

/// The cgroup id (what eBPF's `bpf_get_current_cgroup_id` returns): the inode number of the
/// cgroup directory.
pub fn cgroup_id(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_lines_parse() {
        let r = parse("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=678\n").unwrap();
        assert_eq!(r.some.avg10, 1.5);
        assert_eq!(r.some.total, 12345);
        assert_eq!(r.full.avg60, 0.1);
        assert_eq!(r.full.total, 678);
    }

    #[test]
    fn a_missing_or_broken_full_line_reads_as_zero() {
        let r = parse("some avg10=2.00 avg60=1.00 avg300=0.50 total=99\n").unwrap();
        assert_eq!(r.some.avg10, 2.0);
        assert_eq!(r.full, PsiAverages::default());
        let r = parse("some avg10=2.00 avg60=1.00 avg300=0.50 total=99\nfull avg10=x\n").unwrap();
        assert_eq!(r.full, PsiAverages::default());
    }

    #[test]
    fn no_some_line_is_no_reading() {
        assert!(parse("").is_none());
        assert!(parse("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").is_none());
        assert!(
            parse("some avg10=0.00 avg60=0.00\n").is_none(),
            "incomplete"
        );
        assert!(parse("garbage\n").is_none());
    }

    #[test]
    fn a_set_with_one_file_missing_keeps_the_others() {
        let d = tempfile::tempdir().unwrap();
        assert!(cgroup(d.path()).is_none(), "no files: no pressure");
        fs::write(
            d.path().join("memory.pressure"),
            "some avg10=3.00 avg60=0.00 avg300=0.00 total=5\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=2\n",
        )
        .unwrap();
        fs::write(d.path().join("cpu.pressure"), "not psi\n").unwrap();
        let p = cgroup(d.path()).unwrap();
        assert_eq!(p.memory.some.avg10, 3.0);
        assert_eq!(p.memory.full.total, 2);
        assert_eq!(p.cpu, PsiResource::default());
        assert_eq!(p.io, PsiResource::default());
    }

    #[test]
    fn this_node_reports_psi_when_the_kernel_has_it() {
        let have = Path::new("/proc/pressure/cpu").exists();
        assert_eq!(node().is_some(), have);
    }
}
