//! etcd with mutual TLS, as the seed's deployment runs it: certificates made by the test; ctl,
//! the agent and the CNI plugin connect with them; a wrong CA, an expired client
//! certificate, a missing one and a plaintext URL each fail with a clear error, never by
//! falling back to plaintext.

use std::time::{Duration, Instant};

use dataplane_tests::{
    Agent, Cluster, PinDirGuard,
    cluster::{Etcd, TlsFiles},
    cni::{PluginDir, Sandbox, cni, dataplane_conf, result_ip},
    dataplane, require_root,
};
use serde_json::json;

fn ctl(cluster: &Cluster, endpoint: &str, tls: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let mut all = vec!["ctl", "--etcd-endpoints", endpoint];
    for (flag, file) in tls {
        all.push(flag);
        all.push(file);
    }
    all.extend_from_slice(args);
    let (st, out, err) = dataplane(&cluster.nodes[0].ns, &all);
    (st.success(), format!("{out}{err}"))
}

#[test]
fn root_mutual_tls_works_and_every_bad_credential_fails_clearly() {
    require_root();
    let cluster = Cluster::new(&[1], false);
    let certs = TlsFiles::generate();
    let etcd = Etcd::start_tls(&cluster.fabric, &certs);
    let url = etcd.endpoint();
    assert!(url.starts_with("https://"));
    let good = [
        ("--etcd-ca", certs.path("ca.pem")),
        ("--etcd-cert", certs.path("client.pem")),
        ("--etcd-key", certs.path("client-key.pem")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tls-pool}\nspec: {cidr: 10.70.0.0/16, ipipMode: Always}\n",
    )
    .unwrap();
    let pool = pool.display().to_string();

    let (ok, out) = ctl(&cluster, &url, &good, &["apply", "-f", &pool]);
    assert!(ok, "{out}");
    let (ok, out) = ctl(&cluster, &url, &good, &["get", "ippool", "tls-pool"]);
    assert!(ok && out.contains("10.70.0.0/16"), "{out}");

    // Each bad credential: a non-zero exit, an error line, nothing read.
    let mut wrong_ca = good.clone();
    wrong_ca[0].1 = certs.path("other-ca.pem");
    let mut expired = good.clone();
    expired[1].1 = certs.path("expired.pem");
    expired[2].1 = certs.path("expired-key.pem");
    let ca_only = [good[0].clone()];
    for (what, creds) in [
        ("a CA that did not sign the server", &wrong_ca[..]),
        ("an expired client certificate", &expired[..]),
        ("no client certificate", &ca_only[..]),
    ] {
        let started = Instant::now();
        let (ok, out) = ctl(&cluster, &url, creds, &["get", "ippool", "tls-pool"]);
        assert!(!ok, "{what}: succeeded: {out}");
        eprintln!("{what}: {}", out.trim());
        if creds[0].1 == wrong_ca[0].1 {
            // Verified on our side: the error names the server's certificate. (A refused
            // client certificate is the server's verdict; TLS 1.3 may report it only as a
            // closed connection.)
            assert!(out.contains("certificate"), "{what}: {out}");
        }
        assert!(out.contains("error"), "{what}: {out}");
        assert!(!out.contains("10.70.0.0/16"), "{what}: read data: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    // Plaintext: refused before connecting when TLS files are given, and an http:// URL to
    // the TLS server fails rather than finding any other way in.
    let plain = url.replace("https://", "http://");
    let (ok, out) = ctl(&cluster, &plain, &good, &["get", "ippool"]);
    assert!(!ok && out.contains("plaintext"), "{out}");
    let (ok, out) = ctl(&cluster, &plain, &[], &["get", "ippool", "tls-pool"]);
    assert!(!ok && !out.contains("10.70.0.0/16"), "{out}");

    // The agent syncs over TLS: it registers its node and reports its status.
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    let tls_args: Vec<&str> = good.iter().flat_map(|(f, v)| [*f, v.as_str()]).collect();
    let agent = Agent::start(node, &pins, Some(&etcd), &tls_args);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = ctl(&cluster, &url, &good, &["get", "node", &node.name]);
        if ok && out.contains(&node.ip.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node not registered over TLS: {out}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The CNI plugin with the seed's TLS keys in its config.
    let plugins = PluginDir::new();
    let mut conf = dataplane_conf("1.0.0", &url, &node.name);
    conf["etcd_ca_cert_file"] = json!(certs.path("ca.pem"));
    conf["etcd_cert_file"] = json!(certs.path("client.pem"));
    conf["etcd_key_file"] = json!(certs.path("client-key.pem"));
    let sb = Sandbox::new(node, "default", "tls-pod");
    let ip = result_ip(&cni(node, &plugins, "ADD", &sb, &conf).ok());
    assert_eq!(
        ip.octets()[..2],
        [10, 70],
        "{ip} not from the TLS-written pool"
    );
    // And with the wrong CA it fails with the spec's error JSON.
    conf["etcd_ca_cert_file"] = json!(certs.path("other-ca.pem"));
    let sb2 = Sandbox::new(node, "default", "tls-pod-2");
    let out = cni(node, &plugins, "ADD", &sb2, &conf);
    assert!(out.err_code() > 0, "{out:?}");
    drop(agent);
}
