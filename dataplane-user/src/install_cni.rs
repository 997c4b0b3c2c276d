//! `dataplane install-cni`: puts the CNI plugin on a node the way a DaemonSet's init step does.
//!
//! It copies the binary into the host's CNI bin directory, links `dataplane-ipam` to it, writes
//! the node name file and renders the network config list from a template. Every file is
//! written to a temporary name in its own directory, synced and renamed over the old one, so a
//! kubelet or runtime that execs the plugin or reads the config while we write sees either the
//! old file or the new one, never a part. A file whose content is already right is not
//! touched, so running the installer again changes nothing.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::cni::{
    OUR_IPAM,
    types::{NetConf, SUPPORTED_VERSIONS, is_supported},
};

/// The plugin's file name in the CNI bin directory (its `"type"`).
pub const PLUGIN_NAME: &str = "dataplane";
/// Default name of the network config list.
pub const DEFAULT_CONF_NAME: &str = "10-dataplane.conflist";
/// Where the host's file system is mounted inside the installer's container.
pub const HOST_ROOT: &str = "/host";
/// Directory, under the CNI net dir, that holds the copied etcd TLS files.
pub const TLS_DIR_NAME: &str = "dataplane-tls";

/// The template used when none is given: one plugin, our IPAM, the etcd connection, the MTU
/// and the node name.
pub const BUILTIN_TEMPLATE: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "dataplane",
      "log_level": "__LOG_LEVEL__",
      "etcd_endpoints": "__ETCD_ENDPOINTS__",
      "etcd_key_file": "__ETCD_KEY_FILE__",
      "etcd_cert_file": "__ETCD_CERT_FILE__",
      "etcd_ca_cert_file": "__ETCD_CA_CERT_FILE__",
      "mtu": __CNI_MTU__,
      "nodename": "__KUBERNETES_NODE_NAME__",
      "ipam": { "type": "dataplane-ipam" }
    }
  ]
}
"#;

/// Where the template comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file (re-read on every pass of `--watch`, e.g. a mounted ConfigMap key).
    File(PathBuf),
    /// Text given in the environment (`CNI_NETWORK_CONFIG`).
    Text(String),
    /// [`BUILTIN_TEMPLATE`].
    BuiltIn,
}

/// Everything the installer needs, resolved from flags and environment.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub bin_dir: PathBuf,
    pub net_dir: PathBuf,
    pub conf_name: String,
    pub template: TemplateSource,
    /// Comma-separated etcd URLs (required to install, not to uninstall).
    pub etcd_endpoints: String,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// Copy the TLS files into `<net_dir>/dataplane-tls/` and name the copies in the config
    /// (the Secret is mounted in the pod only; the plugin runs on the host).
    pub copy_etcd_tls: bool,
    pub mtu: u32,
    pub node: String,
    pub nodename_file: PathBuf,
    pub log_level: String,
    pub kubeconfig: String,
    /// The binary to install.
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Bad input: flags, template, rendered config. Nothing was written.
    #[error("{0}")]
    Config(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError + use<> {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

/// What one pass did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    /// False when the file already had the right content and was left alone.
    pub written: bool,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.written { "wrote" } else { "unchanged" };
        write!(f, "{verb} {}", self.path.display())
    }
}

/// `/host/...` when the host's root is mounted at /host (inside the DaemonSet's pod), else
/// `plain`.
pub fn default_host_path(plain: &str) -> PathBuf {
    if Path::new(HOST_ROOT).is_dir() {
        Path::new(HOST_ROOT).join(plain.trim_start_matches('/'))
    } else {
        PathBuf::from(plain)
    }
}

/// The path the host sees for a path of ours: `/host/etc/x` is `/etc/x` on the host.
fn host_view(path: &Path) -> PathBuf {
    match path.strip_prefix(HOST_ROOT) {
        Ok(rest) if Path::new(HOST_ROOT).is_dir() => Path::new("/").join(rest),
        _ => path.to_owned(),
    }
}

