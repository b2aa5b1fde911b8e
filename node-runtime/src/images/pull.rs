//! The pull pipeline: resolve the manifest, download layers concurrently into the blob store
//! (verified while they stream), apply them in order while they arrive, build the EROFS image
//! and publish it whole.
//!
//! About 600 lines: one pipeline whose stages overlap in time (downloads, in-order apply, the
//! EROFS build) and share its progress counters and download tasks; its steps read in order.

use super::*;

impl ImageStore {
    pub(super) async fn pull_and_prepare(
        &self,
        reference: &str,
        parsed: &ImageRef,
        progress: &Arc<Progress>,
    ) -> Result<PreparedImage, ImageError> {
        let started = Instant::now();
        let oci_ref: Reference = reference
            .parse()
            .map_err(|e| ImageError::InvalidImage(format!("image {reference:?}: {e}")))?;
        let auth = self.auth_for(&parsed.registry)?;
        let (manifest, manifest_digest, config_json, list_digest) = self
            .client
            .pull_manifest_and_config_and_list_digest(&oci_ref, &auth)
            .await
            .map_err(|e| ImageError::Pull(format!("pull manifest of {reference}: {e}")))?;
        if let Some(want) = &parsed.digest {
            if *want != manifest_digest && Some(want) != list_digest.as_ref() {
                return Err(ImageError::Pull(format!(
                    "pull {reference}: registry returned manifest {manifest_digest}, not the requested digest"
                )));
            }
        }
        let config_digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(config_json.as_bytes()))
        );
        if config_digest != manifest.config.digest {
            return Err(ImageError::Pull(format!(
                "pull {reference}: config blob digest is {config_digest}, manifest says {}",
                manifest.config.digest
            )));
        }
        let config = parse_image_config(&config_json)
            .map_err(|e| ImageError::InvalidImage(format!("image {reference}: config: {e}")))?;
        let hex = hex_of(&manifest_digest)?.to_string();

        let digest_lock = self
            .digest_locks
            .lock()
            .unwrap()
            .entry(manifest_digest.clone())
            .or_default()
            .clone();
        let _digest_guard = digest_lock.lock().await;
        if let Some(img) = self.open_prepared(&manifest_digest).await? {
            self.remember_ref(reference, &manifest_digest)?;
            return Ok(img);
        }
        for l in &manifest.layers {
            check_layer_media_type(&l.media_type).map_err(|e| {
                ImageError::InvalidImage(format!("image {reference}: layer {}: {e}", l.digest))
            })?;
            hex_of(&l.digest)?;
        }
        if self.cfg.layered {
            let diff_ids = parse_diff_ids(&config_json)
                .map_err(|e| ImageError::InvalidImage(format!("image {reference}: config: {e}")))?;
            if diff_ids.len() != manifest.layers.len() {
                return Err(ImageError::InvalidImage(format!(
                    "image {reference}: config lists {} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                )));
            }
            for d in &diff_ids {
                hex_of(d)?;
            }
            progress
                .layers_total
                .store(manifest.layers.len(), Ordering::Relaxed);
            progress.bytes_total.store(
                manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
                Ordering::Relaxed,
            );
            progress.set_stage("downloading");
            if let Some(img) = self
                .prepare_layered(
                    reference,
                    &oci_ref,
                    &manifest,
                    &manifest_digest,
                    &config,
                    &diff_ids,
                    progress,
                )
                .await?
            {
                return Ok(img);
            }
            // Flattened instead: start the progress over.
            progress.layers_done.store(0, Ordering::Relaxed);
            progress.bytes_done.store(0, Ordering::Relaxed);
        }
        progress
            .layers_total
            .store(manifest.layers.len(), Ordering::Relaxed);
        progress.bytes_total.store(
            manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
            Ordering::Relaxed,
        );
        progress.set_stage("downloading");

        // Downloads run concurrently; layers are applied strictly in order as soon as each one
        // (and every layer below it) is on disk, so downloading and unpacking overlap.
        // A staging area of its own: nothing else ever writes or removes it.
        let staging = self
            .cfg
            .root
            .join("tmp")
            .join(format!("{hex}.{:016x}", rand::random::<u64>()));
        let rootfs_tmp = staging.join("rootfs");
        fs::create_dir_all(&rootfs_tmp)
            .map_err(|e| ImageError::Prepare(format!("create {}: {e}", rootfs_tmp.display())))?;
        // With EROFS the unpacked tree is only input to mkfs.erofs: build it in memory (tmpfs)
        // when it fits, so thousands of small files never hit the disk twice (written, then
        // deleted) and the disk only sees the final image.
        let compressed: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        let tmpfs = self.erofs.enabled()
            && !self.disk_staging.lock().unwrap().contains(&manifest_digest)
            && match tmpfs_budget() {
                Some(budget) if compressed.saturating_mul(6) + (64 << 20) <= budget => {
                    let opts = format!("size={budget},mode=0755");
                    match nix::mount::mount(
                        Some("hyperbox-staging"),
                        &rootfs_tmp,
                        Some("tmpfs"),
                        nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
                        Some(opts.as_str()),
                    ) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "tmpfs staging unavailable, unpacking on disk");
                            false
                        }
                    }
                }
                _ => false,
            };
        // Unmount and removal of a tree of thousands of files: on a blocking thread.
        let cleanup_staging = |staging: &Path| {
            let staging = staging.to_path_buf();
            async move {
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = unmount_if_mounted(&staging.join("rootfs"));
                    let _ = remove_dir_all_if_exists(&staging);
                })
                .await;
            }
        };
        let semaphore = Arc::new(Semaphore::new(self.cfg.max_concurrent_downloads.max(1)));
        let mut feeds = Vec::new();
        let mut downloads = Vec::new();
        for layer in manifest.layers.iter().cloned() {
            let blob_path = self.blob_path(&layer.digest)?;
            let feed = match fs::metadata(&blob_path) {
                // Shared layer already in the store (verified when it was stored).
                Ok(m) if m.len() as i64 == layer.size => {
                    progress.bytes_done.fetch_add(m.len(), Ordering::Relaxed);
                    let f = fs::File::open(&blob_path).map_err(|e| {
                        ImageError::Prepare(format!("open {}: {e}", blob_path.display()))
                    })?;
                    Arc::new(BlobFeed::complete(f, m.len()))
                }
                _ => {
                    let tmp = self.cfg.root.join("tmp").join(format!(
                        "blob-{}-{:08x}",
                        hex_of(&layer.digest)?,
                        rand::random::<u32>()
                    ));
                    let writer = fs::File::create(&tmp).map_err(|e| {
                        ImageError::Prepare(format!("create {}: {e}", tmp.display()))
                    })?;
                    let reader = fs::File::open(&tmp)
                        .map_err(|e| ImageError::Prepare(format!("open {}: {e}", tmp.display())))?;
                    let feed = Arc::new(BlobFeed::growing(reader));
                    let sem = semaphore.clone();
                    let client = self.client.clone();
                    let oci_ref = oci_ref.clone();
                    let progress = progress.clone();
                    let feed2 = feed.clone();
                    downloads.push(tokio::spawn(async move {
                        let _permit = sem.acquire().await;
                        let r = fetch_blob(
                            &client, &oci_ref, &layer, writer, &tmp, &blob_path, &feed2, &progress,
                        )
                        .await
                        .map_err(|e| format!("{e:#}"));
                        if r.is_err() {
                            let _ = fs::remove_file(&tmp);
                        }
                        feed2.finish(r);
                    }));
                    feed
                }
            };
            feeds.push(feed);
        }
        let layers: Vec<(String, String)> = manifest
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.media_type.clone()))
            .collect();
        let limits = self.cfg.unpack;
        let progress2 = progress.clone();
        let target = rootfs_tmp.clone();
        // Layers are applied in order while they download: each layer is read from its blob
        // file as it grows, so download, hashing, decompression and unpacking overlap.
        let unpack = tokio::task::spawn_blocking(move || -> Result<u64, ImageError> {
            let mut unpacker = Unpacker::new(
                &target,
                UnpackOptions {
                    allow_devices: limits.allow_devices,
                    max_bytes: limits.max_bytes,
                    ..Default::default()
                },
            )
            .map_err(|e| ImageError::Prepare(e.to_string()))?;
            for ((digest, media_type), feed) in layers.into_iter().zip(feeds) {
                let layer_started = Instant::now();
                let applied = unpacker.apply_layer(
                    &digest,
                    Compression::from_media_type(&media_type),
                    std::io::BufReader::with_capacity(
                        1 << 20,
                        FeedReader {
                            feed: &feed,
                            pos: 0,
                        },
                    ),
                );
                // A failed download is the root cause of whatever the unpacker saw.
                if let Err(e) = feed.wait_finished() {
                    return Err(ImageError::Pull(e));
                }
                let stats = applied.map_err(|e| ImageError::InvalidImage(e.to_string()))?;
                if stats.computed_digest != digest {
                    return Err(ImageError::Pull(format!(
                        "layer {digest}: content hashes to {}",
                        stats.computed_digest
                    )));
                }
                tracing::debug!(layer = %digest, entries = stats.entries, bytes = stats.bytes, elapsed_ms = layer_started.elapsed().as_millis() as u64, "layer applied");
                progress2.layers_done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(unpacker.total_bytes())
        });
        let unpack_result = unpack
            .await
            .map_err(|e| ImageError::Prepare(format!("unpack task: {e}")));
        for d in downloads {
            d.abort();
        }
        let unpacked_bytes = match unpack_result.and_then(|r| r) {
            Ok(b) => b,
            Err(e) => {
                cleanup_staging(&staging).await;
                if tmpfs && e.to_string().contains("No space left on device") {
                    // It did not fit in memory after all: the next attempt unpacks on disk.
                    self.disk_staging
                        .lock()
                        .unwrap()
                        .insert(manifest_digest.clone());
                }
                return Err(e);
            }
        };
        let dir = self.cfg.root.join(&hex);
        let meta = ImageMeta {
            digest: manifest_digest.clone(),
            reference: reference.to_string(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config,
            rootfs: String::new(),
            unpacked_bytes,
            prepared_unix: now_unix(),
            store: String::new(),
            diff_ids: Vec::new(),
        };
        let result = self
            .finish_image(&staging, &rootfs_tmp, &dir, meta, progress)
            .await;
        cleanup_staging(&staging).await;
        result?;
        self.remember_ref(reference, &manifest_digest)?;
        progress.set_stage("mounting");
        let img = self
            .open_prepared(&manifest_digest)
            .await?
            .ok_or_else(|| ImageError::Prepare(format!("image {manifest_digest} vanished")))?;
        progress.set_stage("done");
        tracing::info!(
            image = reference,
            digest = %manifest_digest,
            layers = manifest.layers.len(),
            unpacked_bytes,
            rootfs = %img.rootfs_kind,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image prepared"
        );
        Ok(img)
    }

    /// Turn the unpacked staging tree into the final image (an EROFS image, or the directory)
    /// with its meta.json, all inside the staging area, then publish it with one rename. An
    /// image directory therefore exists only complete; a crash before the rename leaves only
    /// staging, which the next start removes.
    async fn finish_image(
        &self,
        staging: &Path,
        rootfs_tmp: &Path,
        dir: &Path,
        mut meta: ImageMeta,
        progress: &Progress,
    ) -> Result<(), ImageError> {
        let prep = |e: anyhow::Error| ImageError::Prepare(format!("{e:#}"));
        let ready = staging.join("image");
        fs::create_dir_all(&ready)
            .map_err(|e| ImageError::Prepare(format!("create {}: {e}", ready.display())))?;
        if let Some(mkfs) = self.erofs.mkfs.clone() {
            progress.set_stage("building-erofs");
            let src = rootfs_tmp.to_path_buf();
            let img = ready.join("image.erofs");
            tokio::task::spawn_blocking(move || erofs::build_image(&mkfs, &src, &img))
                .await
                .map_err(|e| ImageError::Prepare(e.to_string()))?
                .map_err(prep)?;
            meta.rootfs = "erofs".into();
        } else {
            fs::rename(rootfs_tmp, ready.join("rootfs"))
                .map_err(|e| ImageError::Prepare(format!("move rootfs: {e}")))?;
            meta.rootfs = "directory".into();
        }
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<()> {
            write_json_atomic(&ready.join("meta.json"), &meta)?;
            // Under the digest lock, an existing directory here is an unpublished leftover.
            remove_dir_all_if_exists(&dir)?;
            fs::rename(&ready, &dir).with_context(|| format!("publish {}", dir.display()))?;
            crate::fsutil::fsync_path(dir.parent().unwrap_or(&dir))
        })
        .await
        .map_err(|e| ImageError::Prepare(e.to_string()))?
        .map_err(prep)
    }
}

