//! `dataplane install-cni` (the DaemonSet's init step) against temporary directories standing
//! in for the host's /opt/cni/bin, /etc/cni/net.d and /var/lib/dataplane: the real binary, no
//! namespaces, no root needed.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_tests::dataplane_bin;

/// The host directories of one test.
struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        for d in ["bin", "net.d", "lib"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        Self { _tmp: tmp, root }
    }

    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }

    fn net(&self) -> PathBuf {
        self.root.join("net.d")
    }

    fn plugin(&self) -> PathBuf {
        self.bin().join("dataplane")
    }

    fn ipam(&self) -> PathBuf {
        self.bin().join("dataplane-ipam")
    }

    fn conflist(&self) -> PathBuf {
        self.net().join("10-dataplane.conflist")
    }

    fn nodename(&self) -> PathBuf {
        self.root.join("lib/nodename")
    }

    /// `dataplane install-cni` with this host's directories and `extra` flags; the environment
    /// variables it reads are cleared first so the machine's cannot leak in.
    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(dataplane_bin());
        for var in [
            "CNI_BIN_DIR",
            "CNI_NET_DIR",
            "CNI_CONF_NAME",
            "CNI_NETWORK_CONFIG",
            "CNI_NETWORK_CONFIG_FILE",
            "ETCD_ENDPOINTS",
            "ETCD_CA_CERT_FILE",
            "ETCD_CERT_FILE",
            "ETCD_KEY_FILE",
            "CNI_COPY_ETCD_TLS",
            "CNI_MTU",
            "KUBERNETES_NODE_NAME",
            "CNI_LOG_LEVEL",
            "KUBECONFIG_FILEPATH",
            "CNI_COMMAND",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(self.bin())
            .arg("--cni-net-dir")
            .arg(self.net())
            .arg("--nodename-file")
            .arg(self.nodename())
            .args(["--node", "node-1"])
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, extra: &[&str]) -> Output {
        self.command(extra).output().unwrap()
    }

    fn install(&self, extra: &[&str]) -> String {
        let out = self.run(extra);
        assert!(
            out.status.success(),
            "install-cni {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every file and link under the host root, with its content (a link as `-> target`).
    fn tree(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let t = e.file_type().unwrap();
                if t.is_symlink() {
                    let target = fs::read_link(&p).unwrap();
                    out.push((p, format!("-> {}", target.display()).into_bytes()));
                } else if t.is_dir() {
                    walk(&p, out);
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }
}

const ETCD: &str = "--etcd-endpoints=http://10.0.0.5:2379";

fn template(mtu_literal: Option<u32>, version: &str) -> String {
    let mtu = mtu_literal.map_or("__CNI_MTU__".to_owned(), |m| m.to_string());
    format!(
        r#"{{
  "name": "k8s-pod-network",
  "cniVersion": "{version}",
  "plugins": [
    {{
      "type": "dataplane",
      "log_level": "__LOG_LEVEL__",
      "etcd_endpoints": "__ETCD_ENDPOINTS__",
      "etcd_key_file": "__ETCD_KEY_FILE__",
      "etcd_cert_file": "__ETCD_CERT_FILE__",
      "etcd_ca_cert_file": "__ETCD_CA_CERT_FILE__",
      "mtu": {mtu},
      "nodename": "__KUBERNETES_NODE_NAME__",
      "policy_wait_ms": 0,
      "ipam": {{ "type": "dataplane-ipam" }},
      "kubernetes": {{ "kubeconfig": "__KUBECONFIG_FILEPATH__" }}
    }}
  ]
}}
"#
    )
}

