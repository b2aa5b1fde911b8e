//! fs-verity on layer files, where the filesystem has it: a layer's EROFS file is sealed when
//! it is published (the kernel then refuses writes to it and checks every page read against a
//! Merkle tree), its digest goes into the layer's meta.json, and the file is measured again
//! before each mount. A file replaced or rebuilt behind the store's back no longer measures
//! the same (or is not sealed at all) and is refused.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_IOC_ENABLE_VERITY`: `_IOW('f', 133, struct fsverity_enable_arg)`.
const FS_IOC_ENABLE_VERITY: libc::c_ulong = 0x4080_6685;
/// `FS_IOC_MEASURE_VERITY`: `_IOWR('f', 134, struct fsverity_digest)`.
const FS_IOC_MEASURE_VERITY: libc::c_ulong = 0xc004_6686;
const FS_VERITY_HASH_ALG_SHA256: u32 = 1;

/// `struct fsverity_enable_arg` (linux/fsverity.h).
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `struct fsverity_digest` with room for a SHA-256 digest.
#[repr(C)]
struct Digest {
    algorithm: u16,
    size: u16,
    digest: [u8; 64],
}

/// Errors that mean "this filesystem or kernel has no fs-verity".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

/// Seal `path` with fs-verity (SHA-256, 4 KiB blocks) and return its digest (`sha256:<hex>`);
/// `Ok(None)` where the filesystem cannot.
pub fn enable(path: &Path) -> io::Result<Option<String>> {
    let f = File::open(path)?;
    let arg = EnableArg {
        version: 1,
        hash_algorithm: FS_VERITY_HASH_ALG_SHA256,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: the ioctl reads a properly laid out fsverity_enable_arg.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_ENABLE_VERITY as _, &arg) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) { Ok(None) } else { Err(e) };
    }
    measure(path)
}

/// The fs-verity digest of `path` (`sha256:<hex>`); `Ok(None)` when it is not sealed or the
/// filesystem has no fs-verity.
pub fn measure(path: &Path) -> io::Result<Option<String>> {
    let f = File::open(path)?;
    let mut d = Digest {
        algorithm: 0,
        size: 64,
        digest: [0; 64],
    };
    // SAFETY: the ioctl fills a fsverity_digest whose `size` says how much room it has.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_MEASURE_VERITY as _, &mut d) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) || e.raw_os_error() == Some(libc::ENODATA) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let n = usize::from(d.size).min(64);
    Ok(Some(format!("sha256:{}", hex::encode(&d.digest[..n]))))
}

/// Whether files in `dir` can be sealed: tried on a scratch file. `Err` says why not.
pub fn probe(dir: &Path) -> Result<(), String> {
    let p = dir.join(format!(".verity-probe-{:08x}", rand::random::<u32>()));
    let r = (|| -> io::Result<Option<String>> {
        std::fs::write(&p, [0u8; 4096])?;
        enable(&p)
    })();
    let _ = std::fs::remove_file(&p);
    match r {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "the filesystem of {} (or the kernel) has no fs-verity",
            dir.display()
        )),
        Err(e) => Err(format!("fs-verity on {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_structs_have_the_kernel_layout() {
        // The ioctl numbers encode these sizes.
        assert_eq!(std::mem::size_of::<EnableArg>(), 128);
        assert_eq!((FS_IOC_ENABLE_VERITY >> 16) & 0x3fff, 128);
        assert_eq!(std::mem::size_of::<Digest>() - 64, 4);
        assert_eq!((FS_IOC_MEASURE_VERITY >> 16) & 0x3fff, 4);
    }

    #[test]
    fn an_unsealed_file_measures_as_none_or_the_probe_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(measure(&f).unwrap(), None);
        match probe(dir.path()) {
            // A filesystem with fs-verity: sealing works and measures.
            Ok(()) => {
                let d = enable(&f).unwrap().expect("sealed");
                assert_eq!(measure(&f).unwrap(), Some(d));
            }
            Err(why) => assert!(why.contains("fs-verity"), "{why}"),
        }
    }
}
