//! The layer store: one read-only EROFS (or, without EROFS, one directory) per layer, keyed by
//! the layer's uncompressed digest (`diff_id`), shared by every image that has the layer. An
//! image is an overlay of its layers (top first) under each container's upper dir.
//!
//! Layout under `<state>/images`:
//! `layers/<diff-hex>/{meta.json, layer.erofs | tree/}` one converted layer, published whole
//! by a rename (a crash leaves only staging under `tmp/`, removed at the next start);
//! `lmnt/<diff-hex>` where an EROFS layer is mounted.
//!
//! A layer is converted on its own: its whiteouts stay overlayfs whiteouts (0/0 character
//! devices, `trusted.overlay.opaque`), so layers convert in parallel, each while it downloads.
//! Two things a layer on its own cannot say; an image that has either is prepared the
//! flattened way instead (one EROFS of the applied tree), which gives the exact result:
//! - a hardlink to a file of a lower layer;
//! - a directory the layer has no entry for (created only to hold its content or a
//!   whiteout) that the lower layers do not have as a plain 0755 root directory: overlayfs
//!   would show the layer's version of it, applying the layers in order would not.
//!
//! Nothing counts references: what an image uses is in its meta.json, so the layers in use are
//! rebuilt from disk whenever garbage is collected, and layers an image being prepared uses
//! are pinned in memory meanwhile.
//!
//! Longer than 600 lines: the rules for when a layer can stand on its own (implicit
//! directories, hardlinks) sit beside the conversion and the layered preparation that depend
//! on them, so a change to one is made with the others in view.

use super::pull::{fetch_blob, BlobFeed, FeedReader};
use super::*;

/// What `layers/<hex>/meta.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LayerMeta {
    pub diff_id: String,
    /// The compressed blob it was converted from (another image may carry the same content
    /// compressed differently: the diff_id is the key).
    pub digest: String,
    /// `erofs` or `directory`.
    pub kind: String,
    /// Expanded bytes (what counts against the image size limit).
    pub bytes: u64,
    pub entries: u64,
    /// Directories the layer has no entry for, as relative paths (see the module doc).
    #[serde(default)]
    pub implicit_dirs: Vec<String>,
    pub prepared_unix: u64,
    /// The fs-verity digest of `layer.erofs`, where it was sealed (see [`super::verity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<String>,
}

pub(super) enum LayerError {
    Image(ImageError),
    /// Why the image cannot be a stack of independent layers (it is flattened instead).
    Unrepresentable(String),
}

impl From<ImageError> for LayerError {
    fn from(e: ImageError) -> LayerError {
        LayerError::Image(e)
    }
}

/// Layers pinned by preparations in flight (GC keeps them).
pub(super) struct Pin<'a> {
    store: &'a ImageStore,
    diff_ids: Vec<String>,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut pinned = self.store.pinned_layers.lock().unwrap();
        for d in &self.diff_ids {
            if let Some(n) = pinned.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pinned.remove(d);
                }
            }
        }
    }
}

/// The lower directory of a published layer under `root`, mounting an EROFS layer that is not
/// in `mounted` (after checking its fs-verity digest, where it was sealed).
fn layer_lower_at(
    root: &Path,
    meta: &LayerMeta,
    mounted: &HashSet<PathBuf>,
) -> Result<PathBuf, ImageError> {
    let hex = hex_of(&meta.diff_id)?;
    let dir = root.join("layers").join(hex);
    if meta.kind != "erofs" {
        return Ok(dir.join("tree"));
    }
    let mnt = root.join("lmnt").join(hex);
    if mounted.contains(&mnt) {
        return Ok(mnt);
    }
    let file = dir.join("layer.erofs");
    if let Some(want) = &meta.verity {
        let got = super::verity::measure(&file).map_err(|e| {
            ImageError::Prepare(format!(
                "layer {}: measure {}: {e}",
                meta.diff_id,
                file.display()
            ))
        })?;
        if got.as_deref() != Some(want.as_str()) {
            return Err(ImageError::Prepare(format!(
                "layer {}: {} fails its fs-verity check (sealed as {want}, now {}): the file was changed on disk; remove the image (hyperbox-node rmi) and pull it again",
                meta.diff_id,
                file.display(),
                got.as_deref().unwrap_or("not sealed")
            )));
        }
    }
    erofs::mount_image(&file, &mnt)
        .map_err(|e| ImageError::Prepare(format!("layer {}: {e:#}", meta.diff_id)))?;
    Ok(mnt)
}

