//! One parser and one validator for Workload documents, shared by the node API, the Git source
//! and the Kubernetes side. Errors carry the field path (and, for YAML, the line).

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

use crate::quantity::Quantity;
use crate::spec::{Workload, API_VERSION, KIND_WORKLOAD};

/// Largest manifest file accepted (bytes). Manifests come from outside: cap before parsing.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Longest `spec.terminationGracePeriodSeconds` accepted: a stop (update, delete, node
/// shutdown) waits this long at most before SIGKILL, so an unbounded value could hold a
/// rollout or a node drain forever.
pub const MAX_TERMINATION_GRACE_PERIOD_SECONDS: u32 = 3600;
pub use crate::key::{MAX_NAMESPACE_LEN, MAX_NAME_LEN};

#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `spec.resources.memory`.
    pub field: String,
    pub message: String,
    /// 1-based line in the source document, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// A machine-readable reason when a node refuses an otherwise valid workload
    /// (`InsufficientMemory`, see [`crate::refusal`]); clients keep unknown ones as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "{line}: ")?;
        }
        write!(f, "{}: ", self.field)?;
        if let Some(reason) = &self.reason {
            write!(f, "{reason}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
        line: None,
        reason: None,
    }
}

/// A DNS-1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (what Kubernetes allows as an object name): dot-separated DNS
/// labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.split('.').all(is_dns_label)
}

