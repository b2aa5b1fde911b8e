//! Safe application of OCI image layers onto a directory.
//!
//! [`Unpacker`] applies layer blobs (tar streams, optionally gzip or zstd
//! compressed) in order onto a target directory, following the OCI
//! image-spec layer rules: whiteouts (`.wh.NAME`), opaque directories
//! (`.wh..wh..opq`), replacement of existing entries, modes including
//! setuid/setgid/sticky, ownership, mtimes and (best-effort) xattrs.
//!
//! Layers are untrusted input and the unpacker runs as root, so it must
//! never touch anything outside the target. Checking path *strings* is not
//! enough for that: an earlier entry (or an earlier layer) may have created
//! a symlink such as `a -> /etc` or `a -> ../../..`, and a later entry
//! `a/passwd` would then be written through it onto the host if the kernel
//! resolved the path. So no path containing `/` is ever handed to the
//! kernel. Instead every operation starts from a file descriptor of the
//! target root and walks one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`: a symlink in a parent position makes
//! the open fail and the entry is refused, and the final component is then
//! created or changed relative to the parent's descriptor with the `*at()`
//! calls (`O_CREAT | O_EXCL`, `mkdirat`, `symlinkat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`),
//! none of which follows a symlink in the final position either.
//! Entry paths and hardlink targets that are absolute or contain `..` are
//! refused outright rather than clamped. Symlink targets are stored
//! verbatim: they are only ever resolved inside the container.
//!
//! The tar stream is parsed by this crate (using [`tar::Header`] for the
//! header fields) so that every allocation and every byte of decompressed
//! output is bounded: extension headers are capped at 1 MiB, and the sizes
//! of all entries count against [`UnpackOptions::max_bytes`] across all
//! layers of an image *before* their data is read, so a decompression bomb
//! stops at the cap instead of filling the disk.

mod error;
mod path;
mod sys;
mod tarstream;

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

pub use crate::error::{Location, UnpackError};
use crate::path::{child_of, join, CleanPath, PathError};
use crate::sys::WalkError;
use crate::tarstream::{TarEntry, TarReader};

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (one or more concatenated members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Compression named by a layer media type:
    /// `application/vnd.oci.image.layer.v1.tar+gzip` and
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip` are gzip,
    /// `...+zstd` is zstd, anything else is treated as uncompressed.
    pub fn from_media_type(media_type: &str) -> Compression {
        let mt = media_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if mt.ends_with("+gzip") || mt.ends_with(".gzip") || mt.contains("tar.gzip") {
            Compression::Gzip
        } else if mt.ends_with("+zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    fn stream_name(self) -> &'static str {
        match self {
            Compression::None => "tar stream",
            Compression::Gzip => "gzip stream",
            Compression::Zstd => "zstd stream",
        }
    }
}

/// Limits and behaviour of an [`Unpacker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Create character and block devices; when false such entries are
    /// refused with an error.
    pub allow_devices: bool,
    /// Cap on the total expanded bytes (entry data plus extension headers)
    /// across all layers applied by one [`Unpacker`].
    pub max_bytes: u64,
    /// Cap on the total number of entries across all layers.
    pub max_entries: u64,
    /// Apply the uid/gid of entries (only takes effect when running as
    /// root).
    pub preserve_ownership: bool,
    /// Keep whiteouts as overlayfs whiteouts instead of applying them: for
    /// a layer unpacked on its own, to be stacked with its lower layers by
    /// overlayfs. `dir/.wh.NAME` becomes a 0/0 character device `dir/NAME`
    /// (unless the layer itself writes `dir/NAME`), and `.wh..wh..opq` sets
    /// `trusted.overlay.opaque=y` on its directory.
    pub overlay_whiteouts: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            allow_devices: false,
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
            preserve_ownership: true,
            overlay_whiteouts: false,
        }
    }
}