fn identity(p: &Path) -> (u64, i64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn conf_json(host: &Host) -> serde_json::Value {
    serde_json::from_slice(&fs::read(host.conflist()).unwrap()).unwrap()
}

#[test]
fn second_run_changes_nothing_and_the_plugin_accepts_the_result() {
    let host = Host::new();
    let first = host.install(&[ETCD, "--mtu", "1480"]);
    for p in [host.plugin(), host.ipam(), host.nodename(), host.conflist()] {
        assert!(first.contains(&format!("wrote {}", p.display())), "{first}");
    }
    // The running executable was installed, executable, with the IPAM name linked to it.
    assert_eq!(
        fs::read(host.plugin()).unwrap(),
        fs::read(dataplane_bin()).unwrap()
    );
    assert_eq!(
        fs::metadata(host.plugin()).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::read_link(host.ipam()).unwrap(),
        PathBuf::from("dataplane")
    );
    assert_eq!(fs::read_to_string(host.nodename()).unwrap(), "node-1");
    let conf = conf_json(&host);
    assert_eq!(conf["cniVersion"], "1.0.0");
    let plugin = &conf["plugins"][0];
    assert_eq!(plugin["type"], "dataplane");
    assert_eq!(plugin["ipam"]["type"], "dataplane-ipam");
    assert_eq!(plugin["etcd_endpoints"], "http://10.0.0.5:2379");
    assert_eq!(plugin["mtu"], 1480);
    assert_eq!(plugin["nodename"], "node-1");
    dataplane::install_cni::validate_conflist(&fs::read_to_string(host.conflist()).unwrap())
        .unwrap();

    let before: Vec<_> = [host.plugin(), host.ipam(), host.nodename(), host.conflist()]
        .iter()
        .map(|p| identity(p))
        .collect();
    let tree = host.tree();
    let second = host.install(&[ETCD, "--mtu", "1480"]);
    assert!(!second.contains("wrote"), "second run rewrote: {second}");
    assert_eq!(second.matches("unchanged").count(), 4, "{second}");
    let after: Vec<_> = [host.plugin(), host.ipam(), host.nodename(), host.conflist()]
        .iter()
        .map(|p| identity(p))
        .collect();
    assert_eq!(before, after, "inode or mtime changed on the second run");
    assert_eq!(tree, host.tree(), "no temporary file left, nothing else");

    // The installed binary, under both names, answers as a CNI plugin...
    for exe in [host.plugin(), host.ipam()] {
        let out = Command::new(&exe)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{exe:?} VERSION");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&"1.0.0".into()),
            "{v}"
        );
    }
    // ...and takes the installed config as a runtime hands it over: with cniVersion 1.1.0
    // STATUS gets as far as etcd (nothing listens on port 1: 50, "plugin not available"),
    // where a config it refused would give 1, 6 or 7.
    let host2 = Host::new();
    let tpl = host2.root.join("tpl.json");
    fs::write(&tpl, template(None, "1.1.0")).unwrap();
    host2.install(&[
        "--etcd-endpoints=http://127.0.0.1:1",
        "--network-config-template",
        tpl.to_str().unwrap(),
    ]);
    let conf = conf_json(&host2);
    let mut entry = conf["plugins"][0].clone();
    entry["cniVersion"] = conf["cniVersion"].clone();
    entry["name"] = conf["name"].clone();
    let mut child = Command::new(host2.plugin())
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", host2.bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(entry.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success());
    assert_eq!(err["code"], 50, "{err}");
}

#[test]
fn a_concurrent_reader_only_ever_sees_a_whole_binary_and_a_whole_config() {
    let host = Host::new();
    // Two versions of everything: binaries of 4 MiB (large enough that a non-atomic write is
    // seen half-done) and two templates with different MTUs.
    let bins: Vec<Vec<u8>> = [b'a', b'b']
        .iter()
        .map(|&c| {
            let mut v = vec![c; 4 << 20];
            v[..4].copy_from_slice(b"\x7fELF");
            v
        })
        .collect();
    let mut args = Vec::new();
    for (i, bin) in bins.iter().enumerate() {
        let b = host.root.join(format!("binary-{i}"));
        fs::write(&b, bin).unwrap();
        let t = host.root.join(format!("template-{i}.json"));
        fs::write(&t, template(Some(1400 + 100 * i as u32), "1.0.0")).unwrap();
        args.push([
            ETCD.to_owned(),
            "--binary".to_owned(),
            b.display().to_string(),
            "--network-config-template".to_owned(),
            t.display().to_string(),
        ]);
    }
    let run = |i: usize| {
        let a: Vec<&str> = args[i].iter().map(String::as_str).collect();
        host.install(&a);
    };
    // The exact bytes of each version's config.
    run(1);
    let conf1 = fs::read(host.conflist()).unwrap();
    run(0);
    let conf0 = fs::read(host.conflist()).unwrap();
    assert_ne!(conf0, conf1);
    let confs = [conf0, conf1];

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let (plugin, ipam, conflist) = (host.plugin(), host.ipam(), host.conflist());
        let (bins, confs) = (bins.clone(), confs.clone());
        std::thread::spawn(move || {
            let mut seen = [[0usize; 2]; 3];
            while !stop.load(Ordering::Relaxed) {
                for (k, path) in [&plugin, &ipam].iter().enumerate() {
                    let got = fs::read(path).unwrap();
                    let v = bins
                        .iter()
                        .position(|b| *b == got)
                        .unwrap_or_else(|| panic!("{path:?}: partial read of {} bytes", got.len()));
                    seen[k][v] += 1;
                }
                let got = fs::read(&conflist).unwrap();
                let v = confs.iter().position(|c| *c == got).unwrap_or_else(|| {
                    panic!("partial config: {:?}", String::from_utf8_lossy(&got))
                });
                seen[2][v] += 1;
            }
            seen
        })
    };
    let rounds = 30;
    let start = Instant::now();
    for r in 0..rounds {
        run((r + 1) % 2);
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("the reader saw a partial file");
    eprintln!(
        "{rounds} installs in {elapsed:?}; reads per version (binary, link, config): {seen:?}"
    );
    for (what, counts) in ["binary", "dataplane-ipam", "config"].iter().zip(seen) {
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "the reader saw only one version of the {what}: {counts:?}"
        );
    }
    // Nothing left behind by the swaps.
    let names: Vec<_> = fs::read_dir(host.bin())
        .unwrap()
        .chain(fs::read_dir(host.net()).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
}