impl InstallOptions {
    pub fn plugin_path(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_NAME)
    }

    pub fn ipam_link_path(&self) -> PathBuf {
        self.bin_dir.join(OUR_IPAM)
    }

    pub fn conf_path(&self) -> PathBuf {
        self.net_dir.join(&self.conf_name)
    }

    fn tls_dir(&self) -> PathBuf {
        self.net_dir.join(TLS_DIR_NAME)
    }

    /// The TLS files as (source, copy) pairs, in the order ca, cert, key.
    fn tls_files(&self) -> [(Option<&PathBuf>, PathBuf); 3] {
        let dir = self.tls_dir();
        [
            (self.etcd_ca.as_ref(), dir.join("etcd-ca")),
            (self.etcd_cert.as_ref(), dir.join("etcd-cert")),
            (self.etcd_key.as_ref(), dir.join("etcd-key")),
        ]
    }

    fn template_text(&self) -> Result<String, InstallError> {
        match &self.template {
            TemplateSource::File(p) => fs::read_to_string(p).map_err(|e| {
                InstallError::Config(format!(
                    "cannot read the network config template {}: {e}",
                    p.display()
                ))
            }),
            TemplateSource::Text(t) => Ok(t.clone()),
            TemplateSource::BuiltIn => Ok(BUILTIN_TEMPLATE.to_owned()),
        }
    }

    /// The placeholders and their values. TLS paths are the copies' host paths when copying.
    fn values(&self) -> Vec<(&'static str, String)> {
        let tls: Vec<String> = self
            .tls_files()
            .iter()
            .map(|(src, copy)| match src {
                None => String::new(),
                Some(_) if self.copy_etcd_tls => host_view(copy).display().to_string(),
                Some(src) => src.display().to_string(),
            })
            .collect();
        vec![
            ("__ETCD_ENDPOINTS__", self.etcd_endpoints.clone()),
            ("__ETCD_CA_CERT_FILE__", tls[0].clone()),
            ("__ETCD_CERT_FILE__", tls[1].clone()),
            ("__ETCD_KEY_FILE__", tls[2].clone()),
            ("__CNI_MTU__", self.mtu.to_string()),
            ("__KUBERNETES_NODE_NAME__", self.node.clone()),
            ("__LOG_LEVEL__", self.log_level.clone()),
            ("__KUBECONFIG_FILEPATH__", self.kubeconfig.clone()),
        ]
    }

    fn check(&self) -> Result<(), InstallError> {
        let endpoints = self.etcd_endpoints.split(',').map(str::trim);
        if endpoints.clone().all(str::is_empty) {
            return Err(InstallError::Config(
                "no etcd endpoints: set --etcd-endpoints or ETCD_ENDPOINTS".into(),
            ));
        }
        if !(68..=65535).contains(&self.mtu) {
            return Err(InstallError::Config(format!(
                "mtu {} is out of range 68..65535",
                self.mtu
            )));
        }
        if self.node.trim().is_empty() {
            return Err(InstallError::Config(
                "no node name: set --node or KUBERNETES_NODE_NAME".into(),
            ));
        }
        if self.conf_name.contains('/') || self.conf_name.starts_with('.') {
            return Err(InstallError::Config(format!(
                "--conf-name {:?} must be a plain file name",
                self.conf_name
            )));
        }
        Ok(())
    }
}

impl crate::cli::InstallCniArgs {
    /// Resolves defaults (the /host paths, the hostname, the running executable) and the
    /// template source.
    pub fn options(&self) -> Result<InstallOptions, InstallError> {
        let template = match &self.network_config_template {
            Some(p) => TemplateSource::File(p.clone()),
            None => match std::env::var("CNI_NETWORK_CONFIG") {
                Ok(t) if !t.trim().is_empty() => TemplateSource::Text(t),
                _ => TemplateSource::BuiltIn,
            },
        };
        let node = match &self.node {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        };
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().map_err(|e| {
                InstallError::Config(format!(
                    "cannot find this executable to install (give --binary): {e}"
                ))
            })?,
        };
        Ok(InstallOptions {
            bin_dir: self
                .cni_bin_dir
                .clone()
                .unwrap_or_else(|| default_host_path("/opt/cni/bin")),
            net_dir: self
                .cni_net_dir
                .clone()
                .unwrap_or_else(|| default_host_path("/etc/cni/net.d")),
            conf_name: self.conf_name.clone(),
            template,
            etcd_endpoints: self.etcd_endpoints.clone().unwrap_or_default(),
            etcd_ca: non_empty(&self.tls.etcd_ca),
            etcd_cert: non_empty(&self.tls.etcd_cert),
            etcd_key: non_empty(&self.tls.etcd_key),
            copy_etcd_tls: self.copy_etcd_tls,
            mtu: self.mtu,
            node,
            nodename_file: self
                .nodename_file
                .clone()
                .unwrap_or_else(|| default_host_path(crate::cni::NODENAME_FILE)),
            log_level: self.cni_log_level.clone(),
            kubeconfig: self.kubeconfig.clone(),
            binary,
        })
    }

    /// `--watch-interval` as a duration (at least 10 ms).
    pub fn interval(&self) -> Result<Duration, InstallError> {
        if !self.watch_interval.is_finite() || self.watch_interval < 0.01 {
            return Err(InstallError::Config(format!(
                "--watch-interval {} must be at least 0.01 seconds",
                self.watch_interval
            )));
        }
        Ok(Duration::from_secs_f64(self.watch_interval))
    }
}

