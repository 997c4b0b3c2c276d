//! The agent's pin directory on bpffs: mounted when absent, created, and locked so that only
//! one agent owns it.

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("mount bpffs on {BPFFS_MOUNT}: {0}")]
    Mount(#[source] nix::Error),
    #[error("create pin directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("pin directory {0} is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)")]
    NotBpffs(PathBuf),
    #[error("pin directory {0} is in use by another agent")]
    Busy(PathBuf),
    #[error("lock pin directory {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("pin directory {path} is not writable: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field's type differs between libcs"
    )]
    Ok(st.filesystem_type().0 as i64)
}

/// Whether `path` (which must exist) lives on bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf if `dir` is below it and nothing is mounted there yet (bpffs is
/// not mounted at boot on every distribution).
fn ensure_mounted(dir: &Path) -> Result<(), BpffsError> {
    let mount = Path::new(BPFFS_MOUNT);
    if !dir.starts_with(mount) || is_bpffs(mount) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        mount,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(BpffsError::Mount)
}

/// An agent's pin root, held under an exclusive lock for as long as this value lives.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    // flock on the directory itself: bpffs holds no regular files, and the lock goes with the
    // process when it dies, so a crashed agent never leaves the directory locked.
    _lock: File,
}

impl PinDir {
    /// Prepares and locks `root`: mounts bpffs if needed, creates `root/maps` and
    /// `root/links`, and fails if another agent holds it.
    pub fn open(root: &Path) -> Result<Self, BpffsError> {
        ensure_mounted(root)?;
        let existed = root.exists();
        fs::create_dir_all(root).map_err(|source| BpffsError::Create {
            path: root.to_owned(),
            source,
        })?;
        if !is_bpffs(root) {
            if !existed {
                // Leave no trace of a wrong flag: the directory was ours, and is empty.
                if let Err(e) = fs::remove_dir(root) {
                    tracing::debug!(dir = %root.display(), error = %e, "remove the directory made for a wrong --bpffs-dir");
                }
            }
            return Err(BpffsError::NotBpffs(root.to_owned()));
        }
        let lock = File::open(root).map_err(|source| BpffsError::Lock {
            path: root.to_owned(),
            source,
        })?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                BpffsError::Busy(root.to_owned())
            } else {
                BpffsError::Lock {
                    path: root.to_owned(),
                    source: e,
                }
            });
        }
        let dir = Self {
            root: root.to_owned(),
            _lock: lock,
        };
        for sub in [dir.maps_dir(), dir.links_dir()] {
            fs::create_dir_all(&sub).map_err(|source| BpffsError::NotWritable {
                path: sub.clone(),
                source,
            })?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        maps_dir(&self.root)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
}

/// Where the maps of the agent rooted at `root` are pinned (readable without the lock).
pub fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}
