//! Errors of file system operations and the errno each one maps to.

/// Errors of file system operations; each maps to exactly one errno in `errno()`.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("file name too long")]
    NameTooLong,
    #[error("file name is not valid UTF-8 and cannot be synced")]
    BadName,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    AccessDenied,
    #[error("operation not supported")]
    NotSupported,
    #[error("bad file handle")]
    BadHandle,
    #[error("too many links")]
    TooManyLinks,
    #[error("no space left on the disk holding the node's data")]
    NoSpace,
    /// The node database could not grow (it shares the disk with the store).
    #[error("no space left for the node database")]
    DbFull,
    #[error("file too large for the disk holding the node's data")]
    TooBig,
    /// A file's content is not on this node (on demand) and no node holding it could
    /// be reached: `EHOSTUNREACH` ("No route to host"), never empty or wrong bytes.
    #[error("the content is on other nodes and none of them can be reached: {0:#}")]
    Unreachable(anyhow::Error),
    #[error("I/O error: {0:#}")]
    Io(anyhow::Error),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::BadName => libc::EILSEQ,
            FsError::Invalid => libc::EINVAL,
            FsError::NotPermitted => libc::EPERM,
            FsError::AccessDenied => libc::EACCES,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::BadHandle => libc::EBADF,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoSpace => libc::ENOSPC,
            FsError::DbFull => libc::ENOSPC,
            FsError::TooBig => libc::EFBIG,
            FsError::Unreachable(_) => libc::EHOSTUNREACH,
            FsError::Io(_) => libc::EIO,
        }
    }
}

/// Limits of the disk under the node's data (the store, the work files, the node
/// database) are the user's to see, not an I/O failure: the error of one of them, if
/// `e` is one.
fn disk_limit(e: &(dyn std::error::Error + 'static)) -> Option<FsError> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Some(FsError::NoSpace),
            Some(libc::EFBIG) => Some(FsError::TooBig),
            _ => None,
        };
    }
    match e.downcast_ref::<rusqlite::Error>() {
        Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull => Some(FsError::DbFull),
        _ => None,
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        disk_limit(&e).unwrap_or_else(|| FsError::Io(e.into()))
    }
}
impl From<rusqlite::Error> for FsError {
    fn from(e: rusqlite::Error) -> Self {
        disk_limit(&e).unwrap_or_else(|| FsError::Io(anyhow::Error::new(e).context("node database")))
    }
}
impl From<anyhow::Error> for FsError {
    fn from(e: anyhow::Error) -> Self {
        e.chain().find_map(disk_limit).unwrap_or(FsError::Io(e))
    }
}

pub type FsResult<T> = Result<T, FsError>;
