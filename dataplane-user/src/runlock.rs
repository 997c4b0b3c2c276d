//! The iptables-mode agent's lock: a BPF agent is known to run by the lock on its pin
//! directory; an iptables-mode agent has no pins, so it holds an exclusive `flock` on
//! `/var/run/dataplane/iptables-agent-netns-<inode>.lock` (the inode of its network
//! namespace: one per node, and distinct per node namespace when several run on one machine,
//! as in the tests). The kernel drops the lock when the process dies, however it dies, so a
//! stale file never blocks anything. `dataplane cleanup` refuses while the lock is held, and
//! a second iptables-mode agent in the same namespace is refused.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Where the lock lives (with the CNI plugin's IPAM lock; a hostPath in the DaemonSet).
pub const RUN_DIR: &str = "/var/run/dataplane";

#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    #[error(
        "an iptables-mode agent is running in this network namespace ({}, held by {}): stop it first",
        .path.display(),
        .pid.map_or_else(|| "another process".to_owned(), |p| format!("pid {p}"))
    )]
    Busy { path: PathBuf, pid: Option<u32> },
    #[error("iptables-mode agent lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The lock file of this network namespace's iptables-mode agent under `dir`.
pub fn lock_path(dir: &Path) -> Result<PathBuf, RunLockError> {
    let ns = Path::new("/proc/thread-self/ns/net");
    let ino = std::fs::metadata(ns)
        .map_err(|source| RunLockError::Io {
            path: ns.to_owned(),
            source,
        })?
        .ino();
    Ok(dir.join(format!("iptables-agent-netns-{ino}.lock")))
}

/// Held while the agent runs; the kernel releases it with the process.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
    pub path: PathBuf,
}

fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

fn open(path: &Path) -> Result<File, RunLockError> {
    let io = |source| RunLockError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)
}

fn holder(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Takes this namespace's lock under `dir` for an iptables-mode agent, writing its pid in
/// the file (for the messages); [`RunLockError::Busy`] when another process holds it.
pub fn acquire(dir: &Path) -> Result<AgentLock, RunLockError> {
    let path = lock_path(dir)?;
    let mut file = open(&path)?;
    let io = |source| RunLockError::Io {
        path: path.clone(),
        source,
    };
    if !try_flock(&file).map_err(io)? {
        return Err(RunLockError::Busy {
            pid: holder(&mut file),
            path,
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(AgentLock { _file: file, path })
}

/// Fails with [`RunLockError::Busy`] when an iptables-mode agent holds this namespace's
/// lock under `dir`. Takes and drops the lock to find out (nothing else changes; the file is
/// left for the next agent).
pub fn check_not_running(dir: &Path) -> Result<(), RunLockError> {
    let path = lock_path(dir)?;
    if !path.exists() {
        return Ok(());
    }
    let mut file = open(&path)?;
    let free = try_flock(&file).map_err(|source| RunLockError::Io {
        path: path.clone(),
        source,
    })?;
    if free {
        return Ok(());
    }
    Err(RunLockError::Busy {
        pid: holder(&mut file),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_busy_and_released_with_its_holder() {
        let dir = tempfile_dir();
        check_not_running(&dir).unwrap();
        let lock = acquire(&dir).unwrap();
        let e = check_not_running(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("stop it first"),
            "{msg}"
        );
        assert!(matches!(acquire(&dir), Err(RunLockError::Busy { .. })));
        drop(lock);
        check_not_running(&dir).unwrap();
        drop(acquire(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "dp-runlock-{}-{}",
            std::process::id(),
            crate::datastore::random_u64()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
