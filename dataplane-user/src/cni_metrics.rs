//! CNI operation latencies. The plugin is a short-lived process, so it cannot be scraped:
//! after each operation it sends one datagram — `{"command":"ADD","code":0,"seconds":0.042}`
//! (code 0: success, else the CNI error code it returned) — to the node's agent over a unix
//! datagram socket, and the agent counts it in the histogram
//! `dataplane_cni_operation_duration_seconds{command,result}` of its `/metrics`.
//!
//! Best effort on the plugin's side: the send is non-blocking and every failure (no agent,
//! no socket, a full queue) is ignored, so it never slows or fails a CNI operation. The
//! socket (default [`DEFAULT_SOCKET`]; the plugin's `metrics_socket` config key, the agent's
//! `--cni-metrics-socket`) is made by the agent, mode 0600: only root can send.

use std::{
    os::unix::{fs::FileTypeExt as _, fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Where the agent listens unless told otherwise (a hostPath shared with the host, where the
/// runtime runs the plugin).
pub const DEFAULT_SOCKET: &str = "/var/run/dataplane/cni-metrics.sock";

/// Commands counted under their own name; anything else is `other`.
const COMMANDS: [&str; 6] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"];

/// One CNI operation, as the plugin reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub command: String,
    /// 0 on success, else the CNI error code returned.
    pub code: u32,
    pub seconds: f64,
}

impl Record {
    /// The histogram's labels for this record: (command, result), where result is `ok` or
    /// the error code. `None` for a record that makes no sense (negative or absurd time).
    pub fn labels(&self) -> Option<(&'static str, String)> {
        if !self.seconds.is_finite() || !(0.0..=86_400.0).contains(&self.seconds) {
            return None;
        }
        let command = COMMANDS
            .iter()
            .find(|c| **c == self.command)
            .copied()
            .unwrap_or("other");
        let result = if self.code == 0 {
            "ok".to_owned()
        } else {
            self.code.to_string()
        };
        Some((command, result))
    }
}

/// Sends `record` to the agent at `socket` without waiting; any failure is ignored (the
/// operation's outcome never depends on the agent).
pub fn send(socket: &Path, record: &Record) {
    let Ok(bytes) = serde_json::to_vec(record) else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| {
        s.set_nonblocking(true)?;
        s.send_to(&bytes, socket)
    });
    if let Err(e) = sent {
        // Not on stdout/stderr: the runtime reads those. Nothing to do about it anyway.
        debug!(socket = %socket.display(), error = %e, "CNI latency record not sent");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("CNI metrics socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI metrics socket {0} exists and is not a socket: remove it or pick another path")]
    NotSocket(PathBuf),
}

/// Binds the agent's socket at `path` (replacing a stale socket an earlier agent left, never
/// another kind of file) and returns the task that counts what arrives into `metrics`.
pub fn listen(
    path: &Path,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<tokio::task::JoinHandle<()>, ListenError> {
    let io = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(ListenError::NotSocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let socket = tokio::net::UnixDatagram::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    info!(socket = %path.display(), "receiving CNI latency records");
    let shown = path.display().to_string();
    Ok(tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let n = match socket.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(socket = %shown, error = %e, "CNI metrics socket");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match serde_json::from_slice::<Record>(&buf[..n])
                .ok()
                .and_then(|r| Some((r.labels()?, r.seconds)))
            {
                Some(((command, result), secs)) => metrics.cni_operation(command, result, secs),
                None => debug!(bytes = n, "ignoring a datagram that is not a CNI record"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_known_commands_and_error_codes() {
        let r = |command: &str, code, seconds| Record {
            command: command.to_owned(),
            code,
            seconds,
        };
        assert_eq!(r("ADD", 0, 0.1).labels(), Some(("ADD", "ok".to_owned())));
        assert_eq!(r("DEL", 11, 0.1).labels(), Some(("DEL", "11".to_owned())));
        assert_eq!(r("FOO", 0, 0.1).labels(), Some(("other", "ok".to_owned())));
        assert_eq!(r("ADD", 0, -1.0).labels(), None);
        assert_eq!(r("ADD", 0, f64::NAN).labels(), None);
    }

    #[tokio::test]
    async fn records_reach_the_histogram_and_sending_without_an_agent_is_harmless() {
        let dir = std::env::temp_dir().join(format!(
            "dp-cni-metrics-{}-{}",
            std::process::id(),
            crate::datastore::random_u64()
        ));
        let path = dir.join("s.sock");
        // Nobody listens: nothing happens, fast.
        let t = std::time::Instant::now();
        send(
            &path,
            &Record {
                command: "ADD".into(),
                code: 0,
                seconds: 0.5,
            },
        );
        assert!(t.elapsed() < Duration::from_millis(100));
        let health = Arc::new(crate::health::Health::new(true, Duration::from_secs(30)));
        let metrics = Arc::new(crate::metrics::Metrics::new(
            Path::new("/nonexistent"),
            health,
        ));
        let task = listen(&path, metrics.clone()).unwrap();
        send(
            &path,
            &Record {
                command: "ADD".into(),
                code: 0,
                seconds: 0.02,
            },
        );
        send(
            &path,
            &Record {
                command: "DEL".into(),
                code: 11,
                seconds: 0.5,
            },
        );
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"junk", &path)
            .unwrap();
        let want = [
            "dataplane_cni_operation_duration_seconds_count{command=\"ADD\",result=\"ok\"} 1",
            "dataplane_cni_operation_duration_seconds_count{command=\"DEL\",result=\"11\"} 1",
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = metrics.encode().unwrap();
            if want.iter().all(|w| text.lines().any(|l| l == *w)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A restart replaces the stale socket; a regular file is never removed.
        task.abort();
        let _aborted = task.await;
        drop(listen(&path, metrics.clone()).unwrap());
        let file = dir.join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            listen(&file, metrics),
            Err(ListenError::NotSocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
