use std::process::ExitCode;

use clap::Parser as _;
use dataplane::{
    agent::{self, AgentOptions},
    cli::{Cli, Command, DumpKind, LogFormat},
    dump, error_chain,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // netlink-packet-route warns about every attribute newer than itself; that is noise here.
    let directives = format!("{},netlink_packet_route=error", cli.log_level);
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match command {
        Command::Agent(args) => {
            let opts = AgentOptions {
                node: args.node,
                etcd_endpoints: args.etcd_endpoints,
                host_iface: args.host_iface,
                bpffs_dir: args.bpffs_dir,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                // Handlers go in before anything is attached, so a SIGTERM at any point after
                // start-up gives a clean exit rather than the default action.
                let shutdown = shutdown_signal()?;
                agent::run(opts, shutdown).await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })?;
        }
        Command::MapDump(args) => {
            let rows = dump::counter_rows(&args.bpffs_dir)?;
            match (args.kind, args.json) {
                (DumpKind::Counters | DumpKind::All, false) => {
                    print!("{}", dump::counters_table(&rows))
                }
                (DumpKind::Counters, true) => println!("{}", serde_json::to_string_pretty(&rows)?),
                (DumpKind::All, true) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "counters": rows }))?
                    )
                }
            }
        }
    }
    Ok(())
}

/// Registers SIGTERM and SIGINT handlers now and returns a future that completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
