//! The command line of the `dataplane` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use dataplane_common::CtTimeouts;

use crate::DEFAULT_BPFFS_DIR;

/// eBPF dataplane for Kubernetes pod networking: TC programs on every pod veth and on the host
/// NIC, driven by a per-node agent from etcd.
#[derive(Debug, Parser)]
#[command(
    name = "dataplane",
    version,
    propagate_version = true,
    after_help = "Examples:
  dataplane agent --node node-1 --etcd-endpoints http://10.0.0.5:2379
  dataplane map-dump routes
  dataplane ctl apply -f policy.yaml --wait
  dataplane ctl node status
  dataplane install-cni --etcd-endpoints http://10.0.0.5:2379
  dataplane completions bash > /etc/bash_completion.d/dataplane

As a CNI plugin (CNI_COMMAND set) it reads the network config on stdin instead."
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing filter such as
    /// `info,dataplane::sync=debug`. Without the flag: $DATAPLANE_LOG, else $RUST_LOG, else
    /// info.
    #[arg(long, global = true, env = "DATAPLANE_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text for people, json (one object per line) for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load the programs, pin their maps, attach them to the host NIC and
    /// to every cali* interface, now and as they appear.
    ///
    /// Runs in the node's network namespace. On SIGTERM or SIGINT it exits and leaves the
    /// programs attached (their links are pinned under --bpffs-dir), so a restart does not
    /// interrupt traffic; a new agent takes the pins over and swaps its programs in.
    ///
    /// It serves GET /liveness and /readiness on --health-listen and Prometheus metrics on
    /// GET /metrics on --metrics-listen. Readiness is true once the programs are attached and
    /// the first full sync from etcd is in the maps, and false again while etcd has been
    /// unreachable for more than --readiness-grace seconds.
    ///
    /// With --dataplane iptables it loads no programs: routes (protocol 80), iptables chains
    /// (`cali-…`) and ipsets in this namespace carry the same resources, and readiness waits
    /// for the first full sync only. IP-in-IP pools are refused (no `ipip` kernel module).
    ///
    /// Examples:
    ///   dataplane agent --node node-1 --etcd-endpoints http://10.0.0.5:2379 --host-iface eth0
    ///   dataplane agent --node node-1 --etcd-endpoints https://10.0.0.5:2379 \
    ///       --etcd-ca ca.pem --etcd-cert client.pem --etcd-key client-key.pem
    ///   dataplane agent --node node-1 --health-listen 127.0.0.1:9099 --metrics-listen off \
    ///       --log-format json --log-level info,dataplane::sync=debug
    ///   curl -s localhost:9099/readiness; curl -s localhost:9091/metrics
    ///   dataplane agent --node node-1 --etcd-endpoints http://10.0.0.5:2379 \
    ///       --conntrack-size 1048576 --ct-tcp-established-timeout 7200
    ///   dataplane agent --node node-1 --etcd-endpoints http://10.0.0.5:2379 \
    ///       --dataplane iptables --iptables-backend legacy
    ///   iptables-legacy-save -t filter | grep cali-; ipset list -n; ip route show proto 80
    #[command(verbatim_doc_comment)]
    Agent(AgentArgs),
    /// Print the contents of the pinned maps (works with the agent stopped).
    ///
    /// Examples:
    ///   dataplane map-dump counters
    ///   dataplane map-dump routes --json
    ///   dataplane map-dump policy                      # every rule in force, with its hits
    ///   dataplane map-dump policy default/web --direction in
    ///   dataplane map-dump policy cali1a2b3c4d5e6 --json
    ///   dataplane map-dump conntrack --proto tcp --addr 10.65.0.2 --port 80 --state established
    ///   dataplane map-dump conntrack stats
    ///   dataplane map-dump ipsets default/web
    ///   dataplane map-dump all --json --bpffs-dir /sys/fs/bpf/dataplane
    #[command(verbatim_doc_comment)]
    MapDump(MapDumpArgs),
    /// Manage resources in etcd (pools, nodes, policies, namespaces, pods) and inspect IPAM.
    ///
    /// Examples:
    ///   dataplane ctl --etcd-endpoints http://10.0.0.5:2379 apply -f pool.yaml
    ///   dataplane ctl apply -f policies.yaml --wait
    ///   dataplane ctl get ippools -o json
    ///   dataplane ctl get netpol -n prod
    ///   dataplane ctl delete node node-3
    ///   dataplane ctl ipam show
    ///   dataplane ctl node status -o json
    #[command(verbatim_doc_comment)]
    Ctl(CtlArgs),
    /// Trace packets in the BPF programs on one interface (a cali* veth, the host NIC) or a
    /// pod's veth (NAMESPACE/POD), switched on and off at run time without reloading.
    ///
    /// Writes the pinned maps directly (no agent or etcd needed); the running agent prints
    /// one record per packet of a traced interface in its log, target `bpf`: interface,
    /// hook, verdict, outcome, drop reason, conntrack's decision (ct_new/ct_tracked),
    /// encapsulation, addresses and ports, and where a redirect sent it. Untraced interfaces
    /// pay one array load per packet. `list` prints the traced interfaces, `off-all`
    /// switches every one off.
    ///
    /// Examples:
    ///   dataplane trace default/web on
    ///   dataplane trace cali1a2b3c4d5e6 on --bpffs-dir /sys/fs/bpf/dataplane
    ///   kubectl -n kube-system logs ds/dataplane | grep 'bpf.*hook='
    ///   dataplane trace eth0 on; dataplane trace list
    ///   dataplane trace default/web off; dataplane trace off-all
    #[command(verbatim_doc_comment)]
    Trace(TraceArgs),
    /// Remove everything the agent installed on this node, for an uninstall: its TCX links
    /// (the programs come off every interface), pinned maps and pin directory, and in the
    /// iptables mode its cali- chains, the jumps to them, its cali- ipsets and its routes
    /// (protocol 80).
    ///
    /// Run it in the node's network namespace with the agent stopped: a running BPF agent
    /// (its pin directory is locked) or iptables-mode agent (it holds
    /// /var/run/dataplane/iptables-agent-netns-<inode>.lock) is refused. Pods keep their veths and routes: their traffic goes back to
    /// plain kernel routing, with no policy. Running it again removes nothing and says so.
    ///
    /// Examples:
    ///   dataplane cleanup
    ///   dataplane cleanup --bpffs-dir /sys/fs/bpf/dataplane
    ///   kubectl -n kube-system delete ds dataplane && dataplane cleanup   # on each node
    #[command(verbatim_doc_comment)]
    Cleanup(CleanupArgs),
    /// Install the CNI plugin on this node: the binary, the dataplane-ipam link, the network
    /// config list and the node name file (the DaemonSet's init step).
    ///
    /// Copies --binary (default: this executable) to <cni-bin-dir>/dataplane, links
    /// <cni-bin-dir>/dataplane-ipam to it, writes the node name to --nodename-file and renders
    /// <cni-net-dir>/<conf-name> from the template: --network-config-template FILE, else the
    /// text in $CNI_NETWORK_CONFIG, else a built-in one. Placeholders: __ETCD_ENDPOINTS__,
    /// __ETCD_CA_CERT_FILE__, __ETCD_CERT_FILE__, __ETCD_KEY_FILE__, __CNI_MTU__,
    /// __KUBERNETES_NODE_NAME__, __LOG_LEVEL__, __KUBECONFIG_FILEPATH__. The result must be a
    /// config list with one "type": "dataplane" plugin that the plugin accepts; anything else
    /// (not JSON, an unknown __PLACEHOLDER__ left, no etcd endpoints) is an error and nothing
    /// is written.
    ///
    /// Every file is written to a hidden temporary name in its directory, synced and renamed
    /// into place, so the kubelet never runs a half-written plugin or reads a half-written
    /// config; files already right are not touched (running it twice changes nothing).
    /// When /host exists (the host's root mounted into the pod), the default paths are under
    /// it. With --watch it stays running and re-renders when the template file or the TLS files
    /// change (flags and environment are read once: restart it to change those); it exits on
    /// SIGTERM. --uninstall removes the files it installs.
    ///
    /// Examples:
    ///   dataplane install-cni --etcd-endpoints http://10.0.0.5:2379
    ///   dataplane install-cni --etcd-endpoints https://10.0.0.5:2379 --etcd-ca /etc/dataplane/ca.pem \
    ///       --etcd-cert /etc/dataplane/cert.pem --etcd-key /etc/dataplane/key.pem --mtu 1480
    ///   CNI_NETWORK_CONFIG="$(cat template.json)" ETCD_ENDPOINTS=http://10.0.0.5:2379 dataplane install-cni
    ///   dataplane install-cni --network-config-template /etc/dataplane/config/cni_network_config \
    ///       --copy-etcd-tls --watch
    ///   dataplane install-cni --uninstall
    #[command(verbatim_doc_comment)]
    InstallCni(InstallCniArgs),
    /// Print a shell completion script.
    ///
    /// Examples:
    ///   dataplane completions bash > /etc/bash_completion.d/dataplane
    ///   dataplane completions zsh > "${fpath[1]}/_dataplane"
    ///   dataplane completions fish > ~/.config/fish/completions/dataplane.fish
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Environment variables that count as unset when empty (e.g. taken from a ConfigMap key left
/// "" for plain-http etcd).
pub const EMPTY_MEANS_UNSET: &[&str] = &[
    "ETCD_CA_CERT_FILE",
    "ETCD_CERT_FILE",
    "ETCD_KEY_FILE",
    "CNI_NETWORK_CONFIG_FILE",
    "CNI_BIN_DIR",
    "CNI_NET_DIR",
];

/// TLS files for etcd (shared by the commands that talk to it).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate to verify etcd's server certificate (TLS).
    #[arg(long, env = "ETCD_CA_CERT_FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd (mutual TLS).
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd (mutual TLS).
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub etcd_key: Option<PathBuf>,
}

