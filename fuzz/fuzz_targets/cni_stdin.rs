//! The CNI plugin's input: environment and stdin, read and checked up to the first side effect
//! (`dataplane::cni::request`), then everything each command derives from them without
//! touching the machine. Never a panic; every error is one of the spec's codes (or ours from
//! 100) in an error object that serialises and reads back.
//!
//! Input: the environment, one `NAME=VALUE` per line, up to the first empty line; the rest is
//! stdin, as is. Seeds in `corpus/cni_stdin/`.
#![no_main]

use dataplane::cni::{
    PluginKind,
    request::{Call, parse_call},
    types::{CniError, CniResult, SUPPORTED_VERSIONS, code},
};
use libfuzzer_sys::fuzz_target;

const CODES: [u32; 14] = [
    code::INCOMPATIBLE_VERSION,
    code::UNSUPPORTED_FIELD,
    code::UNKNOWN_CONTAINER,
    code::INVALID_ENV,
    code::IO_FAILURE,
    code::DECODE,
    code::INVALID_CONFIG,
    code::TRY_AGAIN,
    code::NOT_AVAILABLE,
    code::INTERNAL,
    code::IPAM_EXHAUSTED,
    code::DATASTORE,
    code::CHECK_FAILED,
    code::DELEGATE,
];

fn check_error(e: &CniError) {
    assert!(
        CODES.contains(&e.code),
        "code {} is not a known one: {e:?}",
        e.code
    );
    assert!(!e.msg.is_empty(), "error without a message: {e:?}");
    assert!(
        SUPPORTED_VERSIONS.contains(&e.cni_version.as_str()),
        "error in version {:?}",
        e.cni_version
    );
    let text = serde_json::to_string(e).expect("an error object serialises");
    let back: CniError = serde_json::from_str(&text).expect("an error object reads back");
    assert_eq!(&back, e);
}

fuzz_target!(|data: &[u8]| {
    let (env_part, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let env_text = String::from_utf8_lossy(env_part);
    let vars: Vec<(&str, &str)> = env_text.lines().filter_map(|l| l.split_once('=')).collect();
    // The last assignment of a name wins, as in a shell.
    let get = |k: &str| {
        vars.iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    };
    match parse_call(get, stdin) {
        Err(e) => check_error(&e),
        Ok(Call::Version(answer)) => {
            let v: serde_json::Value = serde_json::from_str(&answer).expect("VERSION answers JSON");
            let version = v["cniVersion"].as_str().expect("cniVersion in the answer");
            assert!(SUPPORTED_VERSIONS.contains(&version), "{answer}");
        }
        Ok(Call::Command(req)) => {
            let version = req.conf.cni_version.as_str();
            assert!(SUPPORTED_VERSIONS.contains(&version), "{version}");
            if req.env.command == "CHECK" {
                assert!(req.prev_ip.is_some(), "CHECK without prevResult's address");
            }
            for kind in [PluginKind::Main, PluginKind::Ipam] {
                if let Err(e) = req.ours(kind) {
                    check_error(&e.version(version));
                }
            }
            if let Err(e) = req.ipam_type() {
                check_error(&e.version(version));
            }
            match req.etcd_config() {
                Ok(cfg) => assert!(
                    !cfg.endpoints.is_empty() && cfg.endpoints.iter().all(|e| !e.trim().is_empty())
                ),
                Err(e) => check_error(&e.version(version)),
            }
            match req.pool_options() {
                // What ensure_default_pool would write, checked as it checks it.
                Ok(opts) => {
                    let _ = opts.to_pool().validate();
                }
                Err(e) => check_error(&e.version(version)),
            }
            let _ = req.ipam_config();
            let _ = req.valid_containers();
            let veth = req.host_veth();
            assert!(
                veth.len() <= 15 && veth.starts_with("cali"),
                "host veth name {veth:?}"
            );
            let _ = req.handle_id();
            for node in ["node-1", "", "n-"] {
                let key = req.endpoint_key(node);
                assert!(key.starts_with(dataplane::datastore::keys::WORKLOAD_ENDPOINTS));
            }
            // What a result in the config's version looks like (ADD's output).
            if let Some(prev) = &req.conf.prev_result
                && let Ok(r) = serde_json::from_value::<CniResult>(prev.clone())
            {
                let out = serde_json::to_string(&r.in_version(version)).expect("result serialises");
                let _: serde_json::Value = serde_json::from_str(&out).expect("result reads back");
            }
        }
    }
});
