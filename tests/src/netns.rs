//! Network namespaces made by a test, entered per thread or per child process, and deleted by
//! a guard even when the test panics.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name no other test of any process on this machine uses at the same time:
/// `<prefix><pid>x<counter>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// `ip ARGS…` in the root namespace's view (use `-n NS` to act inside a namespace).
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` (which must be unique, see [`unique`]), with loopback up and IPv6 off
    /// so that no router solicitations or neighbour discovery add packets to what tests count.
    pub fn new(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ARGS…`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside this namespace (never in the root namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        });
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made there stay in it.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("enter netns {path:?}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Makes `cmd` start inside this namespace. Only the network namespace changes, so the
    /// child shares the machine's bpffs and /sys/fs/bpf pins (unlike `ip netns exec`, which
    /// also remounts /sys).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the child between fork and exec and only calls setns(2),
        // which is async-signal-safe; `file` is kept alive by the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a command inside the namespace to completion; panics on failure.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        run(self.command(program).args(args))
    }

    /// The ifindex of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> u32 {
        let json = self.ip(&["-j", "link", "show", "dev", iface]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v[0]["ifindex"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ifindex for {iface}: {json}")) as u32
    }

    /// The MAC address of `iface` in this namespace.
    pub fn mac(&self, iface: &str) -> String {
        let json = self.ip(&["-j", "link", "show", "dev", iface]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no MAC for {iface}: {json}"))
            .to_owned()
    }

    /// Whether `iface` exists in this namespace.
    pub fn has_link(&self, iface: &str) -> bool {
        output(Command::new("ip").args(["-n", &self.name, "link", "show", "dev", iface]))
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = output(Command::new("ip").args(["netns", "del", &self.name]));
        if !out.status.success() {
            eprintln!(
                "warning: delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// A child process ended by its pid (SIGTERM, then SIGKILL after a grace period) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Option<Child>,
    pub what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits up to `grace` before SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return child.wait().ok();
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Err(e) = child.kill() {
            eprintln!("warning: kill {} (pid {}): {e}", self.what, pid);
        }
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(5));
    }
}
