//! Turning the files of one source revision into a desired set: every good Workload, and for
//! every bad document a report plus the names it must protect (their previous version keeps
//! running instead of being pruned or changed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use hyperbox_api::validate::{parse_documents, FieldError, ParsedDocument};
use hyperbox_api::Workload;
use serde::{Deserialize, Serialize};

/// One Workload and where it came from.
#[derive(Debug, Clone)]
pub struct SourcedWorkload {
    pub file: String,
    pub workload: Workload,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    pub path: String,
    /// Names of the workloads this file defines (good ones).
    pub workloads: Vec<String>,
    /// `file:line: field: message` lines.
    pub errors: Vec<String>,
    /// Documents that are not ours (other kinds), skipped.
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Clone)]
pub struct ManifestSet {
    pub workloads: BTreeMap<String, SourcedWorkload>,
    pub files: Vec<FileReport>,
    /// Names that appear in a broken document (or twice): never pruned, never changed.
    pub protected: BTreeSet<String>,
    /// Files that could not be read to the end: everything previously applied from them is
    /// protected too, since we cannot tell what they still define.
    pub broken_files: BTreeSet<String>,
}

impl ManifestSet {
    pub fn error_count(&self) -> usize {
        self.files.iter().map(|f| f.errors.len()).sum()
    }
}

/// Whether a path is a manifest we read.
pub fn is_manifest(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// The parse of one file's bytes, cacheable by content (a Git blob id).
#[derive(Debug, Clone)]
pub struct ParsedFile {
    docs: Vec<ParsedDoc>,
}

#[derive(Debug, Clone)]
enum ParsedDoc {
    Workload(Box<Workload>),
    Other(String),
    Invalid {
        name: Option<String>,
        errors: Vec<FieldError>,
    },
    Unreadable(FieldError),
}

pub fn parse_file(bytes: &[u8]) -> ParsedFile {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return ParsedFile {
                docs: vec![ParsedDoc::Unreadable(FieldError {
                    field: String::new(),
                    message: format!("not utf-8: {e}"),
                    line: None,
                    reason: None,
                })],
            }
        }
    };
    let docs = match parse_documents(text) {
        Ok(docs) => docs
            .into_iter()
            .map(|d| match d {
                ParsedDocument::Workload(w) => ParsedDoc::Workload(w),
                ParsedDocument::OtherKind { api_version, kind } => ParsedDoc::Other(format!(
                    "skipped {} ({}): not a hyperbox Workload",
                    if kind.is_empty() {
                        "a document without kind"
                    } else {
                        &kind
                    },
                    if api_version.is_empty() {
                        "no apiVersion"
                    } else {
                        &api_version
                    }
                )),
                ParsedDocument::Invalid { key, errors } => ParsedDoc::Invalid { name: key, errors },
                ParsedDocument::Unreadable(e) => ParsedDoc::Unreadable(e),
            })
            .collect(),
        Err(e) => vec![ParsedDoc::Unreadable(e)],
    };
    ParsedFile { docs }
}

/// The parse result of a file too large to read (it is never loaded).
pub fn oversized(size: usize) -> ParsedFile {
    ParsedFile {
        docs: vec![ParsedDoc::Unreadable(FieldError {
            field: String::new(),
            message: format!(
                "file is {size} bytes, larger than the {} byte limit",
                hyperbox_api::validate::MAX_MANIFEST_BYTES
            ),
            line: None,
            reason: None,
        })],
    }
}

fn render(path: &str, e: &FieldError) -> String {
    let field = if e.field.is_empty() {
        "document"
    } else {
        &e.field
    };
    match e.line {
        Some(l) => format!("{path}:{l}: {field}: {}", e.message),
        None => format!("{path}: {field}: {}", e.message),
    }
}

/// Build the desired set from parsed files (path order is kept, so reports are stable).
pub fn assemble(files: Vec<(String, Arc<ParsedFile>)>) -> ManifestSet {
    let mut set = ManifestSet::default();
    // name -> files defining it (to find duplicates across and within files)
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut candidates: Vec<SourcedWorkload> = Vec::new();
    for (path, parsed) in &files {
        let mut report = FileReport {
            path: path.clone(),
            workloads: vec![],
            errors: vec![],
            notes: vec![],
        };
        for (i, d) in parsed.docs.iter().enumerate() {
            match d {
                ParsedDoc::Workload(w) => {
                    seen.entry(w.key()).or_default().push(path.clone());
                    report.workloads.push(w.key());
                    candidates.push(SourcedWorkload {
                        file: path.clone(),
                        workload: (**w).clone(),
                    });
                }
                ParsedDoc::Other(note) => report.notes.push(format!("document {}: {note}", i + 1)),
                ParsedDoc::Invalid { name, errors } => {
                    if let Some(n) = name {
                        set.protected.insert(n.clone());
                    }
                    report.errors.extend(errors.iter().map(|e| render(path, e)));
                }
                ParsedDoc::Unreadable(e) => {
                    set.broken_files.insert(path.clone());
                    report.errors.push(render(path, e));
                }
            }
        }
        set.files.push(report);
    }
    for (name, paths) in &seen {
        if paths.len() > 1 {
            set.protected.insert(name.clone());
            for f in set.files.iter_mut().filter(|f| paths.contains(&f.path)) {
                f.errors.push(format!(
                    "{}: metadata.name: workload {name:?} is defined more than once ({}); all copies skipped",
                    f.path,
                    paths.join(", ")
                ));
                f.workloads.retain(|w| w != name);
            }
        }
    }
    for c in candidates {
        let name = c.workload.key();
        if !set.protected.contains(&name) {
            set.workloads.insert(name, c);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str) -> String {
        format!("apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: r.io/a:1\n")
    }

    fn files(list: &[(&str, String)]) -> Vec<(String, Arc<ParsedFile>)> {
        list.iter()
            .map(|(p, t)| (p.to_string(), Arc::new(parse_file(t.as_bytes()))))
            .collect()
    }

    #[test]
    fn good_bad_and_other_documents() {
        let bad = w("broken").replace("image: r.io/a:1", "image: r.io/a:1\n  replicas: lots");
        let set = assemble(files(&[
            ("a.yaml", format!("{}---\n{}", w("one"), w("two"))),
            ("b.yaml", bad),
            (
                "c.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".into(),
            ),
            ("d.yaml", "key: [unclosed\n".into()),
        ]));
        assert_eq!(set.workloads.keys().collect::<Vec<_>>(), vec!["one", "two"]);
        assert!(set.protected.contains("broken"));
        assert!(set.broken_files.contains("d.yaml"));
        assert_eq!(set.error_count(), 2);
        assert!(
            set.files[1].errors[0].starts_with("b.yaml:7: spec.replicas:"),
            "{:?}",
            set.files[1]
        );
        assert!(set.files[2].notes[0].contains("ConfigMap"));
    }

    #[test]
    fn duplicates_are_all_skipped_and_protected() {
        let set = assemble(files(&[
            ("a.yaml", w("dup")),
            ("b.yaml", w("dup")),
            ("c.yaml", w("ok")),
        ]));
        assert_eq!(set.workloads.keys().collect::<Vec<_>>(), vec!["ok"]);
        assert!(set.protected.contains("dup"));
        assert_eq!(set.error_count(), 2);
    }
}