/// Semantic checks that the type system cannot express. Returns every problem, not just the first.
pub fn validate_workload(w: &Workload) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if w.api_version != API_VERSION {
        errors.push(err(
            "apiVersion",
            format!("must be {API_VERSION}, got {:?}", w.api_version),
        ));
    }
    if w.kind != KIND_WORKLOAD {
        errors.push(err(
            "kind",
            format!("must be {KIND_WORKLOAD}, got {:?}", w.kind),
        ));
    }
    let name = &w.metadata.name;
    if !is_dns_subdomain(name) {
        errors.push(err(
            "metadata.name",
            format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most {MAX_NAME_LEN} characters, each dot-separated part starting and ending with a letter or digit)"),
        ));
    }
    if let Some(ns) = &w.metadata.namespace {
        if !is_dns_label(ns) {
            errors.push(err(
                "metadata.namespace",
                format!("{ns:?} is not a valid namespace (lowercase letters, digits and '-', at most {MAX_NAMESPACE_LEN} characters, starting and ending with a letter or digit)"),
            ));
        }
    }
    let s = &w.spec;
    if s.image.trim().is_empty() {
        errors.push(err("spec.image", "must not be empty"));
    } else if let Err(e) = crate::reference::ImageRef::parse(&s.image) {
        errors.push(err("spec.image", e));
    }
    if s.replicas > 64 {
        errors.push(err("spec.replicas", "at most 64 replicas per node"));
    }
    for (i, e) in s.env.iter().enumerate() {
        if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
            errors.push(err(
                format!("spec.env[{i}].name"),
                format!("{:?} is not a valid variable name", e.name),
            ));
        }
        if e.value.contains('\0') {
            errors.push(err(format!("spec.env[{i}].value"), "must not contain NUL"));
        }
    }
    if let Some(wd) = &s.working_dir {
        if !wd.starts_with('/') {
            errors.push(err("spec.workingDir", "must be an absolute path"));
        }
    }
    if let Some(user) = &s.user {
        if user.is_empty() || user.contains('\0') || user.split(':').count() > 2 {
            errors.push(err("spec.user", "must be uid[:gid] or a user name"));
        }
    }
    if let Some(m) = &s.resources.memory {
        match m.value() {
            Ok(b) if b < 4 << 20 => errors.push(err(
                "spec.resources.memory",
                "must be at least 4Mi (the runtime itself needs some)",
            )),
            Ok(_) => {}
            Err(e) => errors.push(err("spec.resources.memory", e)),
        }
    }
    if let Some(c) = &s.resources.cpu {
        match c.value() {
            Ok(0) => errors.push(err("spec.resources.cpu", "must be more than 0")),
            Ok(_) => {}
            Err(e) => errors.push(err("spec.resources.cpu", e)),
        }
    }
    if let Some(p) = s.resources.pids {
        if p < 1 {
            errors.push(err("spec.resources.pids", "must be at least 1"));
        }
    }
    if let Some(ru) = &s.strategy.rolling_update {
        if s.strategy.kind == crate::StrategyType::Recreate {
            errors.push(err(
                "spec.strategy.rollingUpdate",
                "may not be set when strategy.type is Recreate",
            ));
        }
        let mut zero = [false, false];
        for (k, (field, v)) in [
            (
                "spec.strategy.rollingUpdate.maxUnavailable",
                &ru.max_unavailable,
            ),
            ("spec.strategy.rollingUpdate.maxSurge", &ru.max_surge),
        ]
        .into_iter()
        .enumerate()
        {
            match v {
                Some(crate::IntOrPercent::Int(n)) => zero[k] = *n == 0,
                Some(crate::IntOrPercent::Percent(p)) => {
                    match p.strip_suffix('%').and_then(|n| n.parse::<u32>().ok()) {
                        Some(n) if n <= 100 => zero[k] = n == 0,
                        _ => errors.push(err(
                            field,
                            format!("{p:?} must be a count or a percentage from 0% to 100%"),
                        )),
                    }
                }
                None => {}
            }
        }
        if zero == [true, true] {
            errors.push(err(
                "spec.strategy.rollingUpdate.maxUnavailable",
                "may not be 0 when maxSurge is 0 (the rollout could never proceed)",
            ));
        }
    }
    if s.progress_deadline_seconds == Some(0) {
        errors.push(err("spec.progressDeadlineSeconds", "must be at least 1"));
    }
    // A request must parse and may not exceed its limit.
    fn check_request<U: crate::quantity::Unit>(
        errors: &mut Vec<FieldError>,
        what: &str,
        request: &Option<Quantity<U>>,
        limit: &Option<Quantity<U>>,
    ) {
        let Some(r) = request else {
            return;
        };
        let field = format!("spec.resources.requests.{what}");
        match r.value() {
            Ok(v) => {
                if let Some(l) = limit.as_ref().filter(|l| l.value().is_ok_and(|l| v > l)) {
                    errors.push(err(field, format!("{r} is more than the {what} limit {l}")));
                }
            }
            Err(e) => errors.push(err(field, e)),
        }
    }
    check_request(
        &mut errors,
        "memory",
        &s.resources.requests.memory,
        &s.resources.memory,
    );
    check_request(
        &mut errors,
        "cpu",
        &s.resources.requests.cpu,
        &s.resources.cpu,
    );
    let mut volume_names = BTreeSet::new();
    for (i, v) in s.volumes.iter().enumerate() {
        let at = format!("spec.volumes[{i}]");
        if !is_dns_label(&v.name) {
            errors.push(err(
                format!("{at}.name"),
                format!("{:?} is not a valid name", v.name),
            ));
        }
        if !volume_names.insert(v.name.as_str()) {
            errors.push(err(
                format!("{at}.name"),
                format!("duplicate volume {:?}", v.name),
            ));
        }
        match (&v.host_path, &v.empty_dir) {
            (Some(h), None) => {
                if !h.path.starts_with('/') || h.path.split('/').any(|c| c == "..") {
                    errors.push(err(
                        format!("{at}.hostPath.path"),
                        "must be an absolute path without '..'",
                    ));
                }
            }
            (None, Some(_)) => {}
            _ => errors.push(err(
                at.clone(),
                "exactly one of hostPath or emptyDir must be set",
            )),
        }
    }
    let mut mount_paths = BTreeSet::new();
    for (i, m) in s.mounts.iter().enumerate() {
        let at = format!("spec.mounts[{i}]");
        if !volume_names.contains(m.name.as_str()) {
            errors.push(err(
                format!("{at}.name"),
                format!("no volume named {:?} in spec.volumes", m.name),
            ));
        }
        if !m.mount_path.starts_with('/')
            || m.mount_path == "/"
            || m.mount_path.split('/').any(|c| c == "..")
        {
            errors.push(err(
                format!("{at}.mountPath"),
                "must be an absolute path other than / and without '..'",
            ));
        }
        if !mount_paths.insert(m.mount_path.as_str()) {
            errors.push(err(
                format!("{at}.mountPath"),
                format!("{:?} is mounted twice", m.mount_path),
            ));
        }
    }
    if let Some(g) = s.termination_grace_period_seconds {
        if g > MAX_TERMINATION_GRACE_PERIOD_SECONDS {
            errors.push(err(
                "spec.terminationGracePeriodSeconds",
                format!(
                    "must be at most {MAX_TERMINATION_GRACE_PERIOD_SECONDS} (one hour), got {g}"
                ),
            ));
        }
    }
    if let Some(p) = &s.readiness_probe {
        let at = "spec.readinessProbe";
        match (&p.exec, &p.http_get) {
            (Some(e), None) => {
                if e.command.is_empty() {
                    errors.push(err(format!("{at}.exec.command"), "must not be empty"));
                }
            }
            (None, Some(h)) => {
                if h.port == 0 {
                    errors.push(err(format!("{at}.httpGet.port"), "must be 1-65535"));
                }
                if !h.path.starts_with('/') {
                    errors.push(err(format!("{at}.httpGet.path"), "must start with '/'"));
                }
            }
            _ => errors.push(err(at, "exactly one of exec or httpGet must be set")),
        }
        for (field, v) in [
            ("periodSeconds", p.period_seconds),
            ("timeoutSeconds", p.timeout_seconds),
        ] {
            if let Some(v) = v {
                if !(0.01..=3600.0).contains(&v) {
                    errors.push(err(
                        format!("{at}.{field}"),
                        "must be between 0.01 and 3600",
                    ));
                }
            }
        }
    }
    errors
}

