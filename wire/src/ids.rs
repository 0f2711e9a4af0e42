//! Identifier newtypes: node ids, message ids, revisions and content hashes.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("node id {0:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    NodeId(String),
    #[error("message id {0:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 -")]
    MessageId(String),
    #[error("content hash {0:?} is invalid: expected 64 lowercase hex digits (BLAKE3)")]
    Hash(String),
}

fn id_chars(s: &str, extra: &[char]) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// A node's name, chosen by whoever starts the node. Also used in queue names and routing keys.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// The sender id the manager uses for messages it originates.
    pub fn manager() -> NodeId {
        NodeId("manager".into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        if id_chars(&s, &['.', '_', '-']) {
            Ok(NodeId(s))
        } else {
            Err(IdError::NodeId(s))
        }
    }
}
impl std::str::FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        NodeId::try_from(s.to_string())
    }
}
impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message's unique id, chosen by its sender; the manager applies each id once.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(String);

impl MessageId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for MessageId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        if id_chars(&s, &['-']) {
            Ok(MessageId(s))
        } else {
            Err(IdError::MessageId(s))
        }
    }
}
impl std::str::FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        MessageId::try_from(s.to_string())
    }
}
impl From<MessageId> for String {
    fn from(n: MessageId) -> String {
        n.0
    }
}
impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A position in the manager's total order of accepted changes. Assigned only by the
/// manager; 0 means "never seen by the manager".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl Revision {
    pub const NONE: Revision = Revision(0);
    pub fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}
impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// BLAKE3 hash of a file's bytes: 32 bytes in memory (a node keeps one per file, so
/// no heap string), 64 lowercase hex digits on the wire and in databases.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    pub fn from_bytes(bytes: [u8; 32]) -> ContentHash {
        ContentHash(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The 64 hex digits, without a heap allocation.
    pub fn to_hex(&self) -> HexHash {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            s[2 * i] = HEX[(b >> 4) as usize];
            s[2 * i + 1] = HEX[(b & 15) as usize];
        }
        HexHash(s)
    }
}

/// A hash as its 64 hex digits (`ContentHash::to_hex`).
#[derive(Clone, Copy)]
pub struct HexHash([u8; 64]);

impl HexHash {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}
impl std::ops::Deref for HexHash {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}
impl AsRef<std::path::Path> for HexHash {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(self.as_str())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex().as_str())
    }
}
impl TryFrom<String> for ContentHash {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}
impl std::str::FromStr for ContentHash {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let b = s.as_bytes();
        let mut out = [0u8; 32];
        if b.len() != 64 {
            return Err(IdError::Hash(s.to_string()));
        }
        for (i, o) in out.iter_mut().enumerate() {
            match (digit(b[2 * i]), digit(b[2 * i + 1])) {
                (Some(h), Some(l)) => *o = h << 4 | l,
                _ => return Err(IdError::Hash(s.to_string())),
            }
        }
        Ok(ContentHash(out))
    }
}
impl From<ContentHash> for String {
    fn from(n: ContentHash) -> String {
        n.to_hex().as_str().to_string()
    }
}
impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_hex().as_str())
    }
}
