use std::process::ExitCode;

use clap::Parser as _;
use dataplane::{
    agent::{self, AgentOptions},
    cli::{
        Cli, Command, CtlCommand, EtcdArgs, IpamCommand, LogFormat, NodeCommand, OutputFormat,
        StatusFormat,
    },
    ctl,
    datastore::{Datastore, EtcdConfig},
    dump, error_chain, install_cni,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // CNI mode: the runtime execs us as a plugin (CNI_COMMAND set), or as `dataplane-ipam`
    // (a link to this binary) for IPAM. Logs go to stderr; stdout is the protocol's.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let is_ipam = std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == dataplane::cni::OUR_IPAM);
    if is_ipam || std::env::var_os("CNI_COMMAND").is_some() {
        let level = std::env::var("DATAPLANE_LOG").unwrap_or_else(|_| "warn".to_owned());
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("warn")))
            .with_writer(std::io::stderr)
            .init();
        let kind = if is_ipam {
            dataplane::cni::PluginKind::Ipam
        } else {
            dataplane::cni::PluginKind::Main
        };
        return dataplane::cni::main(kind);
    }
    // A ConfigMap key left "" becomes an empty variable: for these that means "not set" (plain
    // http etcd), as clap would otherwise refuse the empty path.
    for var in dataplane::cli::EMPTY_MEANS_UNSET {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // SAFETY: still single-threaded here (no runtime or thread started yet).
            unsafe { std::env::remove_var(var) };
        }
    }
    let cli = Cli::parse();
    let level = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|l| !l.is_empty()))
        .unwrap_or_else(|| "info".to_owned());
    // netlink-packet-route warns about every attribute newer than itself; that is noise here.
    let directives = format!("{level},netlink_packet_route=error");
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
                ct_timeouts: args.ct_timeouts(),
                node: args.node,
                etcd_endpoints: args.etcd_endpoints,
                etcd_ca: args.tls.etcd_ca,
                etcd_cert: args.tls.etcd_cert,
                etcd_key: args.tls.etcd_key,
                host_iface: args.host_iface,
                dataplane: args.dataplane,
                iptables_backend: args.iptables_backend,
                bpffs_dir: args.bpffs_dir,
                health_listen: args.health_listen.0,
                metrics_listen: args.metrics_listen.0,
                readiness_grace: std::time::Duration::from_secs(args.readiness_grace),
                conntrack_size: args.conntrack_size,
                bpf_object: args.bpf_object,
                cni_metrics_socket: (!args.cni_metrics_socket.is_empty()
                    && !args.cni_metrics_socket.eq_ignore_ascii_case("off"))
                .then(|| args.cni_metrics_socket.into()),
                max_policy_entries: args.max_policy_entries,
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
        Command::Ctl(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_ctl(&args.etcd, args.command))?;
        }
        Command::Cleanup(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut removed = dataplane::cleanup::Removed::default();
            // Refuses a running agent (either mode) before anything is touched.
            dataplane::cleanup::check_no_agent(
                &args.bpffs_dir,
                std::path::Path::new(dataplane::runlock::RUN_DIR),
            )?;
            dataplane::cleanup::remove_bpf(&args.bpffs_dir, &mut removed)?;
            rt.block_on(dataplane::cleanup::remove_iptables(
                &[
                    dataplane::iptables::Backend::Nft,
                    dataplane::iptables::Backend::Legacy,
                ],
                &mut removed,
            ))?;
            println!("{}", removed.summary());
        }
        Command::InstallCni(args) => {
            let opts = args.options()?;
            if args.uninstall {
                for path in install_cni::uninstall(&opts)? {
                    println!("removed {}", path.display());
                }
            } else if args.watch {
                let interval = args.interval()?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let shutdown = shutdown_signal()?;
                    install_cni::watch(&opts, interval, shutdown).await?;
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                })?;
            } else {
                install_cni::report(&install_cni::Installer::default().install(&opts)?, true);
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dataplane", &mut std::io::stdout());
        }
        Command::MapDump(args) => dump::run(&args)?,
        Command::Trace(args) => dataplane::trace::run(&args)?,
    }
    Ok(())
}

fn etcd_config(args: &EtcdArgs) -> EtcdConfig {
    EtcdConfig {
        endpoints: args.etcd_endpoints.clone(),
        ca_file: args.tls.etcd_ca.clone(),
        cert_file: args.tls.etcd_cert.clone(),
        key_file: args.tls.etcd_key.clone(),
        timeout: std::time::Duration::from_secs(5),
    }
}

async fn run_ctl(
    etcd: &EtcdArgs,
    command: CtlCommand,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let CtlCommand::Node {
        command:
            NodeCommand::Status {
                output,
                node,
                bpffs_dir,
            },
    } = &command
    {
        let ds = Datastore::connect(&etcd_config(etcd)).await?;
        let node = node
            .clone()
            .unwrap_or_else(ctl::node_status::default_node_name);
        let report = ctl::node_status::node_status(&ds, &node, bpffs_dir).await?;
        match output {
            StatusFormat::Table => print!("{}", ctl::node_status::table(&report)),
            StatusFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        }
        return Ok(());
    }
    // Parse input before connecting, so a bad file fails without touching etcd.
    let manifests = match &command {
        CtlCommand::Apply { file, .. } => ctl::read_manifests(file)?,
        _ => Vec::new(),
    };
    let ds = Datastore::connect(&etcd_config(etcd)).await?;
    match command {
        CtlCommand::Apply {
            wait,
            wait_timeout,
            max_policy_entries,
            ..
        } => {
            let limit = max_policy_entries.unwrap_or(dataplane::sync::MAX_ENTRIES_PER_POLICY);
            ctl::check_fit(&ds, &manifests, limit).await?;
            let applied = ctl::apply(&ds, &manifests).await?;
            for a in &applied {
                println!("{}", a.line);
            }
            if wait && let Some(revision) = applied.iter().map(|a| a.mod_revision).max() {
                let timeout = std::time::Duration::from_secs(wait_timeout);
                println!("{}", ctl::wait_in_force(&ds, revision, timeout).await?);
            }
        }
        CtlCommand::Get {
            kind,
            name,
            output,
            namespace,
            all_namespaces,
        } => {
            let ns = (!all_namespaces).then_some(namespace.as_str());
            let items = ctl::get(&ds, &kind, name.as_deref(), ns).await?;
            print!("{}", ctl::format(&items, output == OutputFormat::Json)?);
            if output == OutputFormat::Json {
                println!();
            }
        }
        CtlCommand::Delete {
            kind,
            name,
            namespace,
        } => println!("{}", ctl::delete(&ds, &kind, &name, &namespace).await?),
        CtlCommand::Ipam {
            command: IpamCommand::Show,
        } => print!("{}", ctl::ipam_show(&ds).await?),
        // Handled above (it needs no manifests).
        CtlCommand::Node { .. } => {}
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
