//! The layer store on a real node: one EROFS per layer, shared between images, stacked by
//! overlayfs; the same trees as the flattened store; collection; crash safety; many layers.

use std::fs;
use std::path::Path;
use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn node(reg: &Registry, more: &[&str], env: &[(&str, &str)]) -> Node {
    let mut args = vec!["--insecure-registry", reg.addr.as_str()];
    args.extend_from_slice(more);
    Node::start_with_env(&args, env).unwrap()
}

/// Bytes used under `dir` (allocated blocks, as `du` counts), not following symlinks.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn layers_in_store(node: &Node) -> usize {
    fs::read_dir(node.state.join("images/layers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The image metas of a node, by digest.
fn image_meta(node: &Node, digest: &str) -> Value {
    let p = node
        .state
        .join("images")
        .join(digest.trim_start_matches("sha256:"))
        .join("meta.json");
    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap()
}

fn pull(node: &Node, image: &str) {
    let out = node.cli(&["pull", image]);
    assert!(
        out.status.success(),
        "pull {image}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        node.daemon_log()
    );
}

/// A layer of `mb` MiB of incompressible data (so sizes on disk mean something).
fn data_layer(name: &str, mb: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; mb << 20];
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    Layer::new()
        .dir("data/", 0o755)
        .file(&format!("data/{name}"), &data, 0o644)
        .finish()
}

#[test]
fn a_new_version_prepares_only_its_new_layer() {
    let reg = Registry::start(false).unwrap();
    let base = vec![
        (busybox_layer().finish(), Compress::Gzip),
        (data_layer("one", 8, 1), Compress::Gzip),
        (data_layer("two", 8, 2), Compress::Zstd),
    ];
    let (v1, d1) = push_image(&reg, "big", "1", base.clone(), &[], &["sh"]).unwrap();
    let mut with_top = base.clone();
    with_top.push((
        Layer::new()
            .dir("app/", 0o755)
            .file("app/version", b"2\n", 0o644)
            .finish(),
        Compress::Gzip,
    ));
    let (v2, d2) = push_image(&reg, "big", "2", with_top, &[], &["sh"]).unwrap();
    let node = node(&reg, &[], &[]);
    pull(&node, &v1);
    assert_eq!(layers_in_store(&node), 3);
    assert_eq!(image_meta(&node, &d1)["store"], "layers");
    let images = node.state.join("images");
    let before = disk_usage(&images);
    pull(&node, &v2);
    let grown = disk_usage(&images) - before;
    assert_eq!(layers_in_store(&node), 4, "one new layer");
    assert_eq!(image_meta(&node, &d2)["store"], "layers");
    // The new layer is a few KiB of EROFS plus metadata; the shared 16 MiB are not copied.
    assert!(grown < 1 << 20, "pulling v2 added {grown} bytes");
    // Both run, each seeing its own top.
    node.apply(&workload(
        "v2",
        &v2,
        "  command: [sh, -c, 'cat /app/version; wc -c /data/one /data/two']\n  restartPolicy: Never\n",
    ));
    node.wait_for("v2", T, "v2 done", |v| v["phase"] == "Succeeded")
        .unwrap();
    let out = String::from_utf8_lossy(&node.cli(&["logs", "v2"]).stdout).to_string();
    assert!(out.starts_with("2\n"), "{out}");
    assert!(out.contains("8388608 /data/one"), "{out}");
    // Shared layers are mounted once, whatever number of images use them.
    let layer_mounts = node
        .mounts()
        .into_iter()
        .filter(|m| m.contains("/images/lmnt/"))
        .count();
    assert!(layer_mounts <= 4, "{layer_mounts} layer mounts");
}

/// Three layers with whiteouts, opaque directories and replaced entries: the layer store and
/// the flattened store show the same tree (names, types, modes, owners, contents).
#[test]
fn whiteouts_across_three_layers_match_the_flattened_store() {
    let reg = Registry::start(false).unwrap();
    let l1 = busybox_layer()
        .dir("t/", 0o755)
        .dir("t/a/", 0o750)
        .file("t/a/keep", b"1", 0o644)
        .file("t/a/gone", b"1", 0o600)
        .dir("t/o/", 0o755)
        .file("t/o/lower", b"1", 0o644)
        .dir("t/o/sub/", 0o700)
        .file("t/o/sub/deep", b"1", 0o644)
        .file("t/swap", b"file", 0o644)
        .symlink("t/link", "a/keep")
        .finish();
    let l2 = Layer::new()
        .dir("t/", 0o755)
        .dir("t/a/", 0o750)
        .file("t/a/.wh.gone", b"", 0o644)
        .file("t/a/new2", b"2", 0o640)
        .dir("t/o/", 0o711)
        .file("t/o/.wh..wh..opq", b"", 0o644)
        .file("t/o/fresh", b"2", 0o644)
        .file("t/.wh.swap", b"", 0o644)
        .dir("t/swap/", 0o755)
        .file("t/swap/inside", b"2", 0o644)
        .finish();
    let l3 = Layer::new()
        .dir("t/", 0o755)
        .dir("t/a/", 0o750)
        .file("t/a/.wh.new2", b"", 0o644)
        .file("t/a/gone", b"back", 0o644)
        .file("t/.wh.link", b"", 0o644)
        .dir("t/o/", 0o711)
        .file("t/o/fresh", b"3", 0o600)
        .finish();
    let (image, digest) = push_image(
        &reg,
        "wh3",
        "1",
        vec![
            (l1, Compress::Gzip),
            (l2, Compress::Zstd),
            (l3, Compress::None),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let list = "  command: [sh, -c, 'cd /t && for f in $(find . | sort); do echo \"$f $(stat -c %A.%u.%g $f) $(test -f $f && cat $f)\"; done']\n  restartPolicy: Never\n";
    let tree_with = |store: &str| {
        let n = node(&reg, &["--image-store", store], &[]);
        n.apply(&workload("ls", &image, list));
        n.wait_for("ls", T, "listing", |v| v["phase"] == "Succeeded")
            .unwrap();
        let out = String::from_utf8_lossy(&n.cli(&["logs", "ls"]).stdout).to_string();
        let meta = image_meta(&n, &digest);
        (out, meta["store"].as_str().unwrap_or("").to_string())
    };
    let (layered, store) = tree_with("layers");
    assert_eq!(store, "layers", "prepared as a stack of layers");
    let (flat, store) = tree_with("flattened");
    assert_eq!(store, "", "prepared flattened");
    assert_eq!(layered, flat);
    assert!(
        layered.contains("./a/gone -rw-r--r--.0.0 back"),
        "{layered}"
    );
    assert!(
        !layered.contains("new2") && !layered.contains("./link"),
        "{layered}"
    );
    assert!(layered.contains("./o/fresh -rw-------.0.0 3"), "{layered}");
    assert!(
        !layered.contains("lower") && !layered.contains("deep"),
        "{layered}"
    );
    assert!(layered.contains("./swap/inside"), "{layered}");
}

/// A layer whose whiteout sits in a directory it has no entry for, where no lower layer has
/// that directory: overlayfs would show an empty directory that applying the layers does not
/// make, so the image is flattened, and the tree is still right.
#[test]
fn an_image_layers_cannot_express_is_flattened() {
    let reg = Registry::start(false).unwrap();
    let upper = Layer::new()
        .file("nodir/.wh.missing", b"", 0o644)
        .file("x", b"x", 0o644)
        .finish();
    let (image, digest) = push_image(
        &reg,
        "odd",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (upper, Compress::Gzip),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let n = node(&reg, &[], &[]);
    n.apply(&workload(
        "odd",
        &image,
        "  command: [sh, -c, 'test -e /nodir && echo present || echo absent; cat /x']\n  restartPolicy: Never\n",
    ));
    n.wait_for("odd", T, "done", |v| v["phase"] == "Succeeded")
        .unwrap();
    let out = String::from_utf8_lossy(&n.cli(&["logs", "odd"]).stdout).to_string();
    assert_eq!(out, "absent\nx");
    assert_eq!(image_meta(&n, &digest)["store"], Value::Null);
    assert!(n.daemon_log().contains("flattening it"));
}

#[test]
fn shared_layers_are_kept_until_no_image_uses_them() {
    let reg = Registry::start(false).unwrap();
    let shared = busybox_layer().finish();
    let (a, _) = push_image(
        &reg,
        "a",
        "1",
        vec![
            (shared.clone(), Compress::Gzip),
            (
                Layer::new().file("only-a", b"a", 0o644).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let (b, _) = push_image(
        &reg,
        "b",
        "1",
        vec![
            (shared, Compress::Gzip),
            (
                Layer::new().file("only-b", b"b", 0o644).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let n = node(&reg, &[], &[]);
    pull(&n, &a);
    pull(&n, &b);
    assert_eq!(layers_in_store(&n), 3, "the busybox layer once");
    let rmi = |img: &str| {
        let out = n.cli(&["rmi", img]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    rmi(&a);
    assert_eq!(
        layers_in_store(&n),
        2,
        "a's own layer went, the shared one stays"
    );
    // b still runs from what is left.
    n.apply(&workload(
        "b",
        &b,
        "  command: [cat, /only-b]\n  restartPolicy: Never\n",
    ));
    n.wait_for("b", T, "b done", |v| v["phase"] == "Succeeded")
        .unwrap();
    assert!(n.cli(&["delete", "b"]).status.success());
    rmi(&b);
    assert_eq!(layers_in_store(&n), 0);
    let lmnt: Vec<_> = n
        .mounts()
        .into_iter()
        .filter(|m| m.contains("/images/lmnt/"))
        .collect();
    assert!(lmnt.is_empty(), "{lmnt:?}");
}

#[test]
fn kill9_during_conversion_leaves_no_half_layer() {
    let reg = Registry::start(false).unwrap();
    let (image, _) = push_image(
        &reg,
        "slow",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (data_layer("a", 48, 3), Compress::Gzip),
            (data_layer("b", 48, 4), Compress::Gzip),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let mut n = node(&reg, &[], &[]);
    let child = std::process::Command::new(bin("hyperbox-node"))
        .arg("--socket")
        .arg(&n.socket)
        .args(["pull", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill the daemon while a layer is being converted (its staging exists).
    let tmp = n.state.join("images/tmp");
    wait_until(T, "a conversion in progress", || {
        fs::read_dir(&tmp)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("layer-"))
            .then_some(())
    })
    .unwrap();
    n.kill9();
    drop(child);
    n.spawn().unwrap();
    // Nothing half-done is left or used: staging is gone, every layer in the store is whole.
    let leftovers: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for e in fs::read_dir(n.state.join("images/layers"))
        .unwrap()
        .flatten()
    {
        assert!(
            e.path().join("meta.json").exists(),
            "{:?} is incomplete",
            e.path()
        );
    }
    let staging_mounts: Vec<_> = n
        .mounts()
        .into_iter()
        .filter(|m| m.contains("/images/tmp/"))
        .collect();
    assert!(staging_mounts.is_empty(), "{staging_mounts:?}");
    // And the pull completes now.
    pull(&n, &image);
    assert_eq!(layers_in_store(&n), 3);
}

/// 120 layers: more than the page of options mount(2) takes, so the overlay is made with
/// `lowerdir+` (new mount API). The classic path (forced) refuses it with a clear error, and
/// still mounts a few layers.
#[test]
fn an_image_of_120_layers_runs() {
    let reg = Registry::start(false).unwrap();
    let mut layers = vec![(busybox_layer().dir("many/", 0o755).finish(), Compress::Gzip)];
    for i in 1..120 {
        layers.push((
            Layer::new()
                .dir("many/", 0o755)
                .file(&format!("many/f{i:03}"), format!("{i}").as_bytes(), 0o644)
                .finish(),
            Compress::Gzip,
        ));
    }
    let (image, _) = push_image(&reg, "many", "1", layers.clone(), &[], &["sh"]).unwrap();
    let n = node(&reg, &[], &[]);
    n.apply(&workload(
        "many",
        &image,
        "  command: [sh, -c, 'ls /many | wc -l; cat /many/f119']\n  restartPolicy: Never\n",
    ));
    let v = n
        .wait_for("many", T, "done", |v| v["phase"] == "Succeeded")
        .unwrap();
    assert_eq!(v["replicas"][0]["lastExitCode"], 0);
    let out = String::from_utf8_lossy(&n.cli(&["logs", "many"]).stdout).to_string();
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["119", "119"]);
    drop(n);

    // The classic mount(2): too many layers for it, said clearly; three layers work.
    let legacy = node(&reg, &[], &[("HYPERBOX_LEGACY_OVERLAY_MOUNT", "1")]);
    legacy.apply(&workload(
        "many",
        &image,
        "  command: ['true']\n  restartPolicy: Never\n",
    ));
    let v = legacy
        .wait_for("many", T, "refused", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("new mount API"))
        })
        .unwrap();
    assert!(v["message"].as_str().unwrap().contains("120 layers"), "{v}");
    let (few, _) = push_image(&reg, "few", "1", layers[..3].to_vec(), &[], &["sh"]).unwrap();
    legacy.apply(&workload(
        "few",
        &few,
        "  command: [cat, /many/f002]\n  restartPolicy: Never\n",
    ));
    legacy
        .wait_for("few", T, "done", |v| v["phase"] == "Succeeded")
        .unwrap();
    let out = String::from_utf8_lossy(&legacy.cli(&["logs", "few"]).stdout).to_string();
    assert_eq!(out, "2");
}

fn features(node: &Node) -> Value {
    let out = node.cli(&["node", "-o", "json"]);
    assert!(out.status.success());
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["features"].clone()
}

/// Without EROFS each layer is a plain directory: the same sharing, and `node` says so.
#[test]
fn without_erofs_layers_are_shared_directories() {
    let reg = Registry::start(false).unwrap();
    let shared = busybox_layer().finish();
    let img = |repo: &str, file: &str| {
        push_image(
            &reg,
            repo,
            "1",
            vec![
                (shared.clone(), Compress::Gzip),
                (
                    Layer::new().file(file, b"x", 0o644).finish(),
                    Compress::Gzip,
                ),
            ],
            &[],
            &["sh"],
        )
        .unwrap()
        .0
    };
    let (a, b) = (img("da", "only-a"), img("db", "only-b"));
    let n = node(&reg, &[], &[("HYPERBOX_DISABLE_EROFS", "1")]);
    let f = features(&n);
    assert_eq!(f["imageStore"], "layers");
    assert_eq!(f["imageFormat"], "directory");
    pull(&n, &a);
    pull(&n, &b);
    assert_eq!(layers_in_store(&n), 3);
    assert!(n
        .state
        .join("images/layers")
        .read_dir()
        .unwrap()
        .flatten()
        .all(|e| e.path().join("tree").is_dir()));
    n.apply(&workload(
        "b",
        &b,
        "  command: [cat, /only-b]\n  restartPolicy: Never\n",
    ));
    n.wait_for("b", T, "b done", |v| v["phase"] == "Succeeded")
        .unwrap();
    let v = n.get("b").unwrap();
    assert_eq!(v["rootfs"], "directory");
}

/// Images prepared by the flattened store keep working after a switch to the layer store:
/// the running container is re-adopted, and new containers use the prepared image as it is.
#[test]
fn flattened_images_keep_working_in_the_layer_store() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut n = node(&reg, &["--image-store", "flattened"], &[]);
    assert_eq!(features(&n)["imageStore"], "flattened");
    n.apply(&workload("old", &image, "  command: [sleep, '1000']\n"));
    let before = n
        .wait_for("old", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    assert_eq!(layers_in_store(&n), 0);
    // The same state dir under the layer store.
    n.kill9();
    n.extra.retain(|a| a != "--image-store" && a != "flattened");
    n.spawn().unwrap();
    assert_eq!(features(&n)["imageStore"], "layers");
    let after = n
        .wait_for("old", T, "re-adopted", |v| v["phase"] == "Running")
        .unwrap();
    assert_eq!(container_ids(&after), container_ids(&before));
    n.apply(&workload(
        "new",
        &image,
        "  command: [echo, hi]\n  restartPolicy: Never\n",
    ));
    n.wait_for("new", T, "new done", |v| v["phase"] == "Succeeded")
        .unwrap();
    assert_eq!(
        layers_in_store(&n),
        0,
        "the flattened image was used as it is"
    );
}

/// fs-verity: where the state dir's filesystem has it, layer files are sealed and a file
/// changed behind the store's back is refused at mount; where it has not, `node` says why
/// and layers work unsealed.
#[test]
fn layer_files_are_sealed_where_fs_verity_exists() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut n = node(&reg, &[], &[]);
    let f = features(&n);
    pull(&n, &image);
    let layer = n
        .state
        .join("images/layers")
        .read_dir()
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let meta: Value = serde_json::from_slice(&fs::read(layer.join("meta.json")).unwrap()).unwrap();
    if f["fsverity"] != true {
        let why = f["fsverityReason"].as_str().unwrap_or_default().to_string();
        assert!(why.contains("fs-verity"), "{f}");
        assert!(meta.get("verity").is_none(), "{meta}");
        eprintln!("fs-verity is not available here ({why}); sealing is not exercised");
        return;
    }
    assert!(meta["verity"].as_str().unwrap().starts_with("sha256:"));
    // Replace the sealed file by a copy with one byte flipped, unmounted, after a restart.
    n.kill9();
    let mnt = n.state.join("images/lmnt").join(layer.file_name().unwrap());
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: umount2 with a valid C string.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let file = layer.join("layer.erofs");
    let mut data = fs::read(&file).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(layer.join("tampered"), &data).unwrap();
    fs::rename(layer.join("tampered"), &file).unwrap();
    n.spawn().unwrap();
    n.apply(&workload(
        "t",
        &image,
        "  command: ['true']\n  restartPolicy: Never\n",
    ));
    let v = n
        .wait_for("t", T, "refused", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("fails its fs-verity check"))
        })
        .unwrap();
    assert_ne!(v["phase"], "Succeeded");
}