/// Whether `p` is a directory owned by root with mode 0755 (what an implicit directory is).
fn is_plain_dir(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    m.is_dir() && m.mode() & 0o7777 == 0o755 && m.uid() == 0 && m.gid() == 0
}

/// Check an implicit directory `rel` of a layer against the layers below it (their trees,
/// topmost first): overlayfs shows the layer's 0755 root directory there, and applying the
/// layers in order keeps the lower one's; they agree only when the lower one is the same.
pub(super) fn implicit_dir_agrees(rel: &str, lowers: &[PathBuf]) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for lower in lowers {
        // Walk down: a whiteout or a non-directory on the way hides everything below it, and
        // an opaque directory hides what is under it in the layers further down.
        let mut p = lower.clone();
        let mut opaque = false;
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            let Ok(m) = fs::symlink_metadata(&p) else {
                break;
            };
            if m.file_type().is_char_device() {
                return Err(format!("{rel}: a lower layer whites it out"));
            }
            let last = i + 1 == comps.len();
            if last {
                return if is_plain_dir(&m) {
                    Ok(())
                } else {
                    Err(format!(
                        "{rel}: a lower layer has it with other attributes or type"
                    ))
                };
            }
            if !m.is_dir() {
                return Err(format!(
                    "{rel}: a lower layer has {} as a non-directory",
                    p.display()
                ));
            }
            if xattr_is_set(&p, "trusted.overlay.opaque") {
                opaque = true;
                break;
            }
        }
        if opaque {
            return Err(format!(
                "{rel}: an opaque directory above it in a lower layer"
            ));
        }
    }
    Err(format!("{rel}: no lower layer has it"))
}

fn xattr_is_set(p: &Path, name: &str) -> bool {
    let (Ok(path), Ok(name)) = (
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()),
        std::ffi::CString::new(name),
    ) else {
        return false;
    };
    let mut buf = [0u8; 8];
    // SAFETY: lgetxattr into a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0 && buf[0] == b'y'
}