/// How to reach etcd (shared by the commands that talk to it).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (e.g. http://10.0.0.5:2379).
    #[arg(
        long,
        value_delimiter = ',',
        env = "ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
}

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Create or replace the resources in a file (`-` for stdin, `---` between documents).
    ///
    /// Kinds: projectcalico.org/v3 IPPool, Node, NetworkPolicy (in metadata.namespace, default
    /// `default`) and GlobalNetworkPolicy; the older v1 ipPool; Kubernetes
    /// networking.k8s.io/v1 NetworkPolicy (stored translated as the Calico NetworkPolicy
    /// knp.default.<name>, order 1000), v1 Namespace (stored as the Profile kns.<ns> with its
    /// labels) and v1 Pod (its labels and named ports). Every document is validated before
    /// anything is written: one bad document and nothing is.
    ///
    /// With --wait, it then waits until every live node's agent reports the written revision
    /// in force (agents not heard from for 30 s are not waited for).
    ///
    /// Policies are checked before anything is written: the cluster is read from etcd and
    /// every node's endpoints compiled with the new policies as the agents would; one that
    /// would give an endpoint more rules than its policy maps hold is refused, naming the
    /// policy, the endpoint and the limit, and nothing is written.
    ///
    /// Examples:
    ///   dataplane ctl apply -f pool.yaml
    ///   dataplane ctl apply -f deny-all.yaml --wait --wait-timeout 10
    ///   cat namespaces.yaml pods.yaml | dataplane ctl apply -f -
    #[command(verbatim_doc_comment)]
    Apply {
        /// The file of YAML (or JSON) documents; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// After writing, wait until every live node has the resources in force; fail if
        /// some node is still behind after --wait-timeout.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30, requires = "wait")]
        wait_timeout: u64,
        /// Most map entries one endpoint direction's rules may take (default: what an agent
        /// allows); tests lower it to reach the limit with small policies.
        #[arg(long, value_name = "ENTRIES", hide = true)]
        max_policy_entries: Option<usize>,
    },
    /// Print the resources of a kind, or one by name (YAML, or JSON with -o json).
    ///
    /// Kinds: ippool, node, networkpolicy (netpol, np), globalnetworkpolicy (gnp),
    /// namespace (ns: its kns.<ns> Profile), pod, profile. NetworkPolicies and pods are
    /// namespaced (-n, default `default`; -A for all). A Kubernetes policy may be named
    /// without its knp.default. prefix.
    ///
    /// Examples:
    ///   dataplane ctl get ippools
    ///   dataplane ctl get networkpolicy deny-all -n prod -o json
    ///   dataplane ctl get pods -A
    ///   dataplane ctl get gnp
    #[command(verbatim_doc_comment)]
    Get {
        /// What to print (see above).
        kind: String,
        /// One resource; without it, every one of the kind.
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Yaml)]
        output: OutputFormat,
        /// The namespace of a namespaced kind.
        #[arg(short = 'n', long = "namespace", default_value = "default")]
        namespace: String,
        /// List a namespaced kind in every namespace.
        #[arg(short = 'A', long = "all-namespaces", conflicts_with = "name")]
        all_namespaces: bool,
    },
    /// Delete one resource (kinds as for get).
    ///
    /// Examples:
    ///   dataplane ctl delete ippool pool-a
    ///   dataplane ctl delete netpol deny-all -n prod
    ///   dataplane ctl delete ns prod
    #[command(verbatim_doc_comment)]
    Delete {
        /// What to delete (as for get).
        kind: String,
        name: String,
        /// The namespace of a namespaced kind.
        #[arg(short = 'n', long = "namespace", default_value = "default")]
        namespace: String,
    },
    /// IPAM state.
    ///
    /// Example:
    ///   dataplane ctl ipam show
    #[command(verbatim_doc_comment)]
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// The nodes and their agents.
    ///
    /// Example:
    ///   dataplane ctl node status
    #[command(verbatim_doc_comment)]
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Every allocation block: its affinity, addresses used and free, handles.
    ///
    /// Example:
    ///   dataplane ctl --etcd-endpoints http://10.0.0.5:2379 ipam show
    #[command(verbatim_doc_comment)]
    Show,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node: address and subnet (its Node resource), affine IPAM blocks, whether its
    /// agent is alive (its status key refreshed within 30 s), the etcd revision its maps are
    /// programmed to and how far that is behind etcd's current revision. For this node, when
    /// its pin directory is readable: the attached interfaces and each map's fill level
    /// against its limit.
    ///
    /// The lag counts every etcd revision since the programmed one, including writes the
    /// agent does not act on (other agents' status reports), so a few revisions of lag on a
    /// quiet cluster are normal; a lag that keeps growing while changes are made is not.
    ///
    /// Examples:
    ///   dataplane ctl node status
    ///   dataplane ctl node status -o json
    ///   dataplane ctl node status --node node-1 --bpffs-dir /sys/fs/bpf/dataplane
    #[command(verbatim_doc_comment)]
    Status {
        /// table for people, json for scripts (a stable document).
        #[arg(short = 'o', long = "output", value_enum, default_value_t = StatusFormat::Table)]
        output: StatusFormat,
        /// This node's name (default: /var/lib/dataplane/nodename, else the hostname).
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
        /// This node's agent's pin directory, read for the attached interfaces and map fill.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataplaneMode {
    /// TC eBPF programs (the default).
    Bpf,
    /// Kernel routes, iptables chains and ipsets, the classic Calico way (the baseline the
    /// BPF mode is compared with). No IP-in-IP: this kernel has no `ipip` module.
    Iptables,
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name, as in its Node resource.
    #[arg(long, env = "NODENAME")]
    pub node: String,
    /// etcd endpoints, comma separated (e.g. http://10.0.0.5:2379).
    #[arg(long, value_delimiter = ',', env = "ETCD_ENDPOINTS")]
    pub etcd_endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// The node's NIC toward the other nodes.
    #[arg(long, default_value = "eth0")]
    pub host_iface: String,
    /// How pod traffic is handled.
    #[arg(long, value_enum, default_value_t = DataplaneMode::Bpf)]
    pub dataplane: DataplaneMode,
    /// With --dataplane iptables: which iptables writes the rules (nft: Debian bookworm's
    /// default `iptables`, and what Calico picks on such hosts).
    #[arg(long, value_enum, default_value_t = crate::iptables::Backend::Nft)]
    pub iptables_backend: crate::iptables::Backend,
    /// Where this agent pins its maps and links (one directory per agent; it is locked).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Address of the health endpoints: GET /liveness (200 while the agent runs) and
    /// GET /readiness (200 once attached and the first sync from etcd is programmed). `off`
    /// or '' serves neither.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9099")]
    pub health_listen: Listen,
    /// Address of the Prometheus metrics, GET /metrics. `off` or '' serves none. May be the
    /// same as --health-listen.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_listen: Listen,
    /// Seconds etcd may be unreachable before /readiness reports not ready (the maps keep
    /// their last state meanwhile).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub readiness_grace: u64,
    /// Conntrack: seconds an unanswered TCP handshake is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_syn, value_name = "SECS")]
    pub ct_tcp_syn_timeout: u32,
    /// Conntrack: seconds an idle established TCP connection is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_established, value_name = "SECS")]
    pub ct_tcp_established_timeout: u32,
    /// Conntrack: seconds a closing (FIN) TCP connection is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_fin, value_name = "SECS")]
    pub ct_tcp_fin_timeout: u32,
    /// Conntrack: seconds a reset TCP connection is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_reset, value_name = "SECS")]
    pub ct_tcp_reset_timeout: u32,
    /// Conntrack: seconds an idle UDP flow is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.udp, value_name = "SECS")]
    pub ct_udp_timeout: u32,
    /// Conntrack: seconds an idle ICMP echo flow is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.icmp, value_name = "SECS")]
    pub ct_icmp_timeout: u32,
    /// Conntrack: seconds an idle flow of any other protocol is kept.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.other, value_name = "SECS")]
    pub ct_other_timeout: u32,
    /// Conntrack table size (entries). Changing it on a restart remakes the table and
    /// carries every tracked connection over.
    #[arg(
        long,
        value_name = "ENTRIES",
        default_value_t = dataplane_common::MAX_CONNTRACK,
        value_parser = clap::value_parser!(u32).range(1024..=16_777_216)
    )]
    pub conntrack_size: u32,
    /// Unix datagram socket where the CNI plugin on this node reports each operation's
    /// latency (dataplane_cni_operation_duration_seconds in /metrics). The plugin's config
    /// key metrics_socket must name the same path when it is not the default. `off` or ''
    /// receives none.
    #[arg(long, value_name = "PATH", default_value = crate::cni_metrics::DEFAULT_SOCKET)]
    pub cni_metrics_socket: String,

    /// Load the TC programs from this eBPF object instead of the one built into the binary:
    /// an upgrade test's second build of the programs (built from this version's
    /// dataplane-ebpf crate, so its maps are this version's).
    #[arg(long, value_name = "FILE", hide = true)]
    pub bpf_object: Option<PathBuf>,

    /// Most map entries one endpoint direction's compiled rules may take (default: what the
    /// maps allow one policy); tests lower it to reach the limit with small policies.
    #[arg(long, value_name = "ENTRIES", hide = true)]
    pub max_policy_entries: Option<usize>,
}

