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

/// BLAKE3 hash of a file's bytes, as 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContentHash(String);

impl ContentHash {
    pub fn from_bytes(bytes: [u8; 32]) -> ContentHash {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in bytes {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        ContentHash(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for ContentHash {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(ContentHash(s))
        } else {
            Err(IdError::Hash(s))
        }
    }
}
impl std::str::FromStr for ContentHash {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        ContentHash::try_from(s.to_string())
    }
}
impl From<ContentHash> for String {
    fn from(n: ContentHash) -> String {
        n.0
    }
}
impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
