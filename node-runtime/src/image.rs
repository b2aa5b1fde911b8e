//! Image store: pulls OCI images with oci-client into a content-addressed blob store, unpacks
//! their layers safely and turns each image into one read-only EROFS image (or, without EROFS,
//! a plain directory) that containers use as their overlay lower layer.
//!
//! Layout under `<state>/images`:
//! `blobs/sha256/<hex>` verified compressed layers, shared between images;
//! `<manifest-hex>/{meta.json,image.erofs|rootfs/}` one prepared image;
//! `mnt/<manifest-hex>` where an EROFS image is mounted;
//! `refs.json` reference -> manifest digest, so cached images start with the registry down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use hyperbox_api::reference::ImageRef;
use hyperbox_api::PullProgress;
use hyperbox_unpack::{Compression, UnpackOptions, Unpacker};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::erofs::{self, ErofsSupport};
use crate::fsutil::{remove_dir_all_if_exists, unmount_if_mounted, write_json_atomic};

/// Errors a user can act on carry a Kubernetes-style reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    Pull(String),
    #[error("{0}")]
    Prepare(String),
}

impl ImageError {
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::InvalidImage(_) => "InvalidImage",
            ImageError::Pull(_) => "ErrImagePull",
            ImageError::Prepare(_) => "ErrImagePrepare",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    pub insecure_registries: Vec<String>,
    /// docker config.json style credentials (`auths.<registry>.auth` = base64 user:pass).
    pub auth_file: Option<PathBuf>,
    pub unpack: UnpackLimits,
    pub max_concurrent_downloads: usize,
    /// Extra CA certificates (PEM) trusted for registries, besides the system roots.
    pub registry_ca: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    pub max_bytes: u64,
    pub allow_devices: bool,
}

/// The parts of the OCI image config a container needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageMeta {
    digest: String,
    reference: String,
    layers: Vec<String>,
    config: ImageConfig,
    /// `erofs` or `directory`
    rootfs: String,
    unpacked_bytes: u64,
    prepared_unix: u64,
}

/// An image ready to be used as a container's lower layer.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub digest: String,
    pub lower: PathBuf,
    pub config: ImageConfig,
    pub rootfs_kind: String,
}

/// Live progress of one pull, shared with status readers.
#[derive(Debug, Default)]
pub struct Progress {
    pub layers_total: AtomicUsize,
    pub layers_done: AtomicUsize,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub stage: StdMutex<String>,
}

impl Progress {
    pub fn set_stage(&self, s: &str) {
        *self.stage.lock().unwrap() = s.to_string();
    }
    pub fn snapshot(&self) -> PullProgress {
        PullProgress {
            layers_total: self.layers_total.load(Ordering::Relaxed),
            layers_done: self.layers_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            stage: self.stage.lock().unwrap().clone(),
        }
    }
}

/// Where the supervisor gets images from: the [`ImageStore`], or a test double.
pub trait ImageSource: Send + Sync + 'static {
    /// Make `reference` ready for containers (pull policy IfNotPresent).
    fn prepare(self: Arc<Self>, reference: String) -> ImageFuture;
    /// Progress of a pull in flight.
    fn progress_of(&self, reference: &str) -> Option<PullProgress>;
}

pub type ImageFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<PreparedImage, ImageError>> + Send + 'static>,
>;

impl ImageSource for ImageStore {
    fn prepare(self: Arc<Self>, reference: String) -> ImageFuture {
        Box::pin(async move { self.ensure(&reference).await })
    }

    fn progress_of(&self, reference: &str) -> Option<PullProgress> {
        ImageStore::progress_of(self, reference)
    }
}