/// An empty path (a ConfigMap key left "") is no path.
fn non_empty(p: &Option<PathBuf>) -> Option<PathBuf> {
    p.clone().filter(|p| !p.as_os_str().is_empty())
}

/// Replaces the known placeholders in `template` (values JSON-escaped, as they sit inside JSON
/// strings), then checks that none is left and that the result is a config list our plugin
/// accepts.
pub fn render(template: &str, values: &[(&str, String)]) -> Result<String, InstallError> {
    let mut out = template.to_owned();
    for (placeholder, value) in values {
        let quoted = serde_json::Value::String(value.clone()).to_string();
        out = out.replace(placeholder, &quoted[1..quoted.len() - 1]);
    }
    if let Some(left) = leftover_placeholder(&out) {
        return Err(InstallError::Config(format!(
            "the network config template has an unknown placeholder {left}"
        )));
    }
    validate_conflist(&out).map_err(InstallError::Config)?;
    Ok(out)
}

/// The first `__NAME__` (capitals, digits, underscores) in `text`.
fn leftover_placeholder(text: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(pos) = text[from..].find("__") {
        let start = from + pos;
        let rest = &text[start + 2..];
        let run = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..run];
        if let Some(inner) = name.strip_suffix("__")
            && inner.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        {
            return Some(&text[start..start + 2 + run]);
        }
        from = start + 2;
    }
    None
}

