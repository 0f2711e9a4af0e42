//! The node image: packs `container/Dockerfile` and a root file system made by
//! `container/build-rootfs.sh` into a tar build context in memory and builds it through
//! the Docker API. FROM scratch: no registry is ever contacted.

use super::docker::Docker;
use super::{Error, Result};
use bollard::query_parameters::BuildImageOptionsBuilder;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};

/// The Dockerfile, compiled in so that the manager and the context always agree.
pub const DOCKERFILE: &str = include_str!("../../../container/Dockerfile");
/// Marker file `build-rootfs.sh` leaves in every root file system it makes.
pub const ROOTFS_MARKER: &str = ".syncfs-rootfs";
/// Binaries the root file system must hold, relative to its top.
pub const REQUIRED_FILES: [&str; 2] = ["usr/local/bin/fs-node", "usr/local/bin/syncctl"];
/// Default root file system, relative to the working directory (the repository).
pub const DEFAULT_ROOTFS: &str = "container/rootfs";

/// What `build_image` produced.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub tag: String,
    pub id: String,
    /// Size of the build context sent to the daemon, in bytes.
    pub context_bytes: usize,
}

/// Checks the root file system and packs it with the Dockerfile into a tar archive
/// (`Dockerfile` + `rootfs/...`). Blocking: call it off the async runtime.
pub fn build_context(rootfs: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::Rootfs { path: rootfs.display().to_string(), reason };
    if !rootfs.is_dir() {
        return Err(bad("not a directory".into()));
    }
    for f in REQUIRED_FILES {
        if !rootfs.join(f).is_file() {
            return Err(bad(format!("{f} is missing")));
        }
    }
    let io = |what: String| move |source| Error::Io { what, source };
    let mut tar = tar::Builder::new(Vec::new());
    // Keep symlinks as links: the loader and libraries are copied dereferenced anyway.
    tar.follow_symlinks(false);
    // dockerd 20.10 rejects GNU sparse entries ("unhandled tar header type 83"), and
    // copied binaries are often sparse on disk.
    tar.sparse(false);
    let mut header = tar::Header::new_gnu();
    header.set_size(DOCKERFILE.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", DOCKERFILE.as_bytes()).map_err(io("packing the Dockerfile".into()))?;
    tar.append_dir_all("rootfs", rootfs).map_err(io(format!("packing {}", rootfs.display())))?;
    tar.into_inner().map_err(io("finishing the build context".into()))
}

impl Docker {
    /// Builds the node image from `rootfs` and tags it `tag` (normally [`super::image_tag`]).
    pub async fn build_image(&self, rootfs: &Path, tag: &str) -> Result<BuiltImage> {
        let dir: PathBuf = rootfs.to_path_buf();
        let context = tokio::task::spawn_blocking(move || build_context(&dir))
            .await
            .map_err(|e| Error::Io { what: "packing the build context".into(), source: std::io::Error::other(e) })??;
        let context_bytes = context.len();
        let options = BuildImageOptionsBuilder::default().dockerfile("Dockerfile").t(tag).rm(true).forcerm(true).build();
        let mut stream = self.api().build_image(options, None, Some(bollard::body_full(context.into())));
        let mut id = None;
        let mut last_lines: Vec<String> = Vec::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|source| match source {
                bollard::errors::Error::DockerStreamError { error } => Error::ImageBuild { tag: tag.into(), message: error },
                source => Error::Docker { op: format!("build image {tag}"), source },
            })?;
            if let Some(detail) = info.error_detail {
                let message = detail.message.unwrap_or_else(|| "unknown error".into());
                return Err(Error::ImageBuild { tag: tag.into(), message });
            }
            if let Some(line) = info.stream {
                let line = line.trim_end().to_string();
                if !line.is_empty() {
                    tracing::debug!(%line, "docker build");
                    last_lines.push(line);
                }
            }
            if let Some(aux) = info.aux.and_then(|a| a.id) {
                id = Some(aux);
            }
        }
        // Older daemons report the id only as "Successfully built <id>".
        let id = id.or_else(|| last_lines.iter().rev().find_map(|l| l.strip_prefix("Successfully built ").map(str::to_string)));
        let id = match id {
            Some(id) => id,
            None => self.image_id(tag).await?.ok_or_else(|| Error::ImageMissing { tag: tag.into() })?,
        };
        Ok(BuiltImage { tag: tag.into(), id, context_bytes })
    }

    /// The id of image `tag`, or `None` if the daemon does not have it.
    pub async fn image_id(&self, tag: &str) -> Result<Option<String>> {
        match self.api().inspect_image(tag).await {
            Ok(img) => Ok(img.id),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(Error::Docker { op: format!("inspect image {tag}"), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rootfs under `dir` holding every required file, each made by `make`.
    fn fake_rootfs(dir: &Path, make: impl Fn(&Path)) -> PathBuf {
        let root = dir.join("rootfs");
        std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
        for f in REQUIRED_FILES {
            make(&root.join(f));
        }
        root
    }

    #[test]
    fn context_holds_dockerfile_and_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = fake_rootfs(dir.path(), |p| std::fs::write(p, b"bin").unwrap());
        let bytes = build_context(&root).unwrap();
        let mut names: Vec<String> = tar::Archive::new(&bytes[..]).entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        names.sort();
        assert!(names.contains(&"Dockerfile".to_string()));
        assert!(names.contains(&"rootfs/usr/local/bin/fs-node".to_string()), "{names:?}");
    }

    /// Regression: a sparse binary was packed as a GNU sparse entry, which dockerd 20.10
    /// refused with "unhandled tar header type 83".
    #[test]
    fn sparse_files_are_packed_as_regular_entries() {
        let dir = tempfile::tempdir().unwrap();
        // Files that are one hole, no data blocks.
        let root = fake_rootfs(dir.path(), |p| std::fs::File::create(p).unwrap().set_len(4 << 20).unwrap());
        let bytes = build_context(&root).unwrap();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            let t = e.header().entry_type();
            assert!(t.is_file() || t.is_dir() || t.is_symlink(), "{:?} packed as {t:?}", e.path().unwrap());
        }
    }

    #[test]
    fn missing_binaries_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = build_context(dir.path()).unwrap_err().to_string();
        assert!(err.contains("usr/local/bin/fs-node is missing"), "{err}");
        assert!(err.contains("build-rootfs.sh"), "{err}");
    }

    #[test]
    fn dockerfile_is_from_scratch() {
        assert!(DOCKERFILE.lines().any(|l| l.trim() == "FROM scratch"));
    }
}