impl ImageStore {
    pub(super) fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.cfg.root.join("layers").join(hex_of(diff_id)?))
    }

    /// A published layer's meta, if it is in the store.
    pub(super) fn layer_meta(&self, diff_id: &str) -> Result<Option<LayerMeta>, ImageError> {
        let path = self.layer_dir(diff_id)?.join("meta.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::Prepare(format!("parse {}: {e}", path.display()))),
            Err(_) => Ok(None),
        }
    }

    pub(super) fn pin_layers(&self, diff_ids: &[String]) -> Pin<'_> {
        let mut pinned = self.pinned_layers.lock().unwrap();
        for d in diff_ids {
            *pinned.entry(d.clone()).or_default() += 1;
        }
        Pin {
            store: self,
            diff_ids: diff_ids.to_vec(),
        }
    }

    /// The lower directories of published layers (in the order given), mounting EROFS layers
    /// that are not mounted yet (callers hold `mount_lock`). The mount table is read once, on
    /// a blocking thread: a container start of a 120-layer image does not parse it 120 times.
    pub(super) async fn layer_lowers(
        &self,
        metas: Vec<LayerMeta>,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let root = self.cfg.root.clone();
        tokio::task::spawn_blocking(move || {
            let mounted: HashSet<PathBuf> = crate::fsutil::mount_points()
                .map_err(|e| ImageError::Prepare(format!("{e:#}")))?
                .into_iter()
                .collect();
            metas
                .iter()
                .map(|m| layer_lower_at(&root, m, &mounted))
                .collect()
        })
        .await
        .map_err(|e| ImageError::Prepare(format!("layer mount task: {e}")))?
    }

    /// Make one layer available: already in the store, or downloaded and converted (under a
    /// per-diff_id lock, so two images sharing a layer convert it once).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ensure_layer(
        &self,
        oci_ref: &Reference,
        layer: OciDescriptor,
        diff_id: String,
        progress: Arc<Progress>,
        downloads: Arc<Semaphore>,
        converts: Arc<Semaphore>,
    ) -> Result<LayerMeta, LayerError> {
        let lock = self
            .layer_locks
            .lock()
            .unwrap()
            .entry(diff_id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(meta) = self.layer_meta(&diff_id)? {
            progress
                .bytes_done
                .fetch_add(layer.size.max(0) as u64, Ordering::Relaxed);
            progress.layers_done.fetch_add(1, Ordering::Relaxed);
            return Ok(meta);
        }
        let started = Instant::now();
        let blob_path = self.blob_path(&layer.digest)?;
        // The compressed blob: from the legacy blob store when an older image has it, else
        // downloaded (into staging; it is not kept once the layer is converted).
        let (feed, download, tmp_blob) = match fs::metadata(&blob_path) {
            Ok(m) if m.len() as i64 == layer.size => {
                progress.bytes_done.fetch_add(m.len(), Ordering::Relaxed);
                let f = fs::File::open(&blob_path).map_err(|e| {
                    ImageError::Prepare(format!("open {}: {e}", blob_path.display()))
                })?;
                (Arc::new(BlobFeed::complete(f, m.len())), None, None)
            }
            _ => {
                let hex = hex_of(&layer.digest)?;
                let tmp = self
                    .cfg
                    .root
                    .join("tmp")
                    .join(format!("blob-{hex}-{:08x}", rand::random::<u32>()));
                let done = self
                    .cfg
                    .root
                    .join("tmp")
                    .join(format!("blob-{hex}-{:08x}.done", rand::random::<u32>()));
                let writer = fs::File::create(&tmp)
                    .map_err(|e| ImageError::Prepare(format!("create {}: {e}", tmp.display())))?;
                let reader = fs::File::open(&tmp)
                    .map_err(|e| ImageError::Prepare(format!("open {}: {e}", tmp.display())))?;
                let feed = Arc::new(BlobFeed::growing(reader));
                let (client, oci_ref, layer, feed2, progress) = (
                    self.client.clone(),
                    oci_ref.clone(),
                    layer.clone(),
                    feed.clone(),
                    progress.clone(),
                );
                let done2 = done.clone();
                let task = tokio::spawn(async move {
                    let _permit = downloads.acquire().await;
                    let r = fetch_blob(
                        &client, &oci_ref, &layer, writer, &tmp, &done2, &feed2, &progress,
                    )
                    .await
                    .map_err(|e| format!("{e:#}"));
                    if r.is_err() {
                        let _ = fs::remove_file(&tmp);
                    }
                    feed2.finish(r);
                });
                (feed, Some(task), Some(done))
            }
        };
        let result = self
            .convert_layer(&layer, &diff_id, feed, converts, &progress)
            .await;
        if let Some(t) = download {
            t.abort();
        }
        if let Some(done) = tmp_blob {
            let _ = fs::remove_file(done);
        }
        let meta = result?;
        progress.layers_done.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(layer = %layer.digest, diff_id = %diff_id, bytes = meta.bytes, elapsed_ms = started.elapsed().as_millis() as u64, "layer converted");
        Ok(meta)
    }

    /// Unpack one layer (overlay whiteouts) into staging as it downloads, build its EROFS,
    /// and publish it under `layers/` with one rename.
    async fn convert_layer(
        &self,
        layer: &OciDescriptor,
        diff_id: &str,
        feed: Arc<BlobFeed>,
        converts: Arc<Semaphore>,
        progress: &Progress,
    ) -> Result<LayerMeta, LayerError> {
        let _slot = converts
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ImageError::Prepare(format!("conversion slot: {e}")))?;
        let hex = hex_of(diff_id)?.to_string();
        let staging = self
            .cfg
            .root
            .join("tmp")
            .join(format!("layer-{hex}.{:016x}", rand::random::<u64>()));
        let tree = staging.join("tree");
        fs::create_dir_all(&tree)
            .map_err(|e| ImageError::Prepare(format!("create {}: {e}", tree.display())))?;
        // In memory when it fits (it is only input to mkfs.erofs), as for whole images.
        let tmpfs = self.erofs.enabled()
            && match super::pull::tmpfs_budget() {
                Some(budget) => {
                    // Shared with the other conversions that may run at once.
                    let share = budget / (converts.available_permits() as u64 + 1);
                    (layer.size.max(0) as u64).saturating_mul(6) + (64 << 20) <= share
                        && nix::mount::mount(
                            Some("hyperbox-staging"),
                            &tree,
                            Some("tmpfs"),
                            nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
                            Some(format!("size={share},mode=0755").as_str()),
                        )
                        .is_ok()
                }
                None => false,
            };
        let (limits, mkfs) = (self.cfg.unpack, self.erofs.mkfs.clone());
        let seal = self.verity.is_ok();
        let (digest, media_type, want_diff_id) = (
            layer.digest.clone(),
            layer.media_type.clone(),
            diff_id.to_string(),
        );
        let dir = self.cfg.root.join("layers").join(&hex);
        let staging2 = staging.clone();
        progress.set_stage("converting");
        let converted = tokio::task::spawn_blocking(move || -> Result<(), LayerError> {
            let tree = staging2.join("tree");
            let mut unpacker = Unpacker::new(
                &tree,
                UnpackOptions {
                    allow_devices: limits.allow_devices,
                    max_bytes: limits.max_bytes,
                    overlay_whiteouts: true,
                    ..Default::default()
                },
            )
            .map_err(|e| ImageError::Prepare(e.to_string()))?;
            let applied = unpacker.apply_layer(
                &digest,
                Compression::from_media_type(&media_type),
                std::io::BufReader::with_capacity(1 << 20, FeedReader::new(&feed)),
            );
            if let Err(e) = feed.wait_finished() {
                return Err(ImageError::Pull(e).into());
            }
            let stats = match applied {
                Ok(s) => s,
                // Only the layers below can tell: the flattened path decides.
                Err(e @ hyperbox_unpack::UnpackError::HardlinkTarget { .. }) => {
                    return Err(LayerError::Unrepresentable(e.to_string()))
                }
                Err(e) => return Err(ImageError::InvalidImage(e.to_string()).into()),
            };
            if stats.computed_digest != digest {
                return Err(ImageError::Pull(format!(
                    "layer {digest}: content hashes to {}",
                    stats.computed_digest
                ))
                .into());
            }
            if stats.diff_id.as_deref() != Some(want_diff_id.as_str()) {
                return Err(ImageError::InvalidImage(format!(
                    "layer {digest}: uncompressed content hashes to {}, the image config says {want_diff_id}",
                    stats.diff_id.as_deref().unwrap_or("(unreadable after the archive)")
                ))
                .into());
            }
            let mut implicit_dirs = Vec::new();
            for d in &stats.implicit_dirs {
                match String::from_utf8(d.clone()) {
                    Ok(s) => implicit_dirs.push(s),
                    Err(_) => {
                        return Err(LayerError::Unrepresentable(format!(
                            "layer {digest}: a directory without an entry has a name that is not UTF-8"
                        )))
                    }
                }
            }
            let mut verity = None;
            let kind = match &mkfs {
                Some(mkfs) => {
                    let file = staging2.join("layer.erofs");
                    erofs::build_image(mkfs, &tree, &file)
                        .map_err(|e| ImageError::Prepare(format!("layer {digest}: {e:#}")))?;
                    if seal {
                        verity = super::verity::enable(&file).map_err(|e| {
                            ImageError::Prepare(format!("layer {digest}: fs-verity: {e}"))
                        })?;
                    }
                    let _ = unmount_if_mounted(&tree);
                    remove_dir_all_if_exists(&tree)
                        .map_err(|e| ImageError::Prepare(format!("{e:#}")))?;
                    "erofs"
                }
                None => "directory",
            };
            let meta = LayerMeta {
                diff_id: want_diff_id.clone(),
                digest: digest.clone(),
                kind: kind.into(),
                bytes: stats.bytes,
                entries: stats.entries,
                implicit_dirs,
                prepared_unix: now_unix(),
                verity,
            };
            (|| -> Result<()> {
                write_json_atomic(&staging2.join("meta.json"), &meta)?;
                remove_dir_all_if_exists(&dir)?;
                fs::rename(&staging2, &dir)
                    .with_context(|| format!("publish layer {}", dir.display()))?;
                crate::fsutil::fsync_path(dir.parent().unwrap_or(&dir))
            })()
            .map_err(|e| ImageError::Prepare(format!("{e:#}")))?;
            Ok(())
        })
        .await
        .map_err(|e| ImageError::Prepare(format!("layer conversion task: {e}")))
        .map_err(LayerError::from)
        .and_then(|r| r);
        if converted.is_err() || tmpfs {
            let staging = staging.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = unmount_if_mounted(&staging.join("tree"));
                let _ = remove_dir_all_if_exists(&staging);
            })
            .await;
        }
        converted?;
        self.layer_meta(diff_id)?
            .ok_or_else(|| ImageError::Prepare(format!("layer {diff_id} vanished")).into())
    }

    /// Prepare an image as a stack of shared layers. `Ok(None)`: the image cannot be one
    /// (see the module doc) and is to be flattened instead.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn prepare_layered(
        &self,
        reference: &str,
        oci_ref: &Reference,
        manifest: &oci_client::manifest::OciImageManifest,
        manifest_digest: &str,
        config: &ImageConfig,
        diff_ids: &[String],
        progress: &Arc<Progress>,
    ) -> Result<Option<PreparedImage>, ImageError> {
        let started = Instant::now();
        let _pin = self.pin_layers(diff_ids);
        let downloads = Arc::new(Semaphore::new(self.cfg.max_concurrent_downloads.max(1)));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let converts = Arc::new(Semaphore::new(cores));
        let work = manifest.layers.iter().zip(diff_ids).map(|(l, d)| {
            self.ensure_layer(
                oci_ref,
                l.clone(),
                d.clone(),
                progress.clone(),
                downloads.clone(),
                converts.clone(),
            )
        });
        let results = futures_util::future::join_all(work).await;
        let mut metas = Vec::with_capacity(results.len());
        let mut unrepresentable = None;
        for r in results {
            match r {
                Ok(m) => metas.push(m),
                Err(LayerError::Unrepresentable(why)) => unrepresentable = Some(why),
                Err(LayerError::Image(e)) => return Err(e),
            }
        }
        if let Some(why) = unrepresentable {
            tracing::info!(image = reference, reason = %why, "image cannot be a stack of shared layers; flattening it");
            return Ok(None);
        }
        let total: u64 = metas.iter().map(|m| m.bytes).sum();
        if total > self.cfg.unpack.max_bytes {
            return Err(ImageError::InvalidImage(format!(
                "image {reference}: {total} bytes unpacked, more than the {} byte limit",
                self.cfg.unpack.max_bytes
            )));
        }
        {
            let _m = self.mount_lock.lock().await;
            let lowers = self.layer_lowers(metas.clone()).await?;
            // Implicit directories of each layer against the layers below it.
            for (i, m) in metas.iter().enumerate() {
                let below: Vec<PathBuf> = lowers[..i].iter().rev().cloned().collect();
                for d in &m.implicit_dirs {
                    if let Err(why) = implicit_dir_agrees(d, &below) {
                        tracing::info!(image = reference, layer = %m.digest, reason = %why, "image cannot be a stack of shared layers; flattening it");
                        return Ok(None);
                    }
                }
            }
        }
        let hex = hex_of(manifest_digest)?.to_string();
        let meta = ImageMeta {
            digest: manifest_digest.to_string(),
            reference: reference.to_string(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: config.clone(),
            rootfs: metas
                .first()
                .map(|m| m.kind.clone())
                .unwrap_or_else(|| "erofs".into()),
            unpacked_bytes: total,
            prepared_unix: now_unix(),
            store: STORE_LAYERS.into(),
            diff_ids: diff_ids.to_vec(),
        };
        let staging = self
            .cfg
            .root
            .join("tmp")
            .join(format!("{hex}.{:016x}", rand::random::<u64>()));
        let dir = self.cfg.root.join(&hex);
        tokio::task::spawn_blocking(move || -> Result<()> {
            fs::create_dir_all(&staging)?;
            write_json_atomic(&staging.join("meta.json"), &meta)?;
            remove_dir_all_if_exists(&dir)?;
            fs::rename(&staging, &dir).with_context(|| format!("publish {}", dir.display()))?;
            crate::fsutil::fsync_path(dir.parent().unwrap_or(&dir))
        })
        .await
        .map_err(|e| ImageError::Prepare(e.to_string()))?
        .map_err(|e| ImageError::Prepare(format!("{e:#}")))?;
        self.remember_ref(reference, manifest_digest)?;
        progress.set_stage("mounting");
        let img = self
            .open_prepared(manifest_digest)
            .await?
            .ok_or_else(|| ImageError::Prepare(format!("image {manifest_digest} vanished")))?;
        progress.set_stage("done");
        tracing::info!(
            image = reference,
            digest = %manifest_digest,
            layers = manifest.layers.len(),
            unpacked_bytes = total,
            rootfs = %img.rootfs_kind,
            store = STORE_LAYERS,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image prepared"
        );
        Ok(Some(img))
    }

    /// Layers pinned by preparations in flight.
    pub(super) fn pinned(&self) -> HashSet<String> {
        self.pinned_layers.lock().unwrap().keys().cloned().collect()
    }
}

