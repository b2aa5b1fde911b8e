//! Compiles the eBPF programs in `ebpf/` (C) into an object the runtime embeds and loads with
//! aya: clang for the BPF target, against a `vmlinux.h` dumped by bpftool from this machine's
//! kernel BTF (CO-RE relocates the fields at load time on other kernels).
//!
//! Without clang, bpftool or kernel BTF the runtime is built without eBPF (an empty object) and
//! says so in `--version` and `node -o json`; `HYPERBOX_EBPF=off` asks for that explicitly. A C
//! error with the tools present fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let src = manifest.join("../ebpf/hyperbox.bpf.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=HYPERBOX_EBPF");
    println!("cargo:rerun-if-env-changed=HYPERBOX_VMLINUX_H");
    let object = out.join("hyperbox.bpf.o");
    match build(&src, &out, &object) {
        Ok(()) => println!("cargo:rustc-env=HYPERBOX_EBPF_BUILD=built"),
        Err(why) => {
            println!("cargo:warning=building without eBPF telemetry: {why}");
            std::fs::write(&object, b"").expect("write empty eBPF object");
            println!("cargo:rustc-env=HYPERBOX_EBPF_BUILD=not built ({why})");
        }
    }
}

fn build(src: &Path, out: &Path, object: &Path) -> Result<(), String> {
    if std::env::var("HYPERBOX_EBPF").as_deref() == Ok("off") {
        return Err("HYPERBOX_EBPF=off".into());
    }
    let clang = which("clang").ok_or("clang not found (apt-get install clang libbpf-dev)")?;
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err("libbpf headers not found (apt-get install libbpf-dev)".into());
    }
    let vmlinux = match std::env::var_os("HYPERBOX_VMLINUX_H") {
        Some(p) => PathBuf::from(p),
        None => {
            let btf = Path::new("/sys/kernel/btf/vmlinux");
            if !btf.exists() {
                return Err("no kernel BTF at /sys/kernel/btf/vmlinux to generate vmlinux.h (set HYPERBOX_VMLINUX_H to a file named vmlinux.h)".into());
            }
            let bpftool = which("bpftool")
                .or_else(|| Some(PathBuf::from("/usr/sbin/bpftool")).filter(|p| p.exists()))
                .ok_or("bpftool not found (apt-get install bpftool)")?;
            let header = out.join("vmlinux.h");
            let dump = Command::new(&bpftool)
                .args(["btf", "dump", "file"])
                .arg(btf)
                .args(["format", "c"])
                .output()
                .map_err(|e| format!("run bpftool: {e}"))?;
            if !dump.status.success() {
                return Err(format!(
                    "bpftool btf dump failed: {}",
                    String::from_utf8_lossy(&dump.stderr).trim()
                ));
            }
            std::fs::write(&header, &dump.stdout).map_err(|e| format!("write vmlinux.h: {e}"))?;
            header
        }
    };
    let include = vmlinux.parent().unwrap_or(out);
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok("riscv64") => "riscv",
        Ok(other) => return Err(format!("no eBPF build for target arch {other}")),
        Err(_) => "x86",
    };
    let built = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg("-I")
        .arg(include)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(object)
        .status()
        .map_err(|e| format!("run clang: {e}"))?;
    // The tools are there, so a failure is a bug in the C: stop the build.
    assert!(built.success(), "clang failed to compile {}", src.display());
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