impl AgentArgs {
    /// The conntrack timeouts the flags give.
    pub fn ct_timeouts(&self) -> CtTimeouts {
        CtTimeouts {
            tcp_syn: self.ct_tcp_syn_timeout,
            tcp_established: self.ct_tcp_established_timeout,
            tcp_fin: self.ct_tcp_fin_timeout,
            tcp_reset: self.ct_tcp_reset_timeout,
            udp: self.ct_udp_timeout,
            icmp: self.ct_icmp_timeout,
            other: self.ct_other_timeout,
            _pad: 0,
        }
    }
}

/// A listen address, or none (`off` or '').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is not an address such as 0.0.0.0:9099 (or off)"))
    }
}

#[derive(Debug, clap::Args)]
pub struct InstallCniArgs {
    /// The host's CNI plugin directory [default: /host/opt/cni/bin when /host exists, else
    /// /opt/cni/bin].
    #[arg(long, env = "CNI_BIN_DIR", value_name = "DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The host's CNI config directory [default: /host/etc/cni/net.d when /host exists, else
    /// /etc/cni/net.d].
    #[arg(long, env = "CNI_NET_DIR", value_name = "DIR")]
    pub cni_net_dir: Option<PathBuf>,
    /// The config list's file name in --cni-net-dir (runtimes load the first in name order).
    #[arg(long, env = "CNI_CONF_NAME", value_name = "NAME", default_value = crate::install_cni::DEFAULT_CONF_NAME)]
    pub conf_name: String,
    /// The template file (re-read by --watch). Without it: the text of $CNI_NETWORK_CONFIG,
    /// else the built-in template.
    #[arg(long, env = "CNI_NETWORK_CONFIG_FILE", value_name = "FILE")]
    pub network_config_template: Option<PathBuf>,
    /// etcd endpoints, comma separated (required to install).
    #[arg(long, env = "ETCD_ENDPOINTS", value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// etcd TLS files. Without --copy-etcd-tls these must be paths on the host (the plugin
    /// runs there) and are written into the config as given.
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// Copy the etcd TLS files into <cni-net-dir>/dataplane-tls/ (mode 0600) and write the
    /// copies' host paths into the config: for a Secret mounted in the installer's pod.
    #[arg(long, env = "CNI_COPY_ETCD_TLS")]
    pub copy_etcd_tls: bool,
    /// The pods' MTU (__CNI_MTU__).
    #[arg(long, env = "CNI_MTU", default_value_t = 1440)]
    pub mtu: u32,
    /// This node's name [default: the hostname].
    #[arg(long, env = "KUBERNETES_NODE_NAME", value_name = "NAME")]
    pub node: Option<String>,
    /// Where the node name is written for the plugin [default:
    /// /var/lib/dataplane/nodename, under /host when /host exists].
    #[arg(long, value_name = "FILE")]
    pub nodename_file: Option<PathBuf>,
    /// The plugin's log level (__LOG_LEVEL__).
    #[arg(
        long,
        env = "CNI_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub cni_log_level: String,
    /// A kubeconfig path for the template (__KUBECONFIG_FILEPATH__; the plugin itself does
    /// not use the Kubernetes API).
    #[arg(
        long,
        env = "KUBECONFIG_FILEPATH",
        value_name = "FILE",
        default_value = ""
    )]
    pub kubeconfig: String,
    /// The binary to install [default: this executable].
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// Keep running and keep the installed files current; exit on SIGTERM.
    #[arg(long, conflicts_with = "uninstall")]
    pub watch: bool,
    /// With --watch: seconds between checks.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, requires = "watch")]
    pub watch_interval: f64,
    /// Remove the binary, the dataplane-ipam link, the config list, the node name file and
    /// the TLS copies instead.
    #[arg(long)]
    pub uninstall: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpKind {
    /// Packets, bytes and outcomes per interface and hook, with drops by reason.
    Counters,
    /// The routes map: local pods, remote blocks and hosts, pools, with their flags.
    Routes,
    /// The endpoints map: this node's pods by host veth, with their policy ids.
    Endpoints,
    /// The rules in force (policy name, rule number, action) with the packets each decided,
    /// then per policy id and address class the verdict per protocol and port block, with
    /// the deciding rule. `policy IFACE|NAMESPACE/POD [--direction in|out]`: one endpoint's.
    Policy,
    /// The address sets the compiled policies use (BPF mode: each policy's address classes)
    /// with their members and the rules that decide for them. `ipsets IFACE|NAMESPACE/POD`:
    /// one endpoint's. In the iptables mode the kernel's ipsets are the sets: `ipset list`.
    Ipsets,
    /// Tracked connections: tuple, state, age, packets each way, approvals; filtered by
    /// --proto, --addr, --port, --state. `conntrack stats`: entries by protocol and state,
    /// expired ones not yet swept, fill against the map's size.
    Conntrack,
    /// Every kind above.
    All,
}