/// What one [`Unpacker::apply_layer`] call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries in the layer (including whiteouts and skipped entries).
    pub entries: u64,
    /// Expanded bytes of the layer counted against
    /// [`UnpackOptions::max_bytes`].
    pub bytes: u64,
    /// `sha256:<hex>` of the whole compressed blob as read from the reader.
    pub computed_digest: String,
    /// `sha256:<hex>` of the uncompressed tar stream (the layer's `diff_id` in the image
    /// config); None when the stream could not be read to its end after the archive.
    pub diff_id: Option<String>,
    /// With [`UnpackOptions::overlay_whiteouts`]: directories the layer has no entry for,
    /// created (0755, root) only to hold what it has. Stacked by overlayfs, such a directory
    /// shows its own attributes instead of a lower layer's, and exists even where no lower
    /// layer has it: the caller checks them against the lower layers. Paths are relative,
    /// without a leading `/`.
    pub implicit_dirs: Vec<Vec<u8>>,
}

/// Applies layers, in order, onto one target directory.
#[derive(Debug)]
pub struct Unpacker {
    root: OwnedFd,
    target: PathBuf,
    opts: UnpackOptions,
    chown: bool,
    total_bytes: u64,
    total_entries: u64,
}

/// Error flags shared by the reader stack, to tell which layer of it
/// (caller's reader, decompressor, tar parser) an `io::Error` came from.
#[derive(Default)]
struct StreamFlags {
    source_failed: Cell<bool>,
    decoder_failed: Cell<bool>,
}

/// Hashes every byte read from the caller's reader.
struct HashingReader<'f, R> {
    inner: R,
    hasher: Sha256,
    flags: &'f StreamFlags,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.flags.source_failed.set(true);
                }
                Err(e)
            }
        }
    }
}

/// Directories below `root/rel` that are not among the layer's explicit entries.
fn implicit_dirs_under(
    root: &Path,
    rel: &mut Vec<u8>,
    explicit: &HashMap<Vec<u8>, DirMeta>,
    out: &mut Vec<Vec<u8>>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let dir = root.join(std::ffi::OsStr::from_bytes(rel));
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(e.file_name().as_bytes());
        if !explicit.contains_key(rel.as_slice()) {
            out.push(rel.clone());
        }
        implicit_dirs_under(root, rel, explicit, out)?;
        rel.truncate(len);
    }
    Ok(())
}

/// Hashes the uncompressed stream (for the diff_id).
struct TarHasher<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for TarHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Marks errors of a decompressor that did not come from the source.
struct DecoderReader<'f, D> {
    inner: D,
    flags: &'f StreamFlags,
}

impl<D: Read> Read for DecoderReader<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted && !self.flags.source_failed.get() {
                self.flags.decoder_failed.set(true);
            }
        })
    }
}

/// Final metadata of a directory, applied at the end of its layer.
struct DirMeta {
    path: CleanPath,
    raw: Vec<u8>,
    mode: u32,
    mtime: (i64, u32),
}

/// Bookkeeping for the layer being applied.
struct LayerState<'a> {
    digest: &'a str,
    compression: Compression,
    /// Paths written by this layer.
    created: HashSet<Vec<u8>>,
    /// Directories containing something this layer wrote or whited out.
    ancestors: HashSet<Vec<u8>>,
    /// Directories whose mode and mtime are applied at the end.
    dirs: HashMap<Vec<u8>, DirMeta>,
    entries: u64,
    bytes: u64,
}

impl<'a> LayerState<'a> {
    fn new(digest: &'a str, compression: Compression) -> Self {
        LayerState {
            digest,
            compression,
            created: HashSet::new(),
            ancestors: HashSet::new(),
            dirs: HashMap::new(),
            entries: 0,
            bytes: 0,
        }
    }

    fn mark_created(&mut self, path: &CleanPath) {
        let joined = path.joined();
        self.mark_ancestors(&joined);
        self.created.insert(joined);
    }

    /// Records every proper prefix of `joined` (excluding the root).
    fn mark_ancestors(&mut self, joined: &[u8]) {
        let mut end = joined.len();
        while let Some(pos) = joined[..end].iter().rposition(|&b| b == b'/') {
            if !self.ancestors.insert(joined[..pos].to_vec()) {
                break;
            }
            end = pos;
        }
    }

    /// Records that this layer has the directory `dir` (and its parents).
    fn mark_dir_present(&mut self, dir: &[u8]) {
        if !dir.is_empty() && self.ancestors.insert(dir.to_vec()) {
            self.mark_ancestors(dir);
        }
    }

