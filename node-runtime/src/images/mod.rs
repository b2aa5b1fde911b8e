//! Images: the image store (this module), its pull pipeline (`pull`), layer images
//! (`layers`), fs-verity sealing ([`verity`]), EROFS building and mounts ([`erofs`]) and
//! registry credentials (`auth`). A reference goes in; a [`PreparedImage`] (read-only lower
//! layers for an overlay) comes out.
//!
//! It may call `crate::telemetry` (its counters), `crate::fsutil` and the kernel (mounts,
//! mkfs.erofs). It never names a workload or a container: the workloads ask it for images,
//! and the containers mount what it prepared.
//!
//! The store pulls OCI images with oci-client into a content-addressed blob store, unpacks
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
use std::time::{Duration, Instant};

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

use self::erofs::ErofsSupport;

mod auth;
pub mod erofs;
mod layers;
mod pull;
pub mod verity;

use crate::fsutil::{now_unix, remove_dir_all_if_exists, unmount_if_mounted, write_json_atomic};
pub use auth::auth_from_docker_config;
pub use pull::parse_image_config;

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
    /// Prepare images as stacks of shared layers (see [`layers`]); false flattens each
    /// image into one EROFS, as before the layer store.
    pub layered: bool,
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
    /// `layers` for an image made of shared layers; empty for a flattened one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    store: String,
    /// Its layers' uncompressed digests, bottom first (layered images).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    diff_ids: Vec<String>,
}

/// An image ready to be used as a container's lower layer.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub digest: String,
    /// The overlay lower directories, top first.
    pub lowers: Vec<PathBuf>,
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
    /// One conversion per layer (diff_id) at a time.
    layer_locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Layers that preparations in flight use (GC keeps them), with a count.
    pinned_layers: StdMutex<HashMap<String, usize>>,
    /// Whether layer files can be sealed with fs-verity here, or why not.
    verity: Result<(), String>,
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::InvalidImage(format!("unsupported digest {digest:?}")))
}

