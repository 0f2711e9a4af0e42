//! Paths inside the synced tree, validated once for everyone.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest file name component, in bytes (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest path, in bytes (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; paths are relative to the mount")]
    Absolute(String),
    #[error("path {0:?} has an empty, '.' or '..' component")]
    BadComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("a component of {0:?} is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong(String),
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
}

/// A relative path inside the synced tree: components separated by `/`, none empty,
/// `.` or `..`, no NUL, each at most 255 bytes, the whole at most 4096 bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    pub fn new(s: impl Into<String>) -> Result<RelPath, PathError> {
        let s = s.into();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::PathTooLong);
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s));
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s));
        }
        for c in s.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(PathError::BadComponent(s));
            }
            if c.len() > MAX_NAME_BYTES {
                return Err(PathError::NameTooLong(s));
            }
        }
        Ok(RelPath(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The parent path, or None for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].to_string()))
    }
    /// The last component.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
    /// `self/name`, validated (as `RelPath::new` would; only `name` and the length are
    /// looked at, `self` being valid already: a walk of a large tree joins every path).
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        let joined = || format!("{}/{}", self.0, name);
        if self.0.len() + 1 + name.len() > MAX_PATH_BYTES {
            return Err(PathError::PathTooLong);
        }
        if name.contains('\0') {
            return Err(PathError::Nul(joined()));
        }
        for c in name.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(PathError::BadComponent(joined()));
            }
            if c.len() > MAX_NAME_BYTES {
                return Err(PathError::NameTooLong(joined()));
            }
        }
        let mut s = String::with_capacity(self.0.len() + 1 + name.len());
        s.push_str(&self.0);
        s.push('/');
        s.push_str(name);
        Ok(RelPath(s))
    }
    /// Whether `self` is `other` or lies below it.
    pub fn is_within(&self, other: &RelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes()[other.0.len()] == b'/')
    }
    /// Every proper ancestor, outermost first.
    pub fn ancestors(&self) -> Vec<RelPath> {
        let mut out = Vec::new();
        for (i, b) in self.0.bytes().enumerate() {
            if b == b'/' {
                out.push(RelPath(self.0[..i].to_string()));
            }
        }
        out
    }
}
impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::new(s)
    }
}
impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}
/// Paths order, hash and compare as their text, so maps keyed by paths can be searched
/// by text (a prefix range: everything below a directory).
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in ["a", "a/b", "über/naïve file.txt", "x/y/z/.hidden", "a..b"] {
            RelPath::new(p).unwrap();
        }
    }

    #[test]
    fn refuses_bad_paths() {
        assert_eq!(RelPath::new(""), Err(PathError::Empty));
        assert!(matches!(RelPath::new("/etc/passwd"), Err(PathError::Absolute(_))));
        for p in ["a//b", "a/", "../x", "a/../b", "./a", "a/."] {
            assert!(matches!(RelPath::new(p), Err(PathError::BadComponent(_))), "{p}");
        }
        assert!(matches!(RelPath::new("a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(RelPath::new("x".repeat(256)), Err(PathError::NameTooLong(_))));
        RelPath::new("x".repeat(255)).unwrap();
        let long = vec!["y".repeat(200); 21].join("/");
        assert_eq!(RelPath::new(long), Err(PathError::PathTooLong));
    }

    #[test]
    fn parent_name_ancestors() {
        let p = RelPath::new("a/b/c.txt").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.name(), "c.txt");
        let anc: Vec<_> = p.ancestors().into_iter().map(String::from).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert!(p.is_within(&RelPath::new("a").unwrap()));
        assert!(!RelPath::new("ab").unwrap().is_within(&RelPath::new("a").unwrap()));
        assert!(RelPath::new("top").unwrap().parent().is_none());
    }

    proptest! {
        #[test]
        fn never_panics_and_valid_paths_round_trip(s in ".{0,300}") {
            if let Ok(p) = RelPath::new(s.clone()) {
                let json = serde_json::to_string(&p).unwrap();
                let back: RelPath = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(back.as_str(), s.as_str());
            }
        }

        /// `join` looks at the name only; it must agree with validating the whole path.
        #[test]
        fn join_agrees_with_the_whole_path_validated(base in "[a-z]{1,8}(/[a-z.]{1,3}){0,3}", name in "[a-z./\\x00]{0,6}|x{250,260}", long_parts in 0usize..17) {
            let Ok(base) = RelPath::new(base) else { return Ok(()) };
            let base = (0..long_parts).fold(base, |p, _| p.join(&"l".repeat(250)).unwrap_or(p));
            prop_assert_eq!(base.join(&name), RelPath::new(format!("{}/{}", base.as_str(), name)));
        }
    }
}