/// A problem with one document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    /// 0-based index of the document in its file.
    pub document: usize,
    pub errors: Vec<FieldError>,
}

/// What one YAML document turned out to be.
#[derive(Debug)]
pub enum ParsedDocument {
    Workload(Box<Workload>),
    /// A document of another kind (a ConfigMap next to our workloads, say): not ours, skipped.
    OtherKind {
        api_version: String,
        kind: String,
    },
    /// A Workload document that failed validation; its key (see [`crate::key`]) when its
    /// name could still be read (so a source can keep the previously applied version of
    /// exactly that workload).
    Invalid {
        key: Option<String>,
        errors: Vec<FieldError>,
    },
    /// The YAML stream is broken here: this document and any after it cannot be read.
    Unreadable(FieldError),
}

/// Parse a (possibly multi-document) YAML stream of Workloads. Each document is parsed and
/// validated on its own so one bad document does not hide the others.
pub fn parse_documents(text: &str) -> Result<Vec<ParsedDocument>, FieldError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(err(
            "",
            format!(
                "file is {} bytes, larger than the {} byte limit",
                text.len(),
                MAX_MANIFEST_BYTES
            ),
        ));
    }
    let starts = document_start_lines(text);
    let mut out = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let base_line = starts.get(index).copied().unwrap_or(1);
        // Parse to a generic value first: it tells us the kind, and it is where syntax and
        // alias-expansion errors surface (serde_norway caps alias expansion).
        let value = match serde_norway::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map(|l| l.line());
                out.push(ParsedDocument::Unreadable(FieldError {
                    field: String::new(),
                    message: format!("invalid yaml: {}", strip_location(&e.to_string())),
                    line,
                    reason: None,
                }));
                // After a syntax error the stream cannot be resynchronised reliably.
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if kind != KIND_WORKLOAD || !api_version.starts_with("hyperbox.dev/") {
            out.push(ParsedDocument::OtherKind { api_version, kind });
            continue;
        }
        let meta = value.get("metadata");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or(crate::key::DEFAULT_NAMESPACE);
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(|n| crate::key::workload_key(namespace, n));
        match serde_path_to_error::deserialize::<_, Workload>(value) {
            Ok(w) => {
                let errors = validate_workload(&w);
                if errors.is_empty() {
                    out.push(ParsedDocument::Workload(Box::new(w)));
                } else {
                    let errors = errors
                        .into_iter()
                        .map(|mut e| {
                            e.line = Some(find_field_line(text, base_line, &e.field));
                            e
                        })
                        .collect();
                    out.push(ParsedDocument::Invalid { key: name, errors });
                }
            }
            Err(e) => {
                let field = clean_path(&e.path().to_string());
                let message = strip_location(&e.into_inner().to_string());
                let line = Some(find_field_line(text, base_line, &field));
                out.push(ParsedDocument::Invalid {
                    key: name,
                    errors: vec![FieldError {
                        field,
                        message,
                        line,
                        reason: None,
                    }],
                });
            }
        }
    }
    Ok(out)
}

