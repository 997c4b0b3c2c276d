//! Delegation to another IPAM plugin (e.g. the reference `host-local`), found on CNI_PATH and
//! run the way a runtime runs a plugin: same environment, the network config on stdin.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use super::types::{CniError, CniResult, Env, code};

/// Finds `plugin` in the `:`-separated directories of CNI_PATH.
fn find(env: &Env, plugin: &str) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') {
        return Err(
            CniError::new(code::INVALID_CONFIG, "ipam.type is not a plugin name")
                .details(plugin.to_owned()),
        );
    }
    env.path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {plugin} not found in CNI_PATH"),
            )
            .details(env.path.clone())
        })
}

/// Runs `plugin` with `command` (ADD, DEL, CHECK) and the config bytes on stdin. Returns its
/// stdout on success; its own error object (code and message kept) on failure.
pub fn exec(env: &Env, plugin: &str, command: &str, conf: &[u8]) -> Result<String, CniError> {
    let path = find(env, plugin)?;
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", &env.path)
        .env(
            "CNI_ARGS",
            env.args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::DELEGATE,
                format!("run IPAM plugin {}", path.display()),
            )
            .details(e.to_string())
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf).map_err(|e| {
            CniError::new(code::DELEGATE, format!("write config to {plugin}"))
                .details(e.to_string())
        })?;
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(code::DELEGATE, format!("wait for {plugin}")).details(e.to_string())
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    match serde_json::from_str::<CniError>(&stdout) {
        Ok(mut e) => {
            e.msg = format!("IPAM plugin {plugin}: {}", e.msg);
            Err(e)
        }
        Err(_) => Err(CniError::new(
            code::DELEGATE,
            format!("IPAM plugin {plugin} failed ({})", out.status),
        )
        .details(format!(
            "{} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// ADD through the delegate: its result (addresses) parsed.
pub fn add(env: &Env, plugin: &str, conf: &[u8]) -> Result<CniResult, CniError> {
    let out = exec(env, plugin, "ADD", conf)?;
    serde_json::from_str(&out).map_err(|e| {
        CniError::new(
            code::DELEGATE,
            format!("IPAM plugin {plugin} returned an unreadable result"),
        )
        .details(format!("{e}: {}", out.trim()))
    })
}
