//! A real container runtime on a node of the cluster in a box: Debian's containerd (with its
//! CRI plugin) and runc, started with a private config (root, state, sockets and CNI dirs
//! under a temp dir) inside the node's network namespace, plus a tiny OCI image built here
//! from busybox-static. Torn down by a guard even when the test panics: sandboxes removed
//! through the runtime, containerd stopped by pid, leftover shims killed by the pids they
//! wrote, mounts under the private dir detached, the pods' cgroup parent removed.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::{
    cluster::Node,
    cri::CriClient,
    netns::{ChildGuard, output},
};

/// Debian's busybox-static, the only binary of the image.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets the image links to busybox.
const APPLETS: &[&str] = &[
    "sh", "sleep", "httpd", "wget", "ip", "ping", "cat", "ls", "hostname", "nc", "true",
];

/// The file the image's web server serves at `/`.
pub const INDEX_HTML: &str = "hello from a dataplane pod\n";

/// Fails loudly when the runtime is missing: `cargo xtask setup` installs it, and a silent
/// skip would hide that the test never ran.
pub fn require_runtime() {
    for bin in [
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
        BUSYBOX,
    ] {
        let found = if bin.starts_with('/') {
            Path::new(bin).is_file()
        } else {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        };
        assert!(
            found,
            "{bin} is missing: run `cargo xtask setup` (it installs containerd, runc and busybox-static)"
        );
    }
}

/// A tar archive in the ustar format, built in memory (entries owned by root, mtime 0, so the
/// same content always gives the same digest).
#[derive(Default)]
pub struct Tar {
    buf: Vec<u8>,
}

impl Tar {
    fn header(&mut self, name: &str, mode: u32, size: usize, kind: u8, link: &str) {
        assert!(name.len() < 100 && link.len() < 100, "tar name too long");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        // The checksum is computed with its own field as spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
    }

    pub fn dir(&mut self, name: &str) {
        self.header(&format!("{name}/"), 0o755, 0, b'5', "");
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, mode, data.len(), b'0', "");
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o777, 0, b'2', target);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        self.buf
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds an OCI image layout archive (`oci-layout`, `index.json`, blobs: manifest, config
/// and one uncompressed layer holding busybox-static and its applet links) named `reference`,
/// whose default process is `entrypoint` (the pod sandbox runs it as its pause process).
/// Returns the archive, ready for `ctr images import`.
pub fn build_image(reference: &str, entrypoint: &[&str]) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("read {BUSYBOX}: {e} (run `cargo xtask setup`: it installs busybox-static)")
    });
    let mut layer = Tar::default();
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www"] {
        layer.dir(d);
    }
    layer.file("bin/busybox", 0o755, &busybox);
    for a in APPLETS {
        layer.symlink(&format!("bin/{a}"), "busybox");
    }
    layer.file("www/index.html", 0o644, INDEX_HTML.as_bytes());
    let layer = layer.finish();
    let layer_digest = sha256_hex(&layer);

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Env": ["PATH=/bin"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    })
    .to_string();
    let config_digest = sha256_hex(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    })
    .to_string();
    let manifest_digest = sha256_hex(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": reference },
        }],
    })
    .to_string();

    let mut image = Tar::default();
    image.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    image.file("index.json", 0o644, index.as_bytes());
    image.dir("blobs");
    image.dir("blobs/sha256");
    for (digest, data) in [
        (&layer_digest, layer.as_slice()),
        (&config_digest, config.as_bytes()),
        (&manifest_digest, manifest.as_bytes()),
    ] {
        image.file(&format!("blobs/sha256/{digest}"), 0o644, data);
    }
    image.finish()
}

/// A containerd serving the CRI API inside a node's network namespace, everything it keeps
/// under one private temp dir. Stopped and cleaned on drop.
pub struct Containerd {
    pub node: String,
    /// The private dir: config.toml, root/, state/, the sockets, cni-bin/, cni-net/, the log.
    pub dir: tempfile::TempDir,
    /// The cgroup the pods' cgroups go under (`/sys/fs/cgroup/<name>`), removed on drop.
    pub cgroup_parent: String,
    process: Option<ChildGuard>,
    cri: Option<CriClient>,
    /// Whether /run/containerd was there before: containerd 1.6's shims put their sockets in
    /// /run/containerd/s whatever the config says; the guard removes the dirs it caused.
    run_dir_existed: bool,
}

