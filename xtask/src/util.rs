//! Running child processes: one place that builds every `Command`, prints it, and turns a
//! failure into a one-line error naming the command.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Variables that `cargo run` (and the rustup proxy in front of it) set for xtask and that would
/// pin a child `cargo`/`rustc`/`rustup` to the toolchain xtask was built with (stable), so that
/// `cargo +nightly …` would silently run stable, or that describe xtask's own package.
const REMOVED_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "CARGO",
    "CARGO_PRIMARY_PACKAGE",
];
const REMOVED_PREFIXES: &[&str] = &[
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_BIN_",
    "CARGO_CRATE_",
];

/// The workspace root: xtask lives directly in it.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask crate has a parent directory")
}

/// A `Command` for `program`, run from the workspace root, with the variables of `cargo run` that
/// would confuse a child toolchain removed. Every child process xtask starts is built here.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    for (key, _) in env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if REMOVED_VARS.contains(&name) || REMOVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            command.env_remove(&key);
        }
    }
    command.current_dir(workspace_root());
    command
}

/// How a command reads in a shell: explicitly set variables, program, arguments.
pub fn display(command: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    words.push(quote(&command.get_program().to_string_lossy()));
    words.extend(command.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+=/.,:@%^".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints `==> <command>`, runs it with inherited stdio, and fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = display(command);
    println!("==> {shown}");
    let status = command
        .status()
        .with_context(|| format!("`{shown}` could not be started"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly (a check, not a step) and returns its stdout; fails unless it exits 0.
pub fn read(command: &mut Command) -> Result<String> {
    let shown = display(command);
    let output = command
        .output()
        .with_context(|| format!("`{shown}` could not be started"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("`{shown}` failed ({}) {}", output.status, why.trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command quietly and returns its output whatever its exit status; `None` if it could
/// not be started at all (e.g. not installed).
pub fn probe(command: &mut Command) -> Option<Output> {
    command.output().ok()
}

/// The first executable called `name` on `PATH`, like `which`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a clear message unless xtask runs as root.
pub fn require_root(command: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {command}` must be run as root (it loads BPF programs and creates \
             network namespaces); run it from a root shell"
        );
    }
    Ok(())
}

/// `1.2s`, `2m05s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_removes_the_variables_of_cargo_run() {
        // `cargo test` sets the same package variables as `cargo run`.
        let command = cmd("true");
        let removed: Vec<String> = command
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for (key, _) in env::vars() {
            let must_go = REMOVED_VARS.contains(&key.as_str())
                || REMOVED_PREFIXES.iter().any(|p| key.starts_with(p));
            assert_eq!(removed.contains(&key), must_go, "{key}");
        }
        assert!(removed.iter().any(|k| k == "CARGO_MANIFEST_DIR"));
        assert_eq!(command.get_current_dir(), Some(workspace_root()));
    }

    #[test]
    fn display_quotes_like_a_shell() {
        let mut command = Command::new("cargo");
        command
            .env("LLVM_PREFIX", "/a b")
            .args(["+nightly", "-f=${Status}", "it's"]);
        assert_eq!(
            display(&command),
            r#"LLVM_PREFIX='/a b' cargo +nightly '-f=${Status}' 'it'\''s'"#
        );
    }
}
