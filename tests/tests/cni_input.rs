//! Malformed CNI input: stdin and environment, generated and mutated, never make the plugin
//! panic; every failure is the spec's error object with a code. Runs in-process through
//! `dataplane::cni::invoke` (no etcd is reached: input errors stop it before).

use std::collections::BTreeMap;

use dataplane::cni::{PluginKind, invoke, types::CniError};
use proptest::prelude::*;

const VALID: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"dataplane","etcd_endpoints":"http://127.0.0.1:1","ipam":{"type":"dataplane-ipam"}}"#;

fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> (bool, String) {
    let out = invoke(PluginKind::Main, |k| env.get(k).cloned(), stdin);
    (out.success, out.stdout)
}

fn assert_spec_error(stdout: &str) -> CniError {
    let e: CniError = serde_json::from_str(stdout)
        .unwrap_or_else(|err| panic!("not a CNI error object ({err}): {stdout}"));
    assert!(e.code > 0, "{stdout}");
    assert!(!e.msg.is_empty(), "{stdout}");
    e
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn known_bad_inputs_get_the_right_codes() {
    let add = env(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]);
    type Case<'a> = (BTreeMap<String, String>, &'a [u8], u32, &'a str);
    let cases: Vec<Case> = vec![
        (add.clone(), b"", 6, "empty stdin"),
        (add.clone(), b"{not json", 6, "broken JSON"),
        (
            add.clone(),
            br#"{"cniVersion":"9.9.9","type":"dataplane"}"#,
            1,
            "unknown version",
        ),
        (add.clone(), br#"{"type":"dataplane"}"#, 7, "no cniVersion"),
        (
            add.clone(),
            br#"{"cniVersion":"1.0.0","type":"dataplane","mtu":5}"#,
            7,
            "mtu out of range",
        ),
        (
            add.clone(),
            br#"{"cniVersion":"1.0.0","type":"dataplane","mtu":"big"}"#,
            6,
            "mtu of the wrong type",
        ),
        (
            env(&[("CNI_COMMAND", "FROB")]),
            VALID.as_bytes(),
            4,
            "unknown command",
        ),
        (env(&[]), VALID.as_bytes(), 4, "no command"),
        (
            env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "junk")]),
            VALID.as_bytes(),
            4,
            "bad CNI_ARGS",
        ),
        (
            env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "eth0"),
            ]),
            VALID.as_bytes(),
            4,
            "no container ID",
        ),
        (
            env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "much-too-long-ifname"),
            ]),
            VALID.as_bytes(),
            4,
            "ifname too long",
        ),
        (
            env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c1")]),
            br#"{"cniVersion":"0.3.1","type":"dataplane"}"#,
            1,
            "CHECK before 0.4.0",
        ),
        (
            env(&[("CNI_COMMAND", "GC")]),
            br#"{"cniVersion":"1.0.0","type":"dataplane"}"#,
            1,
            "GC before 1.1.0",
        ),
    ];
    for (env, stdin, code, what) in cases {
        let (ok, out) = run(&env, stdin);
        assert!(!ok, "{what}: should fail");
        let e = assert_spec_error(&out);
        assert_eq!(e.code, code, "{what}: {out}");
    }
}

#[test]
fn version_answers_without_a_config() {
    let (ok, out) = run(&env(&[("CNI_COMMAND", "VERSION")]), b"");
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let (ok, out) = run(
        &env(&[("CNI_COMMAND", "VERSION")]),
        br#"{"cniVersion":"0.4.0"}"#,
    );
    assert!(ok);
    assert!(out.contains(r#""cniVersion":"0.4.0""#), "{out}");
}

fn mutate(base: &[u8], edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(i, b) in edits {
        if !v.is_empty() {
            let i = i % v.len();
            v[i] = b;
        }
    }
    v.truncate(cut % (v.len() + 1));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_stdin_never_panics(stdin in proptest::collection::vec(any::<u8>(), 0..300),
                                 command in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add"])) {
        let env = env(&[("CNI_COMMAND", command), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]);
        let (ok, out) = run(&env, &stdin);
        if !ok { assert_spec_error(&out); }
    }

    #[test]
    fn mutated_config_never_panics(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                                   cut in any::<usize>(),
                                   args in "[A-Za-z0-9_=;]{0,40}",
                                   ifname in "[a-z0-9/ ]{0,20}",
                                   cid in "[ -~]{0,20}") {
        let stdin = mutate(VALID.as_bytes(), &edits, cut);
        // Keep the netns missing so that nothing reaches the network or etcd.
        let env = env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", &cid), ("CNI_NETNS", "/nonexistent/netns"),
                        ("CNI_IFNAME", &ifname), ("CNI_ARGS", &args)]);
        let (ok, out) = run(&env, &stdin);
        if !ok { assert_spec_error(&out); }
    }
}