/// Where containerd 1.6's runc shims always put their sockets.
const SHIM_SOCKET_ROOT: &str = "/run/containerd";

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("node", &self.node)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Containerd {
    /// Writes the private config and the CNI dirs. The caller puts the CNI config in
    /// [`Self::cni_net_dir`] and the plugins in [`Self::cni_bin_dir`] (CRI reloads the conf
    /// dir when it changes), then calls [`Self::start`].
    pub fn prepare(node: &Node, sandbox_image: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dp-containerd-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["root", "state", "cni-bin", "cni-net"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let cgroup_parent = format!("{}-pods", crate::netns::unique("dptest-"));
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Only what the CRI plugin needs: no /opt/containerd, no snapshotters but native.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  disable_apparmor = true
  # The pods' network namespaces are bind-mounted under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE: this machine's root
  # lacks it (runc then fails with "can't get final child's PID from pipe"). Clamp the
  # scores to containerd's own, as containerd does when it runs rootless.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc's state next to containerd's, not in /run/containerd/runc.
        Root = "{d}/state/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-net"
    max_conf_num = 1
"#,
            d = d.display()
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        Self {
            node: node.name.clone(),
            dir,
            cgroup_parent,
            process: None,
            cri: None,
            run_dir_existed: Path::new(SHIM_SOCKET_ROOT).exists(),
        }
    }

    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }

    pub fn cni_net_dir(&self) -> PathBuf {
        self.dir.path().join("cni-net")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Starts containerd in `node`'s network namespace and waits until its CRI plugin
    /// answers and reports its network ready (a CNI config loaded).
    pub fn start(&mut self, node: &Node) {
        let log = std::fs::File::create(self.dir.path().join("containerd.log")).unwrap();
        let child = node
            .ns
            .command("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start containerd (run `cargo xtask setup`): {e}"));
        self.process = Some(ChildGuard::new(
            child,
            format!("containerd on {}", node.name),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        loop {
            if let Some(status) = self.process.as_mut().and_then(ChildGuard::exited) {
                panic!(
                    "containerd on {} exited ({status}):\n{}",
                    node.name,
                    self.log_text()
                );
            }
            if self.cri.is_none() && self.socket().exists() {
                match CriClient::connect(&self.socket()) {
                    Ok(c) => self.cri = Some(c),
                    Err(e) => last = e,
                }
            }
            if let Some(cri) = &self.cri {
                match cri.status() {
                    Ok(s) => {
                        let conds = s.status.map(|s| s.conditions).unwrap_or_default();
                        if conds.iter().any(|c| c.r#type == "NetworkReady" && c.status)
                            && conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status)
                        {
                            return;
                        }
                        last = format!("{conds:?}");
                    }
                    Err(e) => last = e,
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd on {} not ready after 20 s: {last}\n{}",
                node.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The CRI client (after [`Self::start`]).
    pub fn cri(&self) -> &CriClient {
        self.cri.as_ref().expect("containerd not started")
    }

    /// `ctr … ARGS` against this containerd, in the CRI plugin's namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        output(
            std::process::Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", "k8s.io"])
                .args(args),
        )
    }

    /// Imports an image archive (`ctr images import`), unpacked for the native snapshotter.
    pub fn import_image(&self, archive: &[u8]) {
        let path = self.dir.path().join("image.tar");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(archive))
            .unwrap();
        let out = self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            &path.display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "ctr images import on {}: {}{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Removes every pod sandbox through the runtime (stop: CNI DEL; remove), for the guard.
    fn remove_all_sandboxes(&self) {
        let Some(cri) = &self.cri else { return };
        match cri.list_pod_sandbox() {
            Ok(items) => {
                for sb in items {
                    if let Err(e) = cri
                        .stop_pod_sandbox(&sb.id)
                        .and_then(|()| cri.remove_pod_sandbox(&sb.id))
                    {
                        eprintln!("warning: containerd on {}: {e}", self.node);
                    }
                }
            }
            Err(e) => eprintln!("warning: containerd on {}: {e}", self.node),
        }
    }

    /// Pids that the runtime v2 shims wrote under the state dir (`shim.pid`, `init.pid`):
    /// the processes our containerd started, still running when it is gone.
    fn leftover_pids(&self) -> Vec<i32> {
        let tasks = self
            .dir
            .path()
            .join("state/io.containerd.runtime.v2.task/k8s.io");
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            for f in ["init.pid", "shim.pid"] {
                if let Some(pid) = std::fs::read_to_string(entry.path().join(f))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Mount points under the private dir (sandbox /dev/shm, netns bind mounts, rootfs),
    /// deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let root = self.dir.path();
        let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(root))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_sandboxes();
        self.cri = None;
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10));
        }
        for pid in self.leftover_pids() {
            let pid = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(pid, None).is_ok() {
                eprintln!(
                    "warning: containerd on {} left pid {pid}; killing it",
                    self.node
                );
                if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                    eprintln!("warning: kill {pid}: {e}");
                }
            }
        }
        for m in self.mounts() {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("warning: unmount {}: {e}", m.display());
            }
        }
        if !self.run_dir_existed {
            // Only empty dirs go: another runtime's sockets would keep them.
            for d in ["s", ""] {
                let path = Path::new(SHIM_SOCKET_ROOT).join(d);
                match std::fs::remove_dir(&path) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                        ) => {}
                    Err(e) => eprintln!("warning: remove {}: {e}", path.display()),
                }
            }
        }
        // The pods' cgroups: children first (their processes are gone by now).
        let cg = Path::new("/sys/fs/cgroup").join(&self.cgroup_parent);
        if cg.exists() {
            let mut dirs = vec![cg.clone()];
            let mut i = 0;
            while i < dirs.len() {
                for e in std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(e.path());
                    }
                }
                i += 1;
            }
            for d in dirs.iter().rev() {
                if let Err(e) = std::fs::remove_dir(d) {
                    eprintln!("warning: remove cgroup {}: {e}", d.display());
                }
            }
        }
    }
}
