//! The CNI plugin: `dataplane` run with CNI_COMMAND set (and `dataplane-ipam`, the same binary
//! under another name, as an IPAM-only plugin). Spec versions 0.3.0 to 1.1.0: ADD, DEL, CHECK,
//! VERSION, STATUS, GC. Results are printed in the config's version; errors as the spec's
//! error object on stdout with a non-zero exit.

pub mod delegate;
pub mod netsetup;
mod plugin;
pub use plugin::{NODENAME_FILE, local_node_name};
pub mod request;
pub mod types;

use std::io::Read as _;

use request::{Call, Request};
use types::{CniError, code};

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
    let command = env_var("CNI_COMMAND").unwrap_or_default();
    let metrics_socket = metrics_socket_of(stdin);
    let result = match request::parse_call(&env_var, stdin) {
        Ok(Call::Version(answer)) => Ok(Some(answer)),
        Ok(Call::Command(req)) => {
            run(kind, &req, stdin).map_err(|e| e.version(&req.conf.cni_version))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(stdout) => Outcome {
            stdout: stdout.unwrap_or_default(),
            success: true,
            command,
            code: 0,
            metrics_socket,
        },
        Err(e) => Outcome {
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
        },
    }
}

/// Where this call's latency record goes: the config's `metrics_socket` (`""`: nowhere), else
/// the default; read from the raw JSON so that a config refused for another reason still
/// names it.
fn metrics_socket_of(stdin: &[u8]) -> Option<std::path::PathBuf> {
    let conf: serde_json::Value = serde_json::from_slice(stdin).unwrap_or_default();
    match conf.get("metrics_socket").and_then(|v| v.as_str()) {
        Some("") => None,
        Some(s) => Some(s.into()),
        None => Some(crate::cni_metrics::DEFAULT_SOCKET.into()),
    }
}

/// Acts on a checked request (the side effects: etcd, netlink, delegated plugins).
fn run(kind: PluginKind, req: &Request, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::INTERNAL, "start the runtime").details(e.to_string()))?;
    rt.block_on(plugin::run(kind, req, stdin))
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
