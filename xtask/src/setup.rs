//! `cargo xtask setup`: install what a fresh machine lacks to build, test and benchmark the
//! dataplane. Idempotent: every item is checked first and only installed when missing.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::util::{cmd, probe, read, run, which};

/// Debian packages the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "iproute2",
    "iptables",
    "ipset",
    "iperf3",
    "bpftool",
    "tcpdump",
    "containernetworking-plugins",
    "protobuf-compiler",
    "libprotobuf-dev",
    "procps",
    "iputils-ping",
    // The containerd end-to-end test: a real runtime and the only binary of its image.
    "containerd",
    "runc",
    "busybox-static",
    // libFuzzer (built by the fuzz targets' libfuzzer-sys) is C++.
    "g++",
];

/// Components the nightly toolchain needs: `rust-src` for `-Z build-std=core`, clippy for the
/// eBPF crate's lint step.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

pub fn run_setup() -> Result<()> {
    nightly_toolchain().context("setup: nightly toolchain")?;
    for component in NIGHTLY_COMPONENTS {
        nightly_component(component).with_context(|| format!("setup: nightly {component}"))?;
    }
    let sysroot = nightly_sysroot().context("setup: nightly sysroot")?;
    libllvm_symlink(&sysroot).context("setup: libLLVM.so symlink")?;
    bpf_linker(&sysroot).context("setup: bpf-linker")?;
    debian_packages().context("setup: Debian packages")?;
    kubernetes_validate().context("setup: kubernetes-validate")?;
    cargo_fuzz().context("setup: cargo-fuzz")?;
    Ok(())
}

/// cargo-fuzz, which builds the fuzz targets of `fuzz/` (`cargo xtask fuzz`). From crates.io
/// with its lock file; about 2.5 minutes to build here.
fn cargo_fuzz() -> Result<()> {
    if which("cargo-fuzz")
        .is_some_and(|p| probe(cmd(p).arg("--version")).is_some_and(|o| o.status.success()))
    {
        println!("ok: cargo-fuzz already present");
        return Ok(());
    }
    println!("installing cargo-fuzz");
    run(cmd("cargo").args(["install", "--locked", "cargo-fuzz"]))
}

/// The offline Kubernetes schema validator the deploy/ test runs (PyPI `kubernetes-validate`,
/// which bundles the API's OpenAPI schemas), in its own venv so the system Python is left
/// alone.
pub const TOOLS_VENV: &str = "/opt/dataplane-tools/venv";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