/// How much memory an in-memory staging area may use: half of what is available, at most
/// 16 GiB. `None` when /proc/meminfo cannot tell.
pub(super) fn tmpfs_budget() -> Option<u64> {
    use procfs::Current;
    let m = procfs::Meminfo::current().ok()?;
    let available = m.mem_available.unwrap_or(m.mem_free);
    Some((available / 2).min(16 << 30))
}

/// A layer blob as the unpacker sees it: a file that may still be growing while its download
/// runs, with the download's outcome once it ends.
pub(super) struct BlobFeed {
    file: fs::File,
    state: StdMutex<FeedState>,
    changed: std::sync::Condvar,
}

struct FeedState {
    written: u64,
    finished: Option<Result<(), String>>,
}

impl BlobFeed {
    pub(super) fn complete(file: fs::File, len: u64) -> BlobFeed {
        BlobFeed {
            file,
            state: StdMutex::new(FeedState {
                written: len,
                finished: Some(Ok(())),
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    pub(super) fn growing(file: fs::File) -> BlobFeed {
        BlobFeed {
            file,
            state: StdMutex::new(FeedState {
                written: 0,
                finished: None,
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn publish(&self, written: u64) {
        self.state.lock().unwrap().written = written;
        self.changed.notify_all();
    }

    pub(super) fn finish(&self, r: Result<(), String>) {
        self.state.lock().unwrap().finished = Some(r);
        self.changed.notify_all();
    }

    pub(super) fn wait_finished(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(r) = &st.finished {
                return r.clone();
            }
            st = self.changed.wait(st).unwrap();
        }
    }
}

/// Reads a [`BlobFeed`] from the start, blocking while the download catches up.
pub(super) struct FeedReader<'a> {
    feed: &'a BlobFeed,
    pos: u64,
}

impl<'a> FeedReader<'a> {
    pub(super) fn new(feed: &'a BlobFeed) -> FeedReader<'a> {
        FeedReader { feed, pos: 0 }
    }
}

impl std::io::Read for FeedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let available = {
            let mut st = self.feed.state.lock().unwrap();
            loop {
                if st.written > self.pos {
                    break st.written - self.pos;
                }
                match &st.finished {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(e)) => return Err(std::io::Error::other(e.clone())),
                    None => st = self.feed.changed.wait(st).unwrap(),
                }
            }
        };
        let n = buf.len().min(available as usize);
        let got = self.feed.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Download one blob into the content store, verifying size and digest before it becomes
/// visible under its final name (layers are shared between images). Bytes are published to
/// `feed` as they land so unpacking can follow the download.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_blob(
    client: &Client,
    image: &Reference,
    layer: &OciDescriptor,
    mut file: fs::File,
    tmp: &Path,
    blob_path: &Path,
    feed: &BlobFeed,
    progress: &Progress,
) -> Result<()> {
    let started = Instant::now();
    let mut stream = client
        .pull_blob_stream(image, layer)
        .await
        .map_err(|e| anyhow!("layer {}: download: {e}", layer.digest))?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let flush = |buf: &mut Vec<u8>, size: u64, file: &mut fs::File| -> Result<()> {
        // A write can stall on dirty-page throttling: let the runtime move its other tasks
        // off this thread meanwhile.
        tokio::task::block_in_place(|| file.write_all(buf))
            .with_context(|| format!("write {}", tmp.display()))?;
        buf.clear();
        feed.publish(size);
        Ok(())
    };
    while let Some(chunk) = stream.stream.next().await {
        // oci-client's verifying stream also reports a digest mismatch at the end as an error.
        let chunk = chunk.map_err(|e| anyhow!("layer {}: download: {e}", layer.digest))?;
        size += chunk.len() as u64;
        if layer.size >= 0 && size > layer.size as u64 {
            bail!(
                "layer {}: registry sent more than the {} bytes the manifest declares",
                layer.digest,
                layer.size
            );
        }
        hasher.update(&chunk);
        buf.extend_from_slice(&chunk);
        progress
            .bytes_done
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if buf.len() >= 1 << 20 {
            flush(&mut buf, size, &mut file)?;
        }
    }
    flush(&mut buf, size, &mut file)?;
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != layer.digest {
        bail!(
            "layer {}: digest mismatch: downloaded content is {got}",
            layer.digest
        );
    }
    if layer.size >= 0 && size != layer.size as u64 {
        bail!(
            "layer {}: size mismatch: got {size} bytes, manifest declares {}",
            layer.digest,
            layer.size
        );
    }
    fs::rename(tmp, blob_path).with_context(|| format!("store {}", blob_path.display()))?;
    tracing::debug!(layer = %layer.digest, bytes = size, elapsed_ms = started.elapsed().as_millis() as u64, "layer downloaded");
    Ok(())
}

fn check_layer_media_type(mt: &str) -> Result<(), String> {
    const OK: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ];
    if OK.contains(&mt) {
        Ok(())
    } else {
        Err(format!("unsupported layer media type {mt:?}"))
    }
}

/// The uncompressed digests of the layers (`rootfs.diff_ids`), bottom first.
pub fn parse_diff_ids(json: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Outer {
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    let o: Outer = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok(o.rootfs.map(|r| r.diff_ids).unwrap_or_default())
}

pub fn parse_image_config(json: &str) -> Result<ImageConfig, String> {
    #[derive(Deserialize)]
    struct Outer {
        #[serde(default)]
        config: Option<Inner>,
        #[serde(default)]
        os: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Inner {
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
    }
    let o: Outer = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if let Some(os) = &o.os {
        if os != "linux" {
            return Err(format!("image is for {os:?}, this node runs linux"));
        }
    }
    let c = o.config.unwrap_or(Inner {
        entrypoint: None,
        cmd: None,
        env: None,
        working_dir: None,
        user: None,
    });
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        user: c.user.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_parses_and_rejects_other_os() {
        let c = parse_image_config(r#"{"os":"linux","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","true"],"Env":["PATH=/bin"],"WorkingDir":"/w","User":"1000"}}"#).unwrap();
        assert_eq!(c.entrypoint, vec!["/bin/sh"]);
        assert_eq!(c.user, "1000");
        assert!(parse_image_config(r#"{"os":"windows"}"#).is_err());
    }

    #[test]
    fn layer_media_types() {
        assert!(check_layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd").is_ok());
        assert!(check_layer_media_type(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        )
        .is_err());
    }
}
