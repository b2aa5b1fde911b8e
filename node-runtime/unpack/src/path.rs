//! Normalization of entry paths and hardlink targets.

use std::ffi::{CStr, CString};

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathError {
    /// Absolute path or a `..` component.
    Escapes,
    /// An embedded NUL byte.
    Nul,
}

/// A path inside the image root, as a list of plain components (no empty,
/// `.` or `..` components, no NUL bytes). No components means the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CleanPath {
    comps: Vec<CString>,
}

impl CleanPath {
    /// Normalizes a raw archive path: leading `./` and empty / `.`
    /// components are dropped; a leading `/`, any `..` component or a NUL
    /// byte is refused (never clamped).
    pub(crate) fn parse(raw: &[u8]) -> Result<CleanPath, PathError> {
        if raw.contains(&0) {
            return Err(PathError::Nul);
        }
        if raw.first() == Some(&b'/') {
            return Err(PathError::Escapes);
        }
        let mut comps = Vec::new();
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err(PathError::Escapes),
                _ => comps.push(CString::new(comp).map_err(|_| PathError::Nul)?),
            }
        }
        Ok(CleanPath { comps })
    }

    pub(crate) fn is_root(&self) -> bool {
        self.comps.is_empty()
    }

    /// All components.
    pub(crate) fn components(&self) -> &[CString] {
        &self.comps
    }

    /// Components of the parent directory (empty for the root and for
    /// top-level entries).
    pub(crate) fn parent(&self) -> &[CString] {
        match self.comps.split_last() {
            Some((_, parent)) => parent,
            None => &[],
        }
    }

    /// Last component; `None` for the root.
    pub(crate) fn name(&self) -> Option<&CStr> {
        self.comps.last().map(CString::as_c_str)
    }

    /// The normalized path as `a/b/c` bytes (empty for the root).
    pub(crate) fn joined(&self) -> Vec<u8> {
        join(&self.comps)
    }
}

/// Joins components with `/`.
pub(crate) fn join(comps: &[CString]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, comp) in comps.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(comp.to_bytes());
    }
    out
}

/// Appends one component to a joined path.
pub(crate) fn child_of(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    out.extend_from_slice(dir);
    if !dir.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<u8>, PathError> {
        CleanPath::parse(s.as_bytes()).map(|p| p.joined())
    }

    #[test]
    fn normalizes_and_refuses() {
        assert_eq!(parse("./a/b/").unwrap(), b"a/b");
        assert_eq!(parse("a//./b").unwrap(), b"a/b");
        assert_eq!(parse("././a").unwrap(), b"a");
        assert_eq!(parse("./").unwrap(), b"");
        assert_eq!(parse(".").unwrap(), b"");
        assert_eq!(parse("..").unwrap_err(), PathError::Escapes);
        assert_eq!(parse("../etc/passwd").unwrap_err(), PathError::Escapes);
        assert_eq!(parse("a/../../b").unwrap_err(), PathError::Escapes);
        assert_eq!(parse("a/b/..").unwrap_err(), PathError::Escapes);
        assert_eq!(parse("/etc/passwd").unwrap_err(), PathError::Escapes);
        assert_eq!(
            CleanPath::parse(b"a\0b").unwrap_err(),
            PathError::Nul,
            "nul refused"
        );
        // Names that merely start with dots are fine.
        assert_eq!(parse("..a/...").unwrap(), b"..a/...");
    }

    #[test]
    fn parent_and_name() {
        let p = CleanPath::parse(b"a/b/c").unwrap();
        assert_eq!(join(p.parent()), b"a/b");
        assert_eq!(p.name().unwrap().to_bytes(), b"c");
        let root = CleanPath::parse(b"./").unwrap();
        assert!(root.is_root());
        assert!(root.name().is_none());
        assert_eq!(child_of(b"", b"x"), b"x");
        assert_eq!(child_of(b"a", b"x"), b"a/x");
    }
}