/// Unmount and remove every layer under `root/layers` that no remaining image uses (`live`)
/// and no preparation pinned (callers hold the store's `mount_lock`). Returns how many went.
pub(super) fn collect_layers(
    root: &Path,
    live: &HashSet<String>,
    pinned: &HashSet<String>,
) -> Result<usize> {
    let Ok(entries) = fs::read_dir(root.join("layers")) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let hex = e.file_name().to_string_lossy().to_string();
        let diff_id = format!("sha256:{hex}");
        if live.contains(&diff_id) || pinned.contains(&diff_id) {
            continue;
        }
        let mnt = root.join("lmnt").join(&hex);
        if let Err(e) = unmount_if_mounted(&mnt) {
            tracing::warn!(layer = %diff_id, error = %format!("{e:#}"), "layer still mounted, keeping it");
            continue;
        }
        let _ = fs::remove_dir(&mnt);
        // meta.json first: a crash mid-removal leaves an unpublished dir (removed at the next
        // start), never a broken layer.
        let _ = fs::remove_file(e.path().join("meta.json"));
        remove_dir_all_if_exists(&e.path())?;
        tracing::info!(layer = %diff_id, "removed layer");
        removed += 1;
    }
    Ok(removed)
}

/// `store` of an image made of shared layers (an empty one is a flattened image).
pub(super) const STORE_LAYERS: &str = "layers";

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn implicit_dirs_agree_only_with_a_plain_lower_dir() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // ownership checks need root-owned files
        }
        let t = tempfile::tempdir().unwrap();
        let (l1, l2) = (t.path().join("l1"), t.path().join("l2"));
        dir(&l1.join("usr/bin"), 0o755);
        dir(&l1.join("etc"), 0o700);
        fs::write(l1.join("file"), b"x").unwrap();
        dir(&l2.join("opt"), 0o755);
        dir(&l2.join("usr"), 0o755);
        // SAFETY: mknod of a 0/0 whiteout in a temp dir.
        let c = std::ffi::CString::new(l2.join("usr/bin").as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) }, 0);
        let lowers = [l1.clone()];
        assert!(implicit_dir_agrees("usr/bin", &lowers).is_ok());
        assert!(implicit_dir_agrees("etc", &lowers).is_err(), "mode differs");
        assert!(
            implicit_dir_agrees("file", &lowers).is_err(),
            "not a directory"
        );
        assert!(
            implicit_dir_agrees("new", &lowers).is_err(),
            "nowhere below"
        );
        assert!(implicit_dir_agrees("file/x", &lowers).is_err());
        // The topmost lower that has the path decides; a whiteout hides the rest.
        let both = [l2.clone(), l1.clone()];
        assert!(implicit_dir_agrees("usr/bin", &both).is_err(), "whited out");
        assert!(implicit_dir_agrees("opt", &both).is_ok());
    }
}