    /// Whether `path` holds content of this layer (itself or below it), so
    /// that whiteouts, which only apply to lower layers, must keep it.
    fn keeps(&self, path: &[u8]) -> bool {
        self.created.contains(path) || self.ancestors.contains(path)
    }

    /// Names the failing part of the reader stack.
    fn stream_error(&self, at: Location, flags: &StreamFlags, source: io::Error) -> UnpackError {
        let stream = if flags.source_failed.get() {
            "read layer blob"
        } else if flags.decoder_failed.get() {
            self.compression.stream_name()
        } else {
            "tar stream"
        };
        UnpackError::Stream { at, stream, source }
    }
}

/// What an entry creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Fifo,
    Char,
    Block,
}

fn io_err<'a>(at: &'a Location, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        at: at.clone(),
        op,
        source,
    }
}

fn invalid(at: &Location, reason: impl Into<String>) -> UnpackError {
    UnpackError::InvalidEntry {
        at: at.clone(),
        reason: reason.into(),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn walk_error(at: &Location, comps: &[CString], err: WalkError) -> UnpackError {
    let prefix = |i: usize| lossy(&join(&comps[..=i.min(comps.len().saturating_sub(1))]));
    match err {
        WalkError::Symlink(i) => UnpackError::ParentSymlink {
            at: at.clone(),
            parent: prefix(i),
        },
        WalkError::NotDir(i) => UnpackError::ParentNotDirectory {
            at: at.clone(),
            parent: prefix(i),
        },
        WalkError::Missing => UnpackError::Io {
            at: at.clone(),
            op: "open parent directory",
            source: io::Error::from_raw_os_error(libc::ENOENT),
        },
        WalkError::Io(op, source) => UnpackError::Io {
            at: at.clone(),
            op,
            source,
        },
    }
}

/// Removes whatever is at `name` (a whole tree for a directory).
fn clear_slot(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match sys::lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if sys::is_dir_mode(st.st_mode) => sys::remove_all_at(dir, name),
        Some(_) => match sys::unlink_at(dir, name, 0) {
            Err(e) if sys::errno_is(&e, libc::ENOENT) => Ok(()),
            other => other,
        },
    }
}

/// Xattrs applied from `SCHILY.xattr.*` records: user attributes, file
/// capabilities and POSIX ACLs. Other `security.*` attributes (SELinux
/// labels, ...) and `trusted.*` (overlayfs control attributes) are skipped.
fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

impl Unpacker {
    /// Opens (creating it if needed) the target directory.
    pub fn new(target: &Path, opts: UnpackOptions) -> Result<Self, UnpackError> {
        let target_err = |source| UnpackError::Target {
            path: target.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(target).map_err(target_err)?;
        let root = sys::open_root(target).map_err(target_err)?;
        // SAFETY: geteuid cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        Ok(Unpacker {
            root,
            target: target.to_path_buf(),
            chown: opts.preserve_ownership && is_root,
            opts,
            total_bytes: 0,
            total_entries: 0,
        })
    }

    /// The target directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The options in effect.
    pub fn options(&self) -> &UnpackOptions {
        &self.opts
    }

    /// Expanded bytes counted so far across all applied layers.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Entries counted so far across all applied layers.
    pub fn total_entries(&self) -> u64 {
        self.total_entries
    }

    /// Applies one layer. `reader` yields the compressed blob; `digest`
    /// (e.g. `sha256:abcd...`) is only used in error messages.
    ///
    /// The reader is consumed to EOF (bytes after the end of the archive
    /// are drained) and [`LayerStats::computed_digest`] is the sha256 of
    /// everything read, so the caller can verify the layer digest without
    /// a second pass. On error the layer is left partially applied: unpack
    /// into a staging directory and discard it on failure.
    pub fn apply_layer<R: Read>(
        &mut self,
        digest: &str,
        compression: Compression,
        reader: R,
    ) -> Result<LayerStats, UnpackError> {
        let flags = StreamFlags::default();
        let mut source = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
            flags: &flags,
        };
        let mut layer = LayerState::new(digest, compression);
        let diff_id;
        {
            let decoded: Box<dyn Read + '_> = match compression {
                Compression::None => Box::new(&mut source),
                Compression::Gzip => Box::new(DecoderReader {
                    inner: flate2::read::MultiGzDecoder::new(&mut source),
                    flags: &flags,
                }),
                Compression::Zstd => {
                    let decoder = zstd::stream::read::Decoder::new(&mut source).map_err(|e| {
                        flags.decoder_failed.set(true);
                        layer.stream_error(Location::layer(digest), &flags, e)
                    })?;
                    Box::new(DecoderReader {
                        inner: decoder,
                        flags: &flags,
                    })
                }
            };
            let mut hashed = TarHasher {
                inner: decoded,
                hasher: Sha256::new(),
            };
            {
                let mut tar = TarReader::new(&mut hashed);
                self.apply_entries(&mut layer, &mut tar, &flags)?;
            }
            // What follows the archive's end (padding) is part of the diff_id.
            diff_id = match io::copy(&mut hashed, &mut io::sink()) {
                Ok(_) => Some(format!("sha256:{}", hex::encode(hashed.hasher.finalize()))),
                Err(e) => {
                    tracing::debug!(layer = digest, error = %e, "uncompressed stream unreadable after the archive");
                    None
                }
            };
        }
        self.finish_dirs(&layer)?;
        let implicit_dirs = if self.opts.overlay_whiteouts {
            let mut out = Vec::new();
            implicit_dirs_under(&self.target, &mut Vec::new(), &layer.dirs, &mut out).map_err(
                |e| UnpackError::Stream {
                    at: Location::layer(digest),
                    stream: "list the layer's directories",
                    source: e,
                },
            )?;
            out
        } else {
            Vec::new()
        };
        io::copy(&mut source, &mut io::sink()).map_err(|e| UnpackError::Stream {
            at: Location::layer(digest),
            stream: "read layer blob",
            source: e,
        })?;
        let computed_digest = format!("sha256:{}", hex::encode(source.hasher.finalize()));
        tracing::debug!(
            layer = digest,
            entries = layer.entries,
            bytes = layer.bytes,
            %computed_digest,
            "applied layer"
        );
        Ok(LayerStats {
            entries: layer.entries,
            bytes: layer.bytes,
            computed_digest,
            diff_id,
            implicit_dirs,
        })
    }

    fn apply_entries<R: Read>(
        &mut self,
        layer: &mut LayerState<'_>,
        tar: &mut TarReader<R>,
        flags: &StreamFlags,
    ) -> Result<(), UnpackError> {
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let entry = match tar.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => return Ok(()),
                Err(e) => return Err(layer.stream_error(Location::layer(layer.digest), flags, e)),
            };
            self.apply_entry(layer, &entry, tar, &mut buf, flags)?;
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut LayerState<'_>,
        entry: &TarEntry,
        tar: &mut TarReader<R>,
        buf: &mut [u8],
        flags: &StreamFlags,
    ) -> Result<(), UnpackError> {
        let at = Location::entry(layer.digest, &entry.path);

        // Limits come first: they also bound the work of skipping data.
        self.total_entries += 1;
        layer.entries += 1;
        if self.total_entries > self.opts.max_entries {
            return Err(UnpackError::EntryLimit {
                at,
                limit: self.opts.max_entries,
            });
        }
        let cost = entry.size.saturating_add(entry.meta_size);
        let total = self.total_bytes.saturating_add(cost);
        if total > self.opts.max_bytes {
            return Err(UnpackError::SizeLimit {
                at,
                limit: self.opts.max_bytes,
            });
        }
        self.total_bytes = total;
        layer.bytes += cost;

        let kind = match entry.entry_type() {
            // Pre-POSIX archives mark directories with a trailing slash.
            EntryType::Regular if entry.type_byte() == 0 && entry.path.ends_with(b"/") => Kind::Dir,
            EntryType::Regular | EntryType::Continuous => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::Hardlink,
            EntryType::Fifo => Kind::Fifo,
            EntryType::Char => Kind::Char,
            EntryType::Block => Kind::Block,
            EntryType::GNUSparse => {
                return Err(invalid(&at, "gnu sparse files are not supported"));
            }
            other => {
                tracing::debug!(
                    layer = layer.digest,
                    entry = %lossy(&entry.path),
                    type_flag = other.as_byte(),
                    "skipping tar entry of unsupported type"
                );
                return Ok(());
            }
        };

        let path = CleanPath::parse(&entry.path).map_err(|e| match e {
            PathError::Escapes => UnpackError::PathEscapes { at: at.clone() },
            PathError::Nul => invalid(&at, "path contains a nul byte"),
        })?;

        if path
            .name()
            .is_some_and(|name| name.to_bytes().starts_with(b".wh."))
        {
            return self.apply_whiteout(layer, &at, &path);
        }
        if path.is_root() && kind != Kind::Dir {
            return Err(invalid(&at, "entry would replace the root directory"));
        }

        match kind {
            Kind::File => self.write_file(layer, &at, &path, entry, tar, buf, flags),
            Kind::Dir => self.write_dir(layer, &at, &path, entry),
            Kind::Symlink => self.write_symlink(layer, &at, &path, entry),
            Kind::Hardlink => self.write_hardlink(layer, &at, &path, entry),
            Kind::Fifo | Kind::Char | Kind::Block => {
                self.write_node(layer, &at, &path, entry, kind)
            }
        }
    }

    /// Opens the parent directory of `path`, creating missing directories
    /// and refusing symlinks and non-directories on the way.
    fn open_parent(&self, at: &Location, path: &CleanPath) -> Result<OwnedFd, UnpackError> {
        sys::walk(self.root.as_fd(), path.parent(), true)
            .map_err(|e| walk_error(at, path.parent(), e))
    }

    fn ownership(
        &self,
        at: &Location,
        entry: &TarEntry,
    ) -> Result<Option<(u32, u32)>, UnpackError> {
        if !self.chown {
            return Ok(None);
        }
        let uid = u32::try_from(entry.uid).map_err(|_| invalid(at, "uid out of range"))?;
        let gid = u32::try_from(entry.gid).map_err(|_| invalid(at, "gid out of range"))?;
        Ok(Some((uid, gid)))
    }

    fn mode(at: &Location, entry: &TarEntry) -> Result<u32, UnpackError> {
        entry
            .mode()
            .map_err(|e| invalid(at, format!("invalid mode field: {e}")))
    }

    fn apply_xattrs(&self, layer: &LayerState<'_>, fd: BorrowedFd<'_>, entry: &TarEntry) {
        for (name, value) in &entry.xattrs {
            if !xattr_allowed(name) {
                tracing::debug!(
                    layer = layer.digest,
                    entry = %lossy(&entry.path),
                    xattr = %lossy(name),
                    "skipping xattr"
                );
                continue;
            }
            let Ok(cname) = CString::new(name.as_slice()) else {
                continue;
            };
            if let Err(e) = sys::fsetxattr(fd, &cname, value) {
                tracing::debug!(
                    layer = layer.digest,
                    entry = %lossy(&entry.path),
                    xattr = %lossy(name),
                    error = %e,
                    "could not set xattr"
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file<R: Read>(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        entry: &TarEntry,
        tar: &mut TarReader<R>,
        buf: &mut [u8],
        flags: &StreamFlags,
    ) -> Result<(), UnpackError> {
        let mode = Self::mode(at, entry)?;
        let owner = self.ownership(at, entry)?;
        let parent = self.open_parent(at, path)?;
        let name = path.name().expect("not the root");
        clear_slot(parent.as_fd(), name).map_err(io_err(at, "remove existing entry"))?;
        let mut file =
            sys::create_file_at(parent.as_fd(), name).map_err(io_err(at, "create file"))?;
        let mut written = 0u64;
        loop {
            let n = tar
                .read_data(buf)
                .map_err(|e| layer.stream_error(at.clone(), flags, e))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            // The reader never yields more than the declared size, which
            // was counted against the limit; this keeps it that way.
            if written > entry.size {
                return Err(UnpackError::SizeLimit {
                    at: at.clone(),
                    limit: self.opts.max_bytes,
                });
            }
            file.write_all(&buf[..n])
                .map_err(io_err(at, "write file"))?;
        }
        if let Some((uid, gid)) = owner {
            sys::fchown(file.as_fd(), uid, gid).map_err(io_err(at, "chown file"))?;
        }
        // After chown, which clears setuid/setgid bits.
        sys::fchmod(file.as_fd(), mode).map_err(io_err(at, "chmod file"))?;
        // After chown and the data, which both drop security.capability.
        self.apply_xattrs(layer, file.as_fd(), entry);
        sys::futimens(file.as_fd(), entry.mtime).map_err(io_err(at, "set file times"))?;
        layer.mark_created(path);
        Ok(())
    }

    fn write_dir(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        entry: &TarEntry,
    ) -> Result<(), UnpackError> {
        let mode = Self::mode(at, entry)?;
        let owner = self.ownership(at, entry)?;
        let dir = match path.name() {
            None => self
                .root
                .try_clone()
                .map_err(io_err(at, "duplicate root descriptor"))?,
            Some(name) => {
                let parent = self.open_parent(at, path)?;
                let existing = sys::lstat_at(parent.as_fd(), name)
                    .map_err(io_err(at, "stat existing entry"))?;
                match existing {
                    Some(st) if sys::is_dir_mode(st.st_mode) => {}
                    other => {
                        if other.is_some() {
                            sys::unlink_at(parent.as_fd(), name, 0)
                                .map_err(io_err(at, "remove existing entry"))?;
                        }
                        sys::mkdir_at(parent.as_fd(), name, 0o700)
                            .map_err(io_err(at, "create directory"))?;
                    }
                }
                sys::open_dir_at(parent.as_fd(), name).map_err(io_err(at, "open directory"))?
            }
        };
        if let Some((uid, gid)) = owner {
            sys::fchown(dir.as_fd(), uid, gid).map_err(io_err(at, "chown directory"))?;
        }
        // Keep the directory writable while the layer is applied (its
        // children may follow); the final mode is set by finish_dirs.
        sys::fchmod(dir.as_fd(), mode | 0o700).map_err(io_err(at, "chmod directory"))?;
        self.apply_xattrs(layer, dir.as_fd(), entry);
        layer.dirs.insert(
            path.joined(),
            DirMeta {
                path: path.clone(),
                raw: entry.path.clone(),
                mode,
                mtime: entry.mtime,
            },
        );
        layer.mark_created(path);
        Ok(())
    }

    fn write_symlink(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        entry: &TarEntry,
    ) -> Result<(), UnpackError> {
        let owner = self.ownership(at, entry)?;
        let target = entry
            .link
            .as_deref()
            .ok_or_else(|| invalid(at, "symlink has no target"))?;
        let target =
            CString::new(target).map_err(|_| invalid(at, "symlink target contains a nul byte"))?;
        let parent = self.open_parent(at, path)?;
        let name = path.name().expect("not the root");
        clear_slot(parent.as_fd(), name).map_err(io_err(at, "remove existing entry"))?;
        sys::symlink_at(&target, parent.as_fd(), name).map_err(io_err(at, "create symlink"))?;
        if let Some((uid, gid)) = owner {
            sys::lchown_at(parent.as_fd(), name, uid, gid).map_err(io_err(at, "chown symlink"))?;
        }
        sys::lutimens_at(parent.as_fd(), name, entry.mtime)
            .map_err(io_err(at, "set symlink times"))?;
        layer.mark_created(path);
        Ok(())
    }

    fn write_hardlink(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        entry: &TarEntry,
    ) -> Result<(), UnpackError> {
        let raw_target = entry
            .link
            .as_deref()
            .ok_or_else(|| invalid(at, "hardlink has no target"))?;
        let target_err = |reason: &'static str| UnpackError::HardlinkTarget {
            at: at.clone(),
            target: lossy(raw_target),
            reason,
        };
        let target = CleanPath::parse(raw_target).map_err(|e| match e {
            PathError::Escapes => UnpackError::HardlinkEscapes {
                at: at.clone(),
                target: lossy(raw_target),
            },
            PathError::Nul => target_err("contains a nul byte"),
        })?;
        let Some(target_name) = target.name() else {
            return Err(target_err("is the root directory"));
        };
        if target == *path {
            // A link to itself: nothing to do.
            layer.mark_created(path);
            return Ok(());
        }
        let target_dir =
            sys::walk(self.root.as_fd(), target.parent(), false).map_err(|e| match e {
                WalkError::Symlink(_) => target_err("is reached through a symlink"),
                WalkError::NotDir(_) | WalkError::Missing => target_err("does not exist"),
                WalkError::Io(op, source) => UnpackError::Io {
                    at: at.clone(),
                    op,
                    source,
                },
            })?;
        match sys::lstat_at(target_dir.as_fd(), target_name)
            .map_err(io_err(at, "stat hardlink target"))?
        {
            None => return Err(target_err("does not exist")),
            Some(st) if sys::is_dir_mode(st.st_mode) => return Err(target_err("is a directory")),
            Some(st) if sys::is_symlink_mode(st.st_mode) => return Err(target_err("is a symlink")),
            Some(_) => {}
        }
        let parent = self.open_parent(at, path)?;
        let name = path.name().expect("not the root");
        clear_slot(parent.as_fd(), name).map_err(io_err(at, "remove existing entry"))?;
        sys::link_at(target_dir.as_fd(), target_name, parent.as_fd(), name)
            .map_err(io_err(at, "create hardlink"))?;
        layer.mark_created(path);
        Ok(())
    }

    fn write_node(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        entry: &TarEntry,
        kind: Kind,
    ) -> Result<(), UnpackError> {
        let (format, dev, op) = match kind {
            Kind::Fifo => (libc::S_IFIFO, 0, "create fifo"),
            Kind::Char | Kind::Block => {
                if !self.opts.allow_devices {
                    return Err(UnpackError::DeviceNotAllowed { at: at.clone() });
                }
                let (major, minor) = entry
                    .device()
                    .map_err(|e| invalid(at, format!("invalid device number: {e}")))?;
                let format = if kind == Kind::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                (format, libc::makedev(major, minor), "create device node")
            }
            _ => unreachable!("write_node is only called for fifos and devices"),
        };
        let mode = Self::mode(at, entry)?;
        let owner = self.ownership(at, entry)?;
        let parent = self.open_parent(at, path)?;
        let name = path.name().expect("not the root");
        clear_slot(parent.as_fd(), name).map_err(io_err(at, "remove existing entry"))?;
        sys::mknod_at(parent.as_fd(), name, format | 0o600, dev).map_err(io_err(at, op))?;
        if let Some((uid, gid)) = owner {
            sys::lchown_at(parent.as_fd(), name, uid, gid).map_err(io_err(at, "chown node"))?;
        }
        sys::chmod_at(parent.as_fd(), name, mode).map_err(io_err(at, "chmod node"))?;
        sys::lutimens_at(parent.as_fd(), name, entry.mtime)
            .map_err(io_err(at, "set node times"))?;
        layer.mark_created(path);
        Ok(())
    }

    /// `dir/.wh.NAME` removes `dir/NAME` of lower layers;
    /// `dir/.wh..wh..opq` removes all lower-layer children of `dir`.
    /// Content written by the current layer is kept in both cases.
    fn apply_whiteout(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
    ) -> Result<(), UnpackError> {
        let name = path.name().expect("whiteouts have a name").to_bytes();
        let parent_comps = path.parent();
        let parent_path = join(parent_comps);
        // The layer contains the whiteout's directory itself.
        layer.mark_dir_present(&parent_path);

        if self.opts.overlay_whiteouts {
            return self.keep_whiteout(layer, at, path, name);
        }
        if name == b".wh..wh..opq" {
            let dir = sys::walk(self.root.as_fd(), parent_comps, true)
                .map_err(|e| walk_error(at, parent_comps, e))?;
            let state: &LayerState<'_> = layer;
            return sys::prune_dir(dir, parent_path, &|p| state.keeps(p))
                .map_err(io_err(at, "apply opaque whiteout"));
        }
        if name.starts_with(b".wh..wh.") {
            tracing::debug!(
                layer = layer.digest,
                entry = %lossy(name),
                "skipping special whiteout entry"
            );
            return Ok(());
        }
        let victim = &name[b".wh.".len()..];
        if matches!(victim, b"" | b"." | b"..") {
            return Err(invalid(at, "invalid whiteout name"));
        }
        let dir = match sys::walk(self.root.as_fd(), parent_comps, false) {
            Ok(dir) => dir,
            // Nothing below a missing directory or a non-directory.
            Err(WalkError::Missing | WalkError::NotDir(_)) => return Ok(()),
            Err(e) => return Err(walk_error(at, parent_comps, e)),
        };
        let victim_name = CString::new(victim).expect("path components have no nul");
        let victim_path = child_of(&parent_path, victim);
        if !layer.keeps(&victim_path) {
            return sys::remove_all_at(dir.as_fd(), &victim_name)
                .map_err(io_err(at, "apply whiteout"));
        }
        // Written by this layer: only lower content below it goes.
        let st = sys::lstat_at(dir.as_fd(), &victim_name).map_err(io_err(at, "apply whiteout"))?;
        if st.is_some_and(|st| sys::is_dir_mode(st.st_mode)) {
            let sub = sys::open_dir_at(dir.as_fd(), &victim_name)
                .map_err(io_err(at, "apply whiteout"))?;
            let state: &LayerState<'_> = layer;
            sys::prune_dir(sub, victim_path, &|p| state.keeps(p))
                .map_err(io_err(at, "apply whiteout"))?;
        }
        Ok(())
    }

    /// A whiteout of a layer unpacked on its own, in overlayfs' form (see
    /// [`UnpackOptions::overlay_whiteouts`]).
    fn keep_whiteout(
        &self,
        layer: &mut LayerState<'_>,
        at: &Location,
        path: &CleanPath,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let parent_comps = path.parent();
        let dir = sys::walk(self.root.as_fd(), parent_comps, true)
            .map_err(|e| walk_error(at, parent_comps, e))?;
        if name == b".wh..wh..opq" {
            return sys::fsetxattr(dir.as_fd(), c"trusted.overlay.opaque", b"y")
                .map_err(io_err(at, "mark directory opaque"));
        }
        if name.starts_with(b".wh..wh.") {
            tracing::debug!(layer = layer.digest, entry = %lossy(name), "skipping special whiteout entry");
            return Ok(());
        }
        let victim = &name[b".wh.".len()..];
        if matches!(victim, b"" | b"." | b"..") {
            return Err(invalid(at, "invalid whiteout name"));
        }
        let victim_name = CString::new(victim).expect("path components have no nul");
        // The layer writes the name itself: its entry hides the lower one already.
        if sys::lstat_at(dir.as_fd(), &victim_name)
            .map_err(io_err(at, "stat whited-out entry"))?
            .is_some()
        {
            return Ok(());
        }
        sys::mknod_at(
            dir.as_fd(),
            &victim_name,
            libc::S_IFCHR,
            libc::makedev(0, 0),
        )
        .map_err(io_err(at, "create overlay whiteout"))
    }

    /// Sets the final mode and mtime of the directories of the layer,
    /// deepest first, once nothing more is written into them.
    fn finish_dirs(&self, layer: &LayerState<'_>) -> Result<(), UnpackError> {
        let mut dirs: Vec<&DirMeta> = layer.dirs.values().collect();
        dirs.sort_by_key(|d| Reverse(d.path.components().len()));
        for meta in dirs {
            let at = Location::entry(layer.digest, &meta.raw);
            let fd = match sys::walk(self.root.as_fd(), meta.path.components(), false) {
                Ok(fd) => fd,
                Err(_) => {
                    // Replaced or removed later in the same layer.
                    tracing::debug!(layer = layer.digest, entry = %lossy(&meta.raw), "directory no longer present");
                    continue;
                }
            };
            sys::fchmod(fd.as_fd(), meta.mode).map_err(io_err(&at, "chmod directory"))?;
            sys::futimens(fd.as_fd(), meta.mtime).map_err(io_err(&at, "set directory times"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