#[test]
fn watch_picks_up_a_template_change_and_exits_on_sigterm() {
    let host = Host::new();
    let tpl = host.root.join("template.json");
    fs::write(&tpl, template(Some(1400), "1.0.0")).unwrap();
    let stderr_path = host.root.join("watch.log");
    let child = host
        .command(&[
            ETCD,
            "--network-config-template",
            tpl.to_str().unwrap(),
            "--watch",
            "--watch-interval",
            "0.1",
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut guard = dataplane_tests::ChildGuard::new(child, "install-cni --watch");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mtu = || {
        fs::read(host.conflist())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["plugins"][0]["mtu"].as_u64())
    };
    wait_for("the first install", &|| mtu() == Some(1400));
    let t0 = Instant::now();
    // A ConfigMap volume update: the new file swapped in by rename.
    let next = host.root.join("template.json.new");
    fs::write(&next, template(Some(1300), "1.0.0")).unwrap();
    fs::rename(&next, &tpl).unwrap();
    wait_for("the new MTU", &|| mtu() == Some(1300));
    eprintln!("template change in force after {:?}", t0.elapsed());
    // A bad template is refused and the installed config stays.
    fs::write(&tpl, "{ not json").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(mtu(), Some(1300));
    // The config removed behind its back comes back.
    fs::write(&tpl, template(Some(1350), "1.0.0")).unwrap();
    fs::remove_file(host.conflist()).unwrap();
    wait_for("the config restored", &|| mtu() == Some(1350));

    let status = guard.stop(Duration::from_secs(5)).unwrap();
    let stderr = fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}\n{stderr}");
    assert!(stderr.contains("not valid JSON"), "{stderr}");
}

#[test]
fn uninstall_removes_exactly_its_files() {
    let host = Host::new();
    // Another network's files in the same directories stay.
    fs::write(host.bin().join("bridge"), b"other plugin").unwrap();
    fs::write(host.net().join("05-other.conflist"), b"{}").unwrap();
    let ca = host.root.join("ca.pem");
    fs::write(&ca, b"CA").unwrap();
    let before = host.tree();
    host.install(&[ETCD, "--etcd-ca", ca.to_str().unwrap(), "--copy-etcd-tls"]);
    let copy = host.net().join("dataplane-tls/etcd-ca");
    assert_eq!(fs::read(&copy).unwrap(), b"CA");
    assert_eq!(
        fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        conf_json(&host)["plugins"][0]["etcd_ca_cert_file"],
        copy.display().to_string()
    );
    let out = host.run(&["--uninstall"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("removed").count(), 6, "{stdout}");
    assert_eq!(before, host.tree());
    // Nothing to remove: still fine.
    let out = host.run(&["--uninstall"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_templates_and_flags_fail_in_one_line_and_write_nothing() {
    let host = Host::new();
    let tpl = host.root.join("bad.json");
    let empty = host.tree();
    let cases: Vec<(Vec<String>, Option<String>, &str)> = vec![
        (
            vec![ETCD.into()],
            Some(template(None, "1.0.0").replace("\"plugins\"", "plugins")),
            "not valid JSON",
        ),
        (
            vec![ETCD.into()],
            Some(template(None, "1.0.0").replace("__LOG_LEVEL__", "__LOGLEVEL__")),
            "unknown placeholder __LOGLEVEL__",
        ),
        (vec![], None, "no etcd endpoints"),
        (vec!["--etcd-endpoints=".into()], None, "no etcd endpoints"),
        (
            vec![ETCD.into()],
            Some(
                template(None, "1.0.0")
                    .replace("\"mtu\"", "\"mtu_\"")
                    .replace("\"type\": \"dataplane\"", "\"type\": \"bridge\""),
            ),
            "one plugin of type dataplane",
        ),
        (
            vec![ETCD.into(), "--mtu".into(), "20".into()],
            None,
            "mtu 20 is out of range",
        ),
        (
            vec![ETCD.into(), "--binary".into(), "/nonexistent/dp".into()],
            None,
            "cannot read the binary",
        ),
    ];
    for (args, tpl_text, want) in cases {
        let mut args = args;
        if let Some(t) = &tpl_text {
            fs::write(&tpl, t).unwrap();
            args.push("--network-config-template".into());
            args.push(tpl.display().to_string());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = host.run(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
        if tpl_text.is_some() {
            fs::remove_file(&tpl).unwrap();
        }
        assert_eq!(host.tree(), empty, "{args:?} wrote something");
    }
    // The template from the environment, as the DaemonSet passes the ConfigMap's key.
    let out = host
        .command(&[ETCD])
        .env("CNI_NETWORK_CONFIG", template(Some(1234), "1.0.0"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(conf_json(&host)["plugins"][0]["mtu"], 1234);
}