/// A policy direction, as `map-dump policy --direction` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    /// Ingress: traffic into the pod.
    #[value(alias = "ingress")]
    In,
    /// Egress: traffic from the pod.
    #[value(alias = "egress")]
    Out,
}

#[derive(Debug, clap::Args)]
pub struct MapDumpArgs {
    /// What to print.
    #[arg(value_enum)]
    pub kind: DumpKind,
    /// For `policy` and `ipsets`: an interface (cali…) or NAMESPACE/POD, to show that
    /// endpoint's policy only. For `conntrack`: `stats`.
    #[arg(value_name = "IFACE|POD|stats")]
    pub target: Option<String>,
    /// For `policy`: only ingress (in) or egress (out) policy.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
    /// For `conntrack`: only this protocol (tcp, udp, icmp, sctp, or a number).
    #[arg(long)]
    pub proto: Option<String>,
    /// For `conntrack`: only connections with this address at either end.
    #[arg(long, value_name = "IPV4")]
    pub addr: Option<String>,
    /// For `conntrack`: only connections with this port at either end.
    #[arg(long)]
    pub port: Option<u16>,
    /// For `conntrack`: only connections in this state (syn_sent, syn_recv, established,
    /// fin_wait, closing, reset, open).
    #[arg(long)]
    pub state: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The agent's pin directory.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// An interface, NAMESPACE/POD, or `list` / `off-all`.
    #[arg(value_name = "IFACE|POD|list|off-all")]
    pub target: String,
    /// `on` or `off` (not with list / off-all).
    #[arg(value_name = "on|off")]
    pub state: Option<String>,
    /// The agent's pin directory.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The agent's pin directory.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn listen_addresses_or_off() {
        let a: Listen = "0.0.0.0:9099".parse().unwrap();
        assert_eq!(a.0, Some(([0, 0, 0, 0], 9099).into()));
        assert_eq!("off".parse::<Listen>(), Ok(Listen(None)));
        assert_eq!("".parse::<Listen>(), Ok(Listen(None)));
        assert!("9099".parse::<Listen>().unwrap_err().contains("or off"));
    }

    #[test]
    fn agent_defaults_serve_health_and_metrics_on_the_daemonset_ports() {
        let cli = Cli::try_parse_from(["dataplane", "agent", "--node", "n"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not the agent")
        };
        assert_eq!(a.health_listen.0, Some(([0, 0, 0, 0], 9099).into()));
        assert_eq!(a.metrics_listen.0, Some(([0, 0, 0, 0], 9091).into()));
        assert_eq!(a.readiness_grace, 30);
        let cli = Cli::try_parse_from([
            "dataplane",
            "agent",
            "--node",
            "n",
            "--health-listen",
            "",
            "--metrics-listen",
            "off",
            "--readiness-grace",
            "2",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not the agent")
        };
        assert_eq!(
            (a.health_listen.0, a.metrics_listen.0, a.readiness_grace),
            (None, None, 2)
        );
        Cli::command().debug_assert();
    }
}
