//! How a workload is identified: by namespace and name, as in Kubernetes.
//!
//! The key is a workload's name in the `default` namespace and `namespace/name` elsewhere, so
//! an edge node that never uses namespaces keeps its plain names (in the CLI, the state dir
//! and container ids). Names may be up to 253 characters (a DNS-1123 subdomain), longer than
//! a file name, a cgroup or a hostname may be: [`safe_name`] shortens them where a kernel or
//! file system limit applies, and the API always carries the full name.

/// The namespace of a workload that names none (edge manifests usually do not).
pub const DEFAULT_NAMESPACE: &str = "default";

/// For serde: what a missing namespace means.
pub fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Longest workload name (a DNS-1123 subdomain, as Kubernetes allows).
pub const MAX_NAME_LEN: usize = 253;

/// Longest namespace (a DNS-1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;

/// The key of `name` in `namespace`: `name` in the default namespace, else `namespace/name`.
pub fn workload_key(namespace: &str, name: &str) -> String {
    if namespace == DEFAULT_NAMESPACE || namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// The namespace and name of a key (`name` or `namespace/name`).
pub fn split_key(key: &str) -> (&str, &str) {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() => (ns, name),
        Some((_, name)) => (DEFAULT_NAMESPACE, name),
        None => (DEFAULT_NAMESPACE, key),
    }
}

/// A key as users may write it (`default/web` is `web`).
pub fn normalize_key(key: &str) -> String {
    let (ns, name) = split_key(key);
    workload_key(ns, name)
}

/// A name for `key` that is safe as a file name, a cgroup or a container id, at most `max`
/// bytes (`max` >= 40). Short keys stay readable: `web`, or `team-a_web` for `team-a/web`
/// ('_' is in neither a namespace nor a name). Longer ones keep a prefix and gain a hash of
/// the whole key after `__`, which no unshortened form contains:
/// `very-long-name-prefix__1f2e…`. Shortening an already safe name to a smaller `max` gives
/// what shortening the key would, so one form can be derived from another.
pub fn safe_name(key: &str, max: usize) -> String {
    let plain = key.replacen('/', "_", 1);
    shorten(&plain, max)
}

/// Longest safe name of a workload's files and directories on a node (records, logs,
/// volumes): a 253-character name plus a namespace do not fit a 255-byte file name.
pub const FILE_STEM_MAX: usize = 200;

/// The safe name of a workload's files and directories (see [`safe_name`]).
pub fn file_stem(key: &str) -> String {
    safe_name(key, FILE_STEM_MAX)
}

/// Length of the hash part of a shortened name (hex characters).
const HASH_CHARS: usize = 24;

/// Shorten a safe name (see [`safe_name`]) to at most `max` bytes.
pub fn shorten(safe: &str, max: usize) -> String {
    assert!(
        max >= HASH_CHARS + 16,
        "safe names need room for their hash"
    );
    if safe.len() <= max {
        return safe.to_string();
    }
    let (head, hash) = match safe.rsplit_once("__") {
        Some((head, hash)) if hash.len() == HASH_CHARS => (head, hash.to_string()),
        _ => {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(safe.as_bytes());
            (safe, hex::encode(&h[..HASH_CHARS / 2]))
        }
    };
    let keep = (max - HASH_CHARS - 2).min(head.len());
    format!("{}__{hash}", &head[..keep])
}

/// A hostname for a replica of `name`: at most 63 characters (what `sethostname` and DNS
/// labels allow), cut at a character that may end a label.
pub fn hostname(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    name[..63]
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(workload_key("default", "web"), "web");
        assert_eq!(workload_key("", "web"), "web");
        assert_eq!(workload_key("team-a", "web"), "team-a/web");
        assert_eq!(split_key("web"), ("default", "web"));
        assert_eq!(split_key("team-a/web"), ("team-a", "web"));
        assert_eq!(split_key("/web"), ("default", "web"));
        assert_eq!(normalize_key("default/web"), "web");
        assert_eq!(normalize_key("team-a/web.v2"), "team-a/web.v2");
    }

    #[test]
    fn safe_names_are_plain_when_short_and_bounded_when_long() {
        assert_eq!(safe_name("web", 53), "web");
        assert_eq!(safe_name("team-a/web", 53), "team-a_web");
        let long = format!("ns/{}", "a".repeat(253));
        for max in [40, 53, 200, 255] {
            let s = safe_name(&long, max);
            assert!(s.len() <= max, "{max}: {s}");
            assert!(s.contains("__"));
            assert!(s.starts_with("ns_aaa"));
        }
        // Two keys that differ only past the kept prefix differ in their safe names.
        let other = format!("ns/{}b", "a".repeat(252));
        assert_ne!(safe_name(&long, 53), safe_name(&other, 53));
        // The namespace matters: the same name elsewhere is another name.
        assert_ne!(
            safe_name(&"a".repeat(253), 53),
            safe_name(&format!("x/{}", "a".repeat(253)), 53)
        );
    }

    #[test]
    fn a_shorter_form_derives_from_a_longer_one() {
        let key = format!("team/{}", "b".repeat(250));
        let at_200 = safe_name(&key, 200);
        assert_eq!(shorten(&at_200, 53), safe_name(&key, 53));
        // A plain name that fits at 200 but not at 53 shortens like its key.
        let mid = "c".repeat(120);
        assert_eq!(shorten(&safe_name(&mid, 200), 53), safe_name(&mid, 53));
    }

    #[test]
    fn hostnames_fit_a_label() {
        assert_eq!(hostname("web"), "web");
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(100));
        assert_eq!(hostname(&long), "a".repeat(62));
        assert!(hostname(&"x.".repeat(100)).len() <= 63);
    }
}