impl ImageStore {
    pub fn open(cfg: StoreConfig, erofs: ErofsSupport) -> Result<ImageStore> {
        for d in ["blobs/sha256", "mnt", "tmp", "layers", "lmnt"] {
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
        for e in fs::read_dir(cfg.root.join("layers"))?.flatten() {
            if !e.path().join("meta.json").exists() {
                tracing::warn!(dir = %e.path().display(), "removing an incomplete layer");
                remove_dir_all_if_exists(&e.path())?;
            }
        }
        let verity = verity::probe(&cfg.root.join("layers"));
        match &verity {
            Ok(()) => {
                tracing::info!("fs-verity available: layer files are sealed and measured at mount")
            }
            Err(why) => {
                tracing::info!(reason = %why, "fs-verity unavailable: layer files are not sealed")
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
            layer_locks: StdMutex::new(HashMap::new()),
            pinned_layers: StdMutex::new(HashMap::new()),
            verity,
        })
    }

    /// Whether images are prepared as stacks of shared layers.
    pub fn layered(&self) -> bool {
        self.cfg.layered
    }

    /// Whether layer files are sealed with fs-verity, or why not.
    pub fn verity(&self) -> &Result<(), String> {
        &self.verity
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
        use tracing::Instrument;
        let store = self.clone();
        let span = tracing::info_span!("image.prepare", image = %reference);
        let reference = reference.to_string();
        let r = tokio::spawn(async move { store.ensure_now(&reference).await }.instrument(span))
            .await
            .map_err(|e| ImageError::Prepare(format!("image preparation task: {e}")))?;
        crate::telemetry::COUNTERS.prepares.record(r.is_ok());
        r
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
        let t0 = Instant::now();
        let result = {
            use tracing::Instrument;
            self.pull_and_prepare(reference, &parsed, &progress)
                .instrument(tracing::info_span!("image.pull", image = %reference))
                .await
        };
        let counters = &crate::telemetry::COUNTERS;
        counters.pulls.record(result.is_ok());
        counters.prepare_seconds.observe(t0.elapsed());
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
        if meta.store == layers::STORE_LAYERS {
            let mut metas = Vec::with_capacity(meta.diff_ids.len());
            for d in meta.diff_ids.iter().rev() {
                let Some(lm) = self.layer_meta(d)? else {
                    // A layer went missing (removed by hand): prepare the image again.
                    tracing::warn!(image = %meta.digest, layer = %d, "a layer of the image is missing");
                    return Ok(None);
                };
                metas.push(lm);
            }
            let lowers = self.layer_lowers(metas).await?;
            self.last_used
                .lock()
                .unwrap()
                .insert(meta.digest.clone(), Instant::now());
            return Ok(Some(PreparedImage {
                digest: meta.digest,
                lowers,
                config: meta.config,
                rootfs_kind: meta.rootfs,
            }));
        }
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
            lowers: vec![lower],
            config: meta.config,
            rootfs_kind: meta.rootfs,
        }))
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
        // Directory scans, unmounts and removals block: they run on a blocking thread, and
        // only the decision (which needs the in-memory last-use times) runs here.
        let root = self.cfg.root.clone();
        let images = tokio::task::spawn_blocking(move || prepared_images(&root))
            .await
            .context("image scan task")??;
        let (doomed, kept): (Vec<_>, Vec<_>) =
            images.into_iter().partition(|(_, meta)| doomed(meta));
        let root = self.cfg.root.clone();
        let pinned = self.pinned();
        let removed = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut live_blobs: HashSet<String> =
                kept.iter().flat_map(|(_, m)| m.layers.iter().cloned()).collect();
            let mut removed = Vec::new();
            for (dir, meta) in doomed {
                let name = dir.file_name().unwrap_or_default().to_owned();
                let mnt = root.join("mnt").join(&name);
                if let Err(e) = unmount_if_mounted(&mnt) {
                    tracing::warn!(image = %meta.digest, error = %format!("{e:#}"), "image still mounted, keeping it");
                    live_blobs.extend(meta.layers.iter().cloned());
                    continue;
                }
                let _ = fs::remove_dir(&mnt);
                // meta.json first: a crash mid-removal leaves an unpublished dir (removed at
                // the next start), never a broken image.
                let _ = fs::remove_file(dir.join("meta.json"));
                remove_dir_all_if_exists(&dir)?;
                tracing::info!(image = %meta.reference, digest = %meta.digest, "removed image");
                removed.push(meta.digest);
            }
            let live_layers: HashSet<String> =
                kept.iter().flat_map(|(_, m)| m.diff_ids.iter().cloned()).collect();
            for entry in fs::read_dir(root.join("blobs/sha256"))? {
                let entry = entry?;
                let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
                if !live_blobs.contains(&digest) {
                    let _ = fs::remove_file(entry.path());
                }
            }
            // Layers no remaining image uses (and no preparation in flight pinned).
            layers::collect_layers(&root, &live_layers, &pinned)?;
            Ok(removed)
        })
        .await
        .context("image removal task")??;
        if !removed.is_empty() {
            {
                let mut last_used = self.last_used.lock().unwrap();
                for d in &removed {
                    last_used.remove(d);
                }
            }
            let refs = {
                let mut refs = self.refs.lock().unwrap();
                refs.retain(|_, d| !removed.contains(d));
                refs.clone()
            };
            let path = self.cfg.root.join("refs.json");
            tokio::task::spawn_blocking(move || write_json_atomic(&path, &refs))
                .await
                .context("refs write task")??;
        }
        Ok(removed)
    }
}

/// Every published image under `root`: its directory and meta.json.
fn prepared_images(root: &Path) -> Result<Vec<(PathBuf, ImageMeta)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
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
        out.push((entry.path(), meta));
    }
    Ok(out)
}