fn kubernetes_validate() -> Result<()> {
    let venv = Path::new(TOOLS_VENV);
    let exe = venv.join("bin/kubernetes-validate");
    let installed = probe(cmd(&exe).arg("--version"))
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if installed.as_deref() == Some(KUBERNETES_VALIDATE_VERSION) {
        println!("ok: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} already present");
        return Ok(());
    }
    println!("installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {TOOLS_VENV}");
    if !venv.join("bin/pip").is_file() {
        // Debian's python3 ships venv separately.
        if !probe(cmd("python3").args(["-m", "venv", "--help"])).is_some_and(|o| o.status.success())
        {
            run(cmd("apt-get").arg("update"))?;
            run(cmd("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "python3",
                    "python3-venv",
                ]))?;
        }
        run(cmd("python3").args(["-m", "venv"]).arg(venv))?;
    }
    run(cmd(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}

fn nightly_toolchain() -> Result<()> {
    let list = read(cmd("rustup").args(["toolchain", "list"]))?;
    let present = list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        // `nightly` or `nightly-<host>`, not a dated `nightly-2025-01-01-<host>`.
        name == "nightly"
            || name
                .strip_prefix("nightly-")
                .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if present {
        println!("ok: nightly toolchain already present");
        return Ok(());
    }
    println!("installing nightly toolchain");
    run(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"])).context(
        "the nightly toolchain (needed to build the eBPF programs) is missing and could not be \
         installed",
    )
}

fn nightly_component(component: &str) -> Result<()> {
    let installed =
        read(cmd("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    let prefix = format!("{component}-");
    if installed
        .lines()
        .map(str::trim)
        .any(|l| l == component || l.starts_with(&prefix))
    {
        println!("ok: {component} (nightly) already present");
        return Ok(());
    }
    println!("installing {component} (nightly)");
    run(cmd("rustup").args(["component", "add", component, "--toolchain", "nightly"]))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = read(cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(out.trim());
    if !sysroot.join("lib").is_dir() {
        bail!(
            "`rustc +nightly --print sysroot` gave {}, which has no lib/",
            sysroot.display()
        );
    }
    Ok(sysroot)
}

/// The major version of the LLVM inside the nightly rustc ("LLVM version: 22.1.4" → "22").
fn nightly_llvm_major() -> Result<String> {
    let out = read(cmd("rustc").args(["+nightly", "-vV"]))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` prints no \"LLVM version:\" line")?;
    let major = version.trim().split('.').next().unwrap_or("");
    if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "cannot parse the LLVM version {:?} of `rustc +nightly -vV`",
            version.trim()
        );
    }
    Ok(major.to_string())
}

/// bpf-linker links against the nightly toolchain's own libLLVM through `$SYSROOT/lib/libLLVM.so`,
/// which the toolchain ships only as `libLLVM.so.<ver>-rust-<ver>`.
fn libllvm_symlink(sysroot: &Path) -> Result<()> {
    let lib = sysroot.join("lib");
    let link = lib.join("libLLVM.so");
    // `exists` follows the link: false when missing or dangling.
    if link.exists() {
        println!("ok: libLLVM.so symlink already present");
        return Ok(());
    }
    let mut candidates: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .collect();
    candidates.sort();
    let Some(target) = candidates.pop() else {
        bail!("no libLLVM.so.*-rust-* in {}", lib.display());
    };
    println!("installing libLLVM.so symlink");
    println!("==> ln -sf {target} {}", link.display());
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    symlink(&target, &link).with_context(|| format!("cannot create {} -> {target}", link.display()))
}

/// `Some(path)` when bpf-linker is on PATH, runs, and finds all of its shared libraries.
fn working_bpf_linker() -> Option<PathBuf> {
    let path = which("bpf-linker")?;
    if !probe(cmd(&path).arg("--version"))?.status.success() {
        return None;
    }
    let ldd = probe(cmd("ldd").arg(&path))?;
    let text = String::from_utf8_lossy(&ldd.stdout);
    (!text.contains("not found")).then_some(path)
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    if working_bpf_linker().is_some() {
        println!("ok: bpf-linker already present");
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    println!("installing bpf-linker (llvm-{major})");
    run(cmd("cargo")
        .env("LLVM_PREFIX", sysroot)
        .args(["+nightly", "install", "bpf-linker", "--no-default-features"])
        .args(["--features", &format!("llvm-{major}"), "--force"]))?;
    if working_bpf_linker().is_none() {
        bail!(
            "bpf-linker was installed but does not run: is the cargo bin directory on PATH, \
             and does `ldd $(which bpf-linker)` find libLLVM?"
        );
    }
    Ok(())
}

fn debian_package_installed(package: &str) -> Result<bool> {
    // dpkg-query exits 1 for a package it has never heard of: that is "not installed" too.
    let output = probe(cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("dpkg-query could not be started: setup supports Debian-based systems only")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "install ok installed")
}

fn debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        if debian_package_installed(package)? {
            println!("ok: {package} already present");
        } else {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    if !crate::util::is_root() {
        bail!("installing {} needs root", missing.join(" "));
    }
    run(cmd("apt-get").arg("update"))?;
    run(cmd("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("lib")).unwrap();
        fs::write(dir.join("lib/libLLVM.so.22.1-rust-1.97.0-nightly"), b"").unwrap();
        fs::write(dir.join("lib/libLLVM-22-rust-1.97.0-nightly.so"), b"").unwrap();
        dir
    }

    #[test]
    fn libllvm_symlink_created_when_missing_and_fixed_when_dangling() {
        let sysroot = scratch("libllvm");
        let link = sysroot.join("lib/libLLVM.so");
        let expected = Path::new("libLLVM.so.22.1-rust-1.97.0-nightly");

        libllvm_symlink(&sysroot).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), expected);

        fs::remove_file(&link).unwrap();
        symlink("libLLVM.so.21.1-rust-1.96.0-nightly", &link).unwrap();
        libllvm_symlink(&sysroot).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), expected);

        // Present and resolving: left alone.
        libllvm_symlink(&sysroot).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), expected);
        fs::remove_dir_all(&sysroot).unwrap();
    }
}
