//! The CNI plugin: `dataplane` run with CNI_COMMAND set (and `dataplane-ipam`, the same binary
//! under another name, as an IPAM-only plugin). Spec versions 0.3.0 to 1.1.0: ADD, DEL, CHECK,
//! VERSION, STATUS, GC. Results are printed in the config's version; errors as the spec's
//! error object on stdout with a non-zero exit.

pub mod delegate;
pub mod netsetup;
mod plugin;
pub use plugin::{NODENAME_FILE, local_node_name};
pub mod types;

use std::io::Read as _;

use types::{CniError, Env, NetConf, SUPPORTED_VERSIONS, code, is_supported, version_at_least};

/// Which plugin this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// The main plugin (`"type": "dataplane"`).
    Main,
    /// The IPAM plugin (`"ipam": {"type": "dataplane-ipam"}`) when exec'd by name.
    Ipam,
}

/// The IPAM type that is ours and done in-process.
pub const OUR_IPAM: &str = "dataplane-ipam";

/// What a CNI invocation prints and how it exits.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
    /// CNI_COMMAND (empty when unset).
    pub command: String,
    /// 0 on success, else the error code printed.
    pub code: u32,
    /// Where to report the operation's latency (the config's `metrics_socket`, else the
    /// default; `None`: "" in the config, not reported).
    pub metrics_socket: Option<std::path::PathBuf>,
}

/// Runs one CNI invocation: reads `stdin`, acts, and returns what to print. Never panics on
/// input: every failure becomes the spec's error object.
pub fn invoke(kind: PluginKind, env_var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let mut version = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned();
    let command = env_var("CNI_COMMAND").unwrap_or_default();
    let mut metrics_socket = Some(std::path::PathBuf::from(crate::cni_metrics::DEFAULT_SOCKET));
    let result = (|| -> Result<Option<String>, CniError> {
        let env = Env::from_vars(&env_var)?;
        if env.command == "VERSION" {
            // VERSION's stdin holds only {"cniVersion": …}, and may be empty.
            let v: serde_json::Value = serde_json::from_slice(stdin).unwrap_or_default();
            if let Some(v) = v.get("cniVersion").and_then(|v| v.as_str())
                && is_supported(v)
            {
                version = v.to_owned();
            }
            return Ok(Some(
                serde_json::json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
                    .to_string(),
            ));
        }
        let conf = parse_conf(stdin)?;
        if let Some(s) = &conf.metrics_socket {
            metrics_socket = (!s.is_empty()).then(|| s.into());
        }
        version = conf.cni_version.clone();
        check_command_version(&env.command, &conf.cni_version)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                CniError::new(code::INTERNAL, "start the runtime").details(e.to_string())
            })?;
        rt.block_on(plugin::run(kind, &env, &conf, stdin))
    })();
    match result {
        Ok(stdout) => Outcome {
            stdout: stdout.unwrap_or_default(),
            success: true,
            command,
            code: 0,
            metrics_socket,
        },
        Err(e) => {
            let e = e.version(if is_supported(&version) {
                &version
            } else {
                SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]
            });
            Outcome {
                stdout: serde_json::to_string(&e).unwrap_or_else(|_| {
                    format!(
                        r#"{{"cniVersion":"1.1.0","code":{},"msg":"internal error"}}"#,
                        code::INTERNAL
                    )
                }),
                success: false,
                command,
                code: e.code,
                metrics_socket,
            }
        }
    }
}

/// Decodes and validates the network config.
fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(
            code::DECODE,
            "no network configuration on stdin",
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "network configuration is not valid JSON of the expected shape",
        )
        .details(e.to_string())
    })?;
    if conf.cni_version.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, "cniVersion is missing"));
    }
    if !is_supported(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
        )
        .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is out of range 68..65535"),
        ));
    }
    Ok(conf)
}

/// CHECK exists from 0.4.0, STATUS and GC from 1.1.0.
fn check_command_version(command: &str, version: &str) -> Result<(), CniError> {
    let min = match command {
        "CHECK" => "0.4.0",
        "STATUS" | "GC" => "1.1.0",
        "ADD" | "DEL" => return Ok(()),
        "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is required")),
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            ));
        }
    };
    if version_at_least(version, min) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{command} needs cniVersion {min} or later, the config says {version}"),
        ))
    }
}

/// `main` of CNI mode: reads stdin and the process environment, prints, and gives the exit
/// code. The operation's latency goes to the node's agent afterwards, best effort
/// ([`crate::cni_metrics`]).
pub fn main(kind: PluginKind) -> std::process::ExitCode {
    let started = std::time::Instant::now();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => invoke(kind, |k| std::env::var(k).ok(), &stdin),
        Err(e) => Outcome {
            stdout: serde_json::to_string(
                &CniError::new(code::IO_FAILURE, "read stdin").details(e.to_string()),
            )
            .unwrap_or_default(),
            success: false,
            command: std::env::var("CNI_COMMAND").unwrap_or_default(),
            code: code::IO_FAILURE,
            metrics_socket: Some(crate::cni_metrics::DEFAULT_SOCKET.into()),
        },
    };
    if !outcome.stdout.is_empty() {
        println!("{}", outcome.stdout);
    }
    if let Some(socket) = &outcome.metrics_socket {
        crate::cni_metrics::send(
            socket,
            &crate::cni_metrics::Record {
                command: outcome.command.clone(),
                code: outcome.code,
                seconds: started.elapsed().as_secs_f64(),
            },
        );
    }
    if outcome.success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