pub struct ImageStore {
    cfg: StoreConfig,
    erofs: ErofsSupport,
    client: Client,
    /// One preparation per image reference at a time; later callers wait and reuse it.
    locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One preparation per manifest digest at a time, whatever spelling of the reference
    /// (tag, digest, short or long registry name) asked for it.
    digest_locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    progress: StdMutex<HashMap<String, Arc<Progress>>>,
    refs: StdMutex<BTreeMap<String, String>>,
    /// Serialises mounts and GC so an image is never unmounted while being prepared.
    mount_lock: tokio::sync::Mutex<()>,
    /// When each image was last handed to a container (images unseen since start count from
    /// the start, so a restart never collects them at once).
    last_used: StdMutex<HashMap<String, Instant>>,
    opened: Instant,
    /// Images that did not fit a tmpfs staging area: unpacked on disk from then on.
    disk_staging: StdMutex<HashSet<String>>,
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::InvalidImage(format!("unsupported digest {digest:?}")))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ImageStore {
    pub fn open(cfg: StoreConfig, erofs: ErofsSupport) -> Result<ImageStore> {
        for d in ["blobs/sha256", "mnt", "tmp"] {
            fs::create_dir_all(cfg.root.join(d))
                .with_context(|| format!("create {}", cfg.root.join(d).display()))?;
        }
        // Half-done work from a killed daemon: staging dirs (maybe tmpfs-mounted), partial blobs.
        let tmp_root = cfg.root.join("tmp");
        for m in crate::fsutil::mount_points()? {
            if m.starts_with(&tmp_root) {
                unmount_if_mounted(&m)?;
            }
        }
        remove_dir_all_if_exists(&tmp_root)?;
        fs::create_dir_all(cfg.root.join("tmp"))?;
        // An image directory without meta.json was never published (an older version built
        // images in place): it is never used, so remove it.
        for e in fs::read_dir(&cfg.root)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.len() == 64 && e.path().is_dir() && !e.path().join("meta.json").exists() {
                tracing::warn!(dir = %e.path().display(), "removing an incomplete image");
                remove_dir_all_if_exists(&e.path())?;
            }
        }
        let refs = match fs::read(cfg.root.join("refs.json")) {
            Ok(b) => serde_json::from_slice(&b).context("parse images/refs.json")?,
            Err(_) => BTreeMap::new(),
        };
        let protocol = if cfg.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(cfg.insecure_registries.clone())
        };
        let mut extra_root_certificates = Vec::new();
        for ca in &cfg.registry_ca {
            let data =
                fs::read(ca).with_context(|| format!("read registry ca {}", ca.display()))?;
            extra_root_certificates.push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data,
            });
        }
        let client = Client::new(ClientConfig {
            protocol,
            extra_root_certificates,
            max_concurrent_download: cfg.max_concurrent_downloads,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        Ok(ImageStore {
            cfg,
            erofs,
            client,
            locks: StdMutex::new(HashMap::new()),
            digest_locks: StdMutex::new(HashMap::new()),
            progress: StdMutex::new(HashMap::new()),
            refs: StdMutex::new(refs),
            mount_lock: tokio::sync::Mutex::new(()),
            last_used: StdMutex::new(HashMap::new()),
            opened: Instant::now(),
            disk_staging: StdMutex::new(HashSet::new()),
        })
    }

    pub fn erofs(&self) -> &ErofsSupport {
        &self.erofs
    }

    pub fn progress_of(&self, reference: &str) -> Option<PullProgress> {
        self.progress
            .lock()
            .unwrap()
            .get(reference)
            .map(|p| p.snapshot())
    }

    /// Make `reference` ready for containers: cached images are used as they are (pull policy
    /// IfNotPresent: a running node does not depend on its registry), others are pulled.
    ///
    /// The work runs in its own task: a caller that goes away (its workload was deleted) does
    /// not cancel a pull half-way, which would leave its staging area behind.
    pub async fn ensure(self: &Arc<Self>, reference: &str) -> Result<PreparedImage, ImageError> {
        let store = self.clone();
        let reference = reference.to_string();
        tokio::spawn(async move { store.ensure_now(&reference).await })
            .await
            .map_err(|e| ImageError::Prepare(format!("image preparation task: {e}")))?
    }

    async fn ensure_now(&self, reference: &str) -> Result<PreparedImage, ImageError> {
        let parsed = ImageRef::parse(reference).map_err(ImageError::InvalidImage)?;
        let lock = self
            .locks
            .lock()
            .unwrap()
            .entry(reference.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let cached = self.refs.lock().unwrap().get(reference).cloned();
        if let Some(digest) = cached {
            if let Some(img) = self.open_prepared(&digest).await? {
                return Ok(img);
            }
        }
        let progress = Arc::new(Progress::default());
        progress.set_stage("resolving");
        self.progress
            .lock()
            .unwrap()
            .insert(reference.to_string(), progress.clone());
        let result = self.pull_and_prepare(reference, &parsed, &progress).await;
        self.progress.lock().unwrap().remove(reference);
        result
    }

    /// A prepared image, mounted; `None` when it is not (or no longer) prepared.
    async fn open_prepared(&self, digest: &str) -> Result<Option<PreparedImage>, ImageError> {
        let hex = hex_of(digest)?;
        let dir = self.cfg.root.join(hex);
        let meta_path = dir.join("meta.json");
        let Ok(bytes) = fs::read(&meta_path) else {
            return Ok(None);
        };
        let meta: ImageMeta = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Prepare(format!("parse {}: {e}", meta_path.display())))?;
        let _m = self.mount_lock.lock().await;
        let lower = if meta.rootfs == "erofs" {
            let mnt = self.cfg.root.join("mnt").join(hex);
            let (img, target) = (dir.join("image.erofs"), mnt.clone());
            // Mount-table reads and loop setup block: keep them off the async threads.
            tokio::task::spawn_blocking(move || {
                if crate::fsutil::is_mount_point(&target) {
                    return Ok(());
                }
                erofs::mount_image(&img, &target)
            })
            .await
            .map_err(|e| ImageError::Prepare(format!("mount task: {e}")))?
            .map_err(|e| ImageError::Prepare(format!("{e:#}")))?;
            mnt
        } else {
            dir.join("rootfs")
        };
        // Last use is tracked in memory: no disk write on the container start path.
        self.last_used
            .lock()
            .unwrap()
            .insert(meta.digest.clone(), Instant::now());
        Ok(Some(PreparedImage {
            digest: meta.digest,
            lower,
            config: meta.config,
            rootfs_kind: meta.rootfs,
        }))
    }

    fn auth_for(&self, registry: &str) -> Result<RegistryAuth, ImageError> {
        let Some(path) = &self.cfg.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        let text = fs::read_to_string(path).map_err(|e| {
            ImageError::Pull(format!("read registry credentials {}: {e}", path.display()))
        })?;
        auth_from_docker_config(&text, registry)
            .map_err(|e| ImageError::Pull(format!("{}: {e}", path.display())))
    }

    async fn pull_and_prepare(
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
        let cleanup_staging = |staging: &Path| {
            let _ = unmount_if_mounted(&staging.join("rootfs"));
            let _ = remove_dir_all_if_exists(staging);
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
                cleanup_staging(&staging);
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
        };
        let result = self
            .finish_image(&staging, &rootfs_tmp, &dir, meta, progress)
            .await;
        cleanup_staging(&staging);
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

    fn remember_ref(&self, reference: &str, digest: &str) -> Result<(), ImageError> {
        let mut refs = self.refs.lock().unwrap();
        refs.insert(reference.to_string(), digest.to_string());
        write_json_atomic(&self.cfg.root.join("refs.json"), &*refs)
            .map_err(|e| ImageError::Prepare(format!("{e:#}")))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.cfg.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// Remove images no workload uses and that have not been used for `keep_for`, then the
    /// blobs no remaining image references. Returns the digests removed.
    pub async fn gc(&self, in_use: &HashSet<String>, keep_for: Duration) -> Result<Vec<String>> {
        self.collect(|meta| {
            let idle = self
                .last_used
                .lock()
                .unwrap()
                .get(&meta.digest)
                .copied()
                .unwrap_or(self.opened)
                .elapsed();
            !in_use.contains(&meta.digest) && idle >= keep_for
        })
        .await
    }

    /// Remove one image (by the reference it was pulled as, or its digest) right away, like
    /// `crictl rmi`. Refused while a workload uses it.
    pub async fn remove(&self, image: &str, in_use: &HashSet<String>) -> Result<Option<String>> {
        let digest = match self.refs.lock().unwrap().get(image) {
            Some(d) => d.clone(),
            None if image.starts_with("sha256:") => image.to_string(),
            None => return Ok(None),
        };
        if in_use.contains(&digest) {
            bail!("image {image} ({digest}) is used by a workload");
        }
        let removed = self.collect(|meta| meta.digest == digest).await?;
        Ok(removed.into_iter().next())
    }

    /// Remove the prepared images `doomed` selects (unmount, then delete), then every blob no
    /// remaining image references.
    async fn collect(&self, doomed: impl Fn(&ImageMeta) -> bool) -> Result<Vec<String>> {
        let _m = self.mount_lock.lock().await;
        let mut removed = Vec::new();
        let mut live_blobs = HashSet::new();
        for entry in fs::read_dir(&self.cfg.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.len() != 64 || !entry.path().is_dir() {
                continue;
            }
            let Ok(bytes) = fs::read(entry.path().join("meta.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<ImageMeta>(&bytes) else {
                continue;
            };
            if !doomed(&meta) {
                live_blobs.extend(meta.layers.iter().cloned());
                continue;
            }
            let mnt = self.cfg.root.join("mnt").join(&name);
            if let Err(e) = unmount_if_mounted(&mnt) {
                tracing::warn!(image = %meta.digest, error = %format!("{e:#}"), "image still mounted, keeping it");
                live_blobs.extend(meta.layers.iter().cloned());
                continue;
            }
            let _ = fs::remove_dir(&mnt);
            // meta.json first: a crash mid-removal leaves an unprepared dir, not a broken image.
            let _ = fs::remove_file(entry.path().join("meta.json"));
            remove_dir_all_if_exists(&entry.path())?;
            self.last_used.lock().unwrap().remove(&meta.digest);
            tracing::info!(image = %meta.reference, digest = %meta.digest, "removed image");
            removed.push(meta.digest);
        }
        if !removed.is_empty() {
            let mut refs = self.refs.lock().unwrap();
            refs.retain(|_, d| !removed.contains(d));
            write_json_atomic(&self.cfg.root.join("refs.json"), &*refs)?;
        }
        for entry in fs::read_dir(self.cfg.root.join("blobs/sha256"))? {
            let entry = entry?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if !live_blobs.contains(&digest) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(removed)
    }
}

/// How much memory an in-memory staging area may use: half of what is available, at most
/// 16 GiB. `None` when /proc/meminfo cannot tell.
fn tmpfs_budget() -> Option<u64> {
    use procfs::Current;
    let m = procfs::Meminfo::current().ok()?;
    let available = m.mem_available.unwrap_or(m.mem_free);
    Some((available / 2).min(16 << 30))
}

/// A layer blob as the unpacker sees it: a file that may still be growing while its download
/// runs, with the download's outcome once it ends.
struct BlobFeed {
    file: fs::File,
    state: StdMutex<FeedState>,
    changed: std::sync::Condvar,
}

struct FeedState {
    written: u64,
    finished: Option<Result<(), String>>,
}

impl BlobFeed {
    fn complete(file: fs::File, len: u64) -> BlobFeed {
        BlobFeed {
            file,
            state: StdMutex::new(FeedState {
                written: len,
                finished: Some(Ok(())),
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn growing(file: fs::File) -> BlobFeed {
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

    fn finish(&self, r: Result<(), String>) {
        self.state.lock().unwrap().finished = Some(r);
        self.changed.notify_all();
    }

    fn wait_finished(&self) -> Result<(), String> {
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
struct FeedReader<'a> {
    feed: &'a BlobFeed,
    pos: u64,
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
async fn fetch_blob(
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
        file.write_all(buf)
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

/// Credentials for `registry` from a docker `config.json`: `auths` keyed by host (optionally
/// with a scheme), each with `auth` (base64 `user:password`) or `username`/`password`.
pub fn auth_from_docker_config(text: &str, registry: &str) -> Result<RegistryAuth, String> {
    use base64::Engine;
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default, rename = "identitytoken")]
        identity_token: Option<String>,
    }
    let f: File =
        serde_json::from_str(text).map_err(|e| format!("not a docker config.json: {e}"))?;
    let host_of = |k: &str| {
        k.trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let wanted = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let entry = f
        .auths
        .iter()
        .find(|(k, _)| host_of(k) == registry || host_of(k) == wanted)
        .map(|(_, v)| v);
    let Some(e) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &e.identity_token {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(a) = &e.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| format!("auths.{registry}.auth is not base64: {e}"))?;
        let s = String::from_utf8(decoded)
            .map_err(|_| format!("auths.{registry}.auth is not utf-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| format!("auths.{registry}.auth must encode user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Err(format!("auths.{registry} has no credentials"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_forms() {
        let cfg = r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},"https://reg.example/v2/":{"username":"a","password":"b"}}}"#;
        assert!(
            matches!(auth_from_docker_config(cfg, "127.0.0.1:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "user" && p == "pass")
        );
        assert!(
            matches!(auth_from_docker_config(cfg, "reg.example").unwrap(), RegistryAuth::Basic(u, _) if u == "a")
        );
        assert!(matches!(
            auth_from_docker_config(cfg, "other:1").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(auth_from_docker_config("{\"auths\":{\"x\":{\"auth\":\"!!\"}}}", "x").is_err());
    }

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
