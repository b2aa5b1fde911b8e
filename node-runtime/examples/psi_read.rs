//! Reads the PSI of every cgroup under a directory as the node's sampler does for its
//! containers (`cpu`, `memory` and `io.pressure`, and the cgroup id), round after round, and
//! prints the wall and CPU time of each round as JSON. Used by `tests/bench/psi.sh`.
//!
//! usage: psi_read DIR ROUNDS

use std::time::Instant;

fn cpu_time_us() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(rounds)) = (args.get(1), args.get(2).and_then(|r| r.parse::<u32>().ok()))
    else {
        eprintln!("usage: psi_read DIR ROUNDS");
        std::process::exit(2);
    };
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .expect("read the directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    let mut out = Vec::new();
    for _ in 0..rounds {
        let (t, c) = (Instant::now(), cpu_time_us());
        let mut read = 0usize;
        for d in &dirs {
            if hyperbox_node::pressure::psi::cgroup(d).is_some() {
                read += 1;
            }
            let _ = hyperbox_node::pressure::psi::cgroup_id(d);
        }
        out.push(format!(
            "{{\"cgroups\":{},\"read\":{read},\"wallUs\":{},\"cpuUs\":{}}}",
            dirs.len(),
            t.elapsed().as_micros(),
            cpu_time_us() - c
        ));
    }
    println!("[{}]", out.join(","));
}