/// Parse a JSON workload (the node API body) and validate it.
pub fn parse_json_workload(value: serde_json::Value) -> Result<Workload, Vec<FieldError>> {
    let w: Workload = serde_path_to_error::deserialize(value).map_err(|e| {
        vec![FieldError {
            field: clean_path(&e.path().to_string()),
            message: e.into_inner().to_string(),
            line: None,
            reason: None,
        }]
    })?;
    let errors = validate_workload(&w);
    if errors.is_empty() {
        Ok(w)
    } else {
        Err(errors)
    }
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// serde_path_to_error renders the document root as `.`.
fn clean_path(path: &str) -> String {
    if path == "." {
        String::new()
    } else {
        path.to_string()
    }
}

/// 1-based line where each YAML document of the stream starts.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    let mut first_content_seen = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            if first_content_seen {
                starts.push(i + 2);
            } else {
                starts[0] = i + 2;
            }
            first_content_seen = true;
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            first_content_seen = true;
        }
    }
    starts
}

/// Best-effort line of a dotted field path inside the document starting at `base_line`:
/// follows the keys by indentation. Falls back to the document's first line.
fn find_field_line(text: &str, base_line: usize, field: &str) -> usize {
    let keys: Vec<&str> = field
        .split('.')
        .filter(|k| !k.is_empty())
        .map(|k| k.split('[').next().unwrap_or(k))
        .collect();
    let mut line_no = base_line;
    let mut min_indent = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    let mut idx = base_line.saturating_sub(1);
    for key in keys {
        let mut found = false;
        while idx < lines.len() {
            let l = lines[idx];
            if l.starts_with("---") && idx + 1 > base_line {
                return line_no;
            }
            let trimmed = l.trim_start().trim_start_matches("- ");
            let indent = l.len() - trimmed.len();
            if indent >= min_indent
                && (trimmed.starts_with(&format!("{key}:"))
                    || trimmed.starts_with(&format!("\"{key}\":")))
            {
                line_no = idx + 1;
                min_indent = indent + 1;
                found = true;
                idx += 1;
                break;
            }
            idx += 1;
        }
        if !found {
            break;
        }
    }
    line_no
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: registry.local/busybox:1\n  resources:\n    memory: 64Mi\n";

    fn named(namespace: Option<&str>, name: &str) -> Vec<FieldError> {
        let mut w: Workload = serde_norway::from_str(GOOD).unwrap();
        w.metadata.name = name.to_string();
        w.metadata.namespace = namespace.map(str::to_string);
        validate_workload(&w)
    }

    #[test]
    fn names_are_dns_subdomains_and_namespaces_dns_labels() {
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long.len(), 253);
        assert!(named(None, &long).is_empty());
        assert!(named(Some("team-a"), "web.v2").is_empty());
        assert!(named(Some("default"), "web").is_empty());
        for bad in [
            format!("{long}e"),
            "Web".into(),
            "a..b".into(),
            "-a".into(),
            "a_b".into(),
            "a/b".into(),
            "x".repeat(64),
        ] {
            let errs = named(None, &bad);
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs[0].field, "metadata.name");
        }
        for bad in ["Team", "a.b", "", "a/b", &"n".repeat(64)] {
            let errs = named(Some(bad), "web");
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs[0].field, "metadata.namespace");
        }
    }

    #[test]
    fn good_document_parses() {
        let docs = parse_documents(GOOD).unwrap();
        assert!(
            matches!(&docs[0], ParsedDocument::Workload(w) if w.metadata.name == "web" && w.spec.replicas == 1)
        );
    }

    #[test]
    fn strategies_requests_and_deadlines_are_checked() {
        let errors_of = |extra: &str| -> Vec<(String, String)> {
            let text = format!("{GOOD}{extra}");
            match &parse_documents(&text).unwrap()[0] {
                ParsedDocument::Workload(_) => vec![],
                ParsedDocument::Invalid { errors, .. } => errors
                    .iter()
                    .map(|e| (e.field.clone(), e.message.clone()))
                    .collect(),
                other => panic!("{other:?}"),
            }
        };
        for ok in [
            "  strategy: {type: Recreate}\n",
            "  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}\n",
            "  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: '50%'}}\n",
            "  progressDeadlineSeconds: 30\n",
            "    requests: {memory: 32Mi, cpu: 100m}\n",
        ] {
            assert_eq!(errors_of(ok), vec![], "{ok}");
        }
        let bad = [
            (
                "  strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}\n",
                "spec.strategy.rollingUpdate",
                "Recreate",
            ),
            (
                "  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: '0%'}}\n",
                "spec.strategy.rollingUpdate.maxUnavailable",
                "may not be 0 when maxSurge is 0",
            ),
            (
                "  strategy: {rollingUpdate: {maxSurge: '150%'}}\n",
                "spec.strategy.rollingUpdate.maxSurge",
                "0% to 100%",
            ),
            (
                "  strategy: {type: BlueGreen}\n",
                "spec.strategy.type",
                "unknown variant",
            ),
            (
                "  progressDeadlineSeconds: 0\n",
                "spec.progressDeadlineSeconds",
                "at least 1",
            ),
            (
                "    requests: {memory: 128Mi}\n",
                "spec.resources.requests.memory",
                "more than the memory limit 64Mi",
            ),
            (
                "    requests: {cpu: lots}\n",
                "spec.resources.requests.cpu",
                "not a cpu quantity",
            ),
        ];
        for (extra, field, msg) in bad {
            let errs = errors_of(extra);
            assert!(
                errs.iter().any(|(f, m)| f == field && m.contains(msg)),
                "{extra}: {errs:?}"
            );
        }
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let text = GOOD.replace("    memory: 64Mi", "    memory: 64Mi\n    gpus: 2");
        let docs = parse_documents(&text).unwrap();
        let ParsedDocument::Invalid {
            key: name,
            errors: errs,
        } = &docs[0]
        else {
            panic!("expected invalid: {docs:?}")
        };
        assert_eq!(name.as_deref(), Some("web"));
        assert_eq!(errs[0].field, "spec.resources.gpus");
        assert!(errs[0].message.contains("unknown field `gpus`"), "{errs:?}");
        assert_eq!(errs[0].line, Some(9));
    }

    #[test]
    fn semantic_errors_all_reported_with_lines() {
        let text = format!(
            "{GOOD}---\napiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: Bad_Name\nspec:\n  image: x\n  resources:\n    memory: lots\n"
        );
        let docs = parse_documents(&text).unwrap();
        assert!(matches!(docs[0], ParsedDocument::Workload(_)));
        let ParsedDocument::Invalid { errors: errs, .. } = &docs[1] else {
            panic!("expected invalid")
        };
        let fields: Vec<_> = errs.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            vec![
                ("metadata.name", Some(13)),
                ("spec.resources.memory", Some(17))
            ]
        );
    }

    #[test]
    fn other_kinds_are_skipped_not_errors() {
        let docs =
            parse_documents("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").unwrap();
        assert!(matches!(&docs[0], ParsedDocument::OtherKind { kind, .. } if kind == "ConfigMap"));
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
        let mut prev = 'a';
        for c in 'b'..='m' {
            bomb.push_str(&format!(
                "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
            ));
            prev = c;
        }
        let docs = parse_documents(&bomb).unwrap();
        assert!(
            matches!(&docs[0], ParsedDocument::Unreadable(e) if e.message.contains("invalid yaml")),
            "{docs:?}"
        );
    }

    #[test]
    fn oversized_file_is_refused() {
        let big = "#".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(parse_documents(&big).unwrap_err().message.contains("limit"));
    }

    #[test]
    fn termination_grace_period_is_capped_at_an_hour() {
        let with = |secs: u64| format!("{GOOD}  terminationGracePeriodSeconds: {secs}\n");
        for ok in [0, 1, 3600] {
            let docs = parse_documents(&with(ok)).unwrap();
            assert!(
                matches!(docs[0], ParsedDocument::Workload(_)),
                "{ok}: {docs:?}"
            );
        }
        for bad in [3601, 86400, u32::MAX as u64] {
            let docs = parse_documents(&with(bad)).unwrap();
            let ParsedDocument::Invalid { errors: errs, .. } = &docs[0] else {
                panic!("{bad} must be refused: {docs:?}")
            };
            assert_eq!(errs[0].field, "spec.terminationGracePeriodSeconds");
            assert!(errs[0].message.contains("at most 3600"), "{errs:?}");
            assert_eq!(errs[0].line, Some(9));
        }
    }

    #[test]
    fn mounts_must_name_volumes() {
        let text = format!("{GOOD}  mounts:\n  - name: data\n    mountPath: /data\n");
        let docs = parse_documents(&text).unwrap();
        let ParsedDocument::Invalid { errors: errs, .. } = &docs[0] else {
            panic!("expected invalid")
        };
        assert_eq!(errs[0].field, "spec.mounts[0].name");
    }
}