/// Checks that `text` is a CNI network config list with exactly one `"type": "dataplane"`
/// plugin whose config our plugin accepts (etcd endpoints, MTU, an IPAM type).
pub fn validate_conflist(text: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("the rendered network config is not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("the rendered network config is not a JSON object")?;
    let version = obj
        .get("cniVersion")
        .and_then(|v| v.as_str())
        .ok_or("the network config list has no cniVersion")?;
    if !is_supported(version) {
        return Err(format!(
            "cniVersion {version} is not supported (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        ));
    }
    let name = obj
        .get("name")
        .and_then(|v| v.as_str())
        .filter(|n| !n.is_empty())
        .ok_or("the network config list has no name")?;
    let plugins = obj
        .get("plugins")
        .and_then(|v| v.as_array())
        .filter(|p| !p.is_empty())
        .ok_or("the network config list has no \"plugins\" array (a .conflist is expected)")?;
    let mut ours = Vec::new();
    for (i, p) in plugins.iter().enumerate() {
        let t = p
            .get("type")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("plugins[{i}] has no type"))?;
        if t == PLUGIN_NAME {
            ours.push(p);
        }
    }
    let [plugin] = ours[..] else {
        return Err(format!(
            "the network config list must have one plugin of type {PLUGIN_NAME}, it has {}",
            ours.len()
        ));
    };
    // The runtime hands each plugin its entry with the list's name and version added.
    let mut conf = plugin.clone();
    conf["cniVersion"] = version.into();
    conf["name"] = name.into();
    let conf: NetConf = serde_json::from_value(conf)
        .map_err(|e| format!("the {PLUGIN_NAME} plugin's config is not valid: {e}"))?;
    if conf
        .etcd_endpoints
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .all(|e| e.trim().is_empty())
    {
        return Err(format!(
            "the {PLUGIN_NAME} plugin's config has no etcd_endpoints"
        ));
    }
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(format!(
            "the {PLUGIN_NAME} plugin's mtu {mtu} is out of range 68..65535"
        ));
    }
    if conf
        .ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(|t| t.as_str())
        .is_none_or(str::is_empty)
    {
        return Err(format!(
            "the {PLUGIN_NAME} plugin's config has no ipam.type"
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` with `mode` unless the file already has both: temporary file in the
/// same directory, fsync, rename, fsync of the directory. Returns whether it wrote.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, InstallError> {
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.file_type().is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && meta.len() == bytes.len() as u64
        && fs::read(path).map_err(io_err("read", path))? == bytes
    {
        return Ok(false);
    }
    let (dir, tmp) = temp_name(path)?;
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    remove_if_present(&tmp)?;
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode given to open.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = result {
        remove_if_present(&tmp)?;
        return Err(InstallError::Io {
            what: "write",
            path: tmp,
            source: e,
        });
    }
    if let Err(e) = fs::rename(&tmp, path) {
        remove_if_present(&tmp)?;
        return Err(InstallError::Io {
            what: "rename into place",
            path: path.to_owned(),
            source: e,
        });
    }
    sync_dir(&dir)?;
    Ok(true)
}

/// Points `link` at `target` (a relative name), swapping a new link in by rename.
fn link_atomic(link: &Path, target: &str) -> Result<bool, InstallError> {
    if fs::read_link(link).is_ok_and(|t| t == Path::new(target)) {
        return Ok(false);
    }
    let (dir, tmp) = temp_name(link)?;
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    remove_if_present(&tmp)?;
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("create link", &tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        remove_if_present(&tmp)?;
        return Err(InstallError::Io {
            what: "rename into place",
            path: link.to_owned(),
            source: e,
        });
    }
    sync_dir(&dir)?;
    Ok(true)
}

/// The directory of `path` and a hidden temporary name beside it. Runtimes load only
/// `*.conf`, `*.conflist` and `*.json` and exec plugins by their exact name, so neither ever
/// picks the temporary file up.
fn temp_name(path: &Path) -> Result<(PathBuf, PathBuf), InstallError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(InstallError::Config(format!(
            "{} is not a file path",
            path.display()
        )));
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_owned()
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    Ok((dir, tmp))
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Removes a file or link; absent is fine. Returns whether it was there.
fn remove_if_present(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::Io {
            what: "remove",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Identity of an installed file, to notice cheaply that something replaced it.
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The installer's memory between passes of `--watch`.
#[derive(Debug, Default)]
pub struct Installer {
    binary_stamp: Option<Stamp>,
}

impl Installer {
    /// One pass: render and check everything first (a bad template or an unreadable input
    /// writes nothing), then the TLS copies, the binary, the IPAM link, the node name file and,
    /// last, the config, so the runtime never finds a config naming a plugin not yet there.
    pub fn install(&mut self, opts: &InstallOptions) -> Result<Vec<Change>, InstallError> {
        opts.check()?;
        let conflist = render(&opts.template_text()?, &opts.values())?;
        let mut tls = Vec::new();
        if opts.copy_etcd_tls {
            for (src, copy) in opts.tls_files() {
                if let Some(src) = src {
                    let bytes = fs::read(src).map_err(|e| {
                        InstallError::Config(format!(
                            "cannot read the etcd TLS file {}: {e}",
                            src.display()
                        ))
                    })?;
                    tls.push((copy, bytes));
                }
            }
        }
        let plugin = opts.plugin_path();
        let binary = if self.binary_stamp.is_some() && stamp(&plugin) == self.binary_stamp {
            None
        } else {
            Some(fs::read(&opts.binary).map_err(|e| {
                InstallError::Config(format!(
                    "cannot read the binary to install {}: {e}",
                    opts.binary.display()
                ))
            })?)
        };

        let mut changes = Vec::new();
        for (copy, bytes) in &tls {
            changes.push(Change {
                written: write_atomic(copy, bytes, 0o600)?,
                path: copy.clone(),
            });
        }
        match binary {
            Some(bytes) => {
                changes.push(Change {
                    written: write_atomic(&plugin, &bytes, 0o755)?,
                    path: plugin.clone(),
                });
                self.binary_stamp = stamp(&plugin);
            }
            None => changes.push(Change {
                written: false,
                path: plugin.clone(),
            }),
        }
        let link = opts.ipam_link_path();
        changes.push(Change {
            written: link_atomic(&link, PLUGIN_NAME)?,
            path: link,
        });
        changes.push(Change {
            written: write_atomic(&opts.nodename_file, opts.node.as_bytes(), 0o644)?,
            path: opts.nodename_file.clone(),
        });
        let conf = opts.conf_path();
        changes.push(Change {
            written: write_atomic(&conf, conflist.as_bytes(), 0o644)?,
            path: conf,
        });
        Ok(changes)
    }
}

/// Removes what [`Installer::install`] writes: the config first (the runtime stops using the
/// plugin), then the IPAM link (only if it is our link), the binary, the node name file and
/// the TLS copies. Absent files are fine. Returns the paths removed.
pub fn uninstall(opts: &InstallOptions) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let mut remove = |p: PathBuf| -> Result<(), InstallError> {
        if remove_if_present(&p)? {
            removed.push(p);
        }
        Ok(())
    };
    remove(opts.conf_path())?;
    let link = opts.ipam_link_path();
    if fs::read_link(&link).is_ok_and(|t| t == Path::new(PLUGIN_NAME)) {
        remove(link)?;
    }
    remove(opts.plugin_path())?;
    remove(opts.nodename_file.clone())?;
    for (_, copy) in opts.tls_files() {
        remove(copy)?;
    }
    let tls_dir = opts.tls_dir();
    if fs::read_dir(&tls_dir).is_ok_and(|mut d| d.next().is_none()) {
        fs::remove_dir(&tls_dir).map_err(io_err("remove", &tls_dir))?;
        removed.push(tls_dir);
    }
    Ok(removed)
}

/// Installs, then re-checks every `interval` until `shutdown` completes: a changed template
/// file or TLS file, or a binary, link, node name file or config changed or removed behind our
/// back, is rewritten. A pass that fails (e.g. a bad template pushed to the ConfigMap) is
/// logged and leaves the installed files as they were; the first pass failing is an error.
pub async fn watch(
    opts: &InstallOptions,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), InstallError> {
    let mut installer = Installer::default();
    report(&installer.install(opts)?, true);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        match installer.install(opts) {
            Ok(changes) => report(&changes, false),
            Err(e) => tracing::error!(
                "{}; the installed files are left as they were",
                crate::error_chain(&e)
            ),
        }
    }
}

/// Prints one line per file (only the rewritten ones unless `all`).
pub fn report(changes: &[Change], all: bool) {
    for c in changes.iter().filter(|c| all || c.written) {
        println!("{c}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<(&'static str, String)> {
        vec![
            ("__ETCD_ENDPOINTS__", "http://10.0.0.5:2379".into()),
            ("__ETCD_CA_CERT_FILE__", String::new()),
            ("__ETCD_CERT_FILE__", String::new()),
            ("__ETCD_KEY_FILE__", String::new()),
            ("__CNI_MTU__", "1440".into()),
            ("__KUBERNETES_NODE_NAME__", "node \"1\"".into()),
            ("__LOG_LEVEL__", "info".into()),
            ("__KUBECONFIG_FILEPATH__", String::new()),
        ]
    }

    #[test]
    fn builtin_template_renders_with_values_escaped() {
        let out = render(BUILTIN_TEMPLATE, &values()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["plugins"][0]["type"], "dataplane");
        assert_eq!(v["plugins"][0]["ipam"]["type"], "dataplane-ipam");
        assert_eq!(v["plugins"][0]["mtu"], 1440);
        assert_eq!(v["plugins"][0]["nodename"], "node \"1\"");
    }

    #[test]
    fn leftover_placeholders_are_found() {
        assert_eq!(leftover_placeholder("a __FOO_BAR__ b"), Some("__FOO_BAR__"));
        assert_eq!(leftover_placeholder("{\"x\": \"__X1__\"}"), Some("__X1__"));
        assert_eq!(leftover_placeholder("__init__ a__b __ __1__"), None);
        let e = render(
            &BUILTIN_TEMPLATE.replace("__LOG_LEVEL__", "__NOPE__"),
            &values(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("__NOPE__"), "{e}");
    }

    #[test]
    fn rendered_configs_our_plugin_would_refuse_are_refused() {
        for (bad, want) in [
            ("{", "not valid JSON"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"dataplane"}"#,
                "plugins",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"dataplane"}]}"#,
                "not supported",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                "one plugin of type dataplane",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"dataplane","ipam":{"type":"dataplane-ipam"}}]}"#,
                "etcd_endpoints",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"dataplane","etcd_endpoints":"http://e:2379"}]}"#,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"dataplane","etcd_endpoints":"http://e:2379","mtu":9,"ipam":{"type":"x"}}]}"#,
                "out of range",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"dataplane","etcd_endpoints":"http://e:2379","mtu":"big","ipam":{"type":"x"}}]}"#,
                "not valid",
            ),
        ] {
            let e = validate_conflist(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
