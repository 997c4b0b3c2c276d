use serde_json::json;

use super::*;

fn value(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).unwrap()
}

/// The Calico translation of a Kubernetes NetworkPolicy in YAML, as JSON.
fn translate(yaml: &str) -> Result<Value, String> {
    let p = K8sNetworkPolicy::from_value(&value(yaml))?;
    p.to_calico().map(|c| serde_json::to_value(c).unwrap())
}

/// The spec of a translated policy named `p` in `ns` (the YAML gives only the spec).
fn spec(spec_yaml: &str) -> Value {
    let doc = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n{}",
        spec_yaml
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    translate(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))["spec"].clone()
}

fn spec_err(spec_yaml: &str) -> String {
    let doc = format!(
        "metadata: {{name: p, namespace: ns}}\nspec:\n{}",
        spec_yaml
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    translate(&doc).expect_err(&doc)
}

const K8S: &str = "projectcalico.org/orchestrator == 'k8s'";

#[test]
fn deny_all_ingress() {
    let doc = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: prod}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    assert_eq!(
        translate(doc).unwrap(),
        json!({
            "kind": "NetworkPolicy",
            "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "knp.default.deny-all", "namespace": "prod"},
            "spec": {"order": 1000.0, "selector": K8S, "types": ["Ingress"]}
        })
    );
}

#[test]
fn namespace_defaults_to_default() {
    let v = translate("metadata: {name: x}\nspec: {}\n").unwrap();
    assert_eq!(v["metadata"]["namespace"], "default");
    let p = K8sNetworkPolicy::from_value(&value("metadata: {name: x}")).unwrap();
    assert_eq!(
        p.to_calico().unwrap().key(),
        keys::network_policy("default", "knp.default.x")
    );
}

#[test]
fn pod_selector_becomes_the_policy_selector() {
    let s = spec(
        "podSelector:\n  matchLabels: {role: db, app: shop}\n  matchExpressions:\n  - {key: tier, operator: In, values: [a, b]}\n  - {key: env, operator: NotIn, values: [dev]}\n  - {key: example.com/x, operator: Exists}\n  - {key: y, operator: DoesNotExist}\n",
    );
    assert_eq!(
        s["selector"],
        format!(
            "{K8S} && app == 'shop' && role == 'db' && tier in {{'a','b'}} && env not in {{'dev'}} && has(example.com/x) && !has(y)"
        )
    );
}

#[test]
fn label_selector_to_calico() {
    let sel = |y: &str| serde_yaml_ng::from_str::<LabelSelector>(y).unwrap();
    assert_eq!(sel("{}").to_calico().unwrap(), "all()");
    assert_eq!(sel("matchLabels: {a: b}").to_calico().unwrap(), "a == 'b'");
    assert_eq!(sel("matchLabels: {a: ''}").to_calico().unwrap(), "a == ''");
    assert_eq!(sel("matchLabels:").to_calico().unwrap(), "all()");
    assert_eq!(
        sel("matchExpressions: [{key: k, operator: In, values: [x]}]")
            .to_calico_pods()
            .unwrap(),
        format!("{K8S} && k in {{'x'}}")
    );
    assert_eq!(sel("{}").to_calico_pods().unwrap(), K8S);
}

#[test]
fn invalid_label_selectors_are_refused() {
    for (sel, want) in [
        (
            "matchExpressions: [{key: k, operator: In}]",
            "operator In needs at least one value",
        ),
        (
            "matchExpressions: [{key: k, operator: NotIn, values: []}]",
            "operator NotIn needs",
        ),
        (
            "matchExpressions: [{key: k, operator: Exists, values: [a]}]",
            "operator Exists takes no values",
        ),
        (
            "matchExpressions: [{key: k, operator: DoesNotExist, values: [a]}]",
            "takes no values",
        ),
        (
            "matchExpressions: [{key: k, operator: Gt, values: ['1']}]",
            "operator \"Gt\" must be In, NotIn",
        ),
        ("matchLabels: {'a b': c}", "label key \"a b\""),
        ("matchLabels: {a: \"it's\"}", "label value \"it's\""),
        ("matchLabels: {a: -x}", "label value \"-x\""),
        (
            "matchExpressions: [{key: 'x/y/z', operator: Exists}]",
            "label key",
        ),
        (
            "matchExpressions: [{key: k, operator: In, values: [\"a'b\"]}]",
            "label value",
        ),
    ] {
        let e = spec_err(&format!("podSelector:\n  {}", sel.replace('\n', "\n  ")));
        assert!(e.contains(want), "{sel}: {e}");
        assert!(e.starts_with("spec.podSelector."), "{sel}: {e}");
    }
    let e = spec_err("podSelector: {matchLabel: {a: b}}");
    assert!(e.contains("unknown field `matchLabel`"), "{e}");
}

#[test]
fn policy_types_inference() {
    // Omitted: Ingress, plus Egress when there are egress rules (Kubernetes' defaulting).
    assert_eq!(spec("podSelector: {}")["types"], json!(["Ingress"]));
    assert_eq!(spec("ingress: [{}]")["types"], json!(["Ingress"]));
    assert_eq!(spec("egress: [{}]")["types"], json!(["Ingress", "Egress"]));
    assert_eq!(spec("egress: []")["types"], json!(["Ingress"]));
    assert_eq!(
        spec("policyTypes: []\negress: [{}]")["types"],
        json!(["Ingress", "Egress"])
    );
    // Given: exactly those, in Calico's order.
    assert_eq!(spec("policyTypes: [Egress]")["types"], json!(["Egress"]));
    assert_eq!(
        spec("policyTypes: [Egress, Ingress]")["types"],
        json!(["Ingress", "Egress"])
    );
    assert_eq!(
        spec("policyTypes: [Ingress]\negress: [{}]")["types"],
        json!(["Ingress"])
    );
    let e = spec_err("policyTypes: [Both]");
    assert!(e.contains("unknown variant `Both`"), "{e}");
}

#[test]
fn empty_rule_lists_deny() {
    // A direction in force with no rules: no rules at all, which denies.
    let s = spec("policyTypes: [Ingress, Egress]\ningress: []\negress: []");
    assert_eq!(s["types"], json!(["Ingress", "Egress"]));
    assert!(
        s.get("ingress").is_none() && s.get("egress").is_none(),
        "{s}"
    );
    let s = spec("ingress:\negress:\npolicyTypes: [Egress]");
    assert!(s.get("egress").is_none(), "{s}");
}

#[test]
fn an_empty_rule_allows_everything() {
    let s = spec("ingress: [{}]\negress: [{}]");
    assert_eq!(
        s["ingress"],
        json!([{"action": "Allow", "source": {}, "destination": {}}])
    );
    assert_eq!(
        s["egress"],
        json!([{"action": "Allow", "source": {}, "destination": {}}])
    );
    let s = spec("ingress: [{from: [], ports: []}]");
    assert_eq!(
        s["ingress"],
        json!([{"action": "Allow", "source": {}, "destination": {}}])
    );
}

#[test]
fn ingress_peer_forms() {
    let s = spec(
        "ingress:\n- from:\n  - podSelector: {matchLabels: {role: fe}}\n  - namespaceSelector: {matchLabels: {team: a}}\n  - namespaceSelector: {}\n  - podSelector: {}\n    namespaceSelector: {matchLabels: {team: b}}\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.0/24]}\n",
    );
    assert_eq!(
        s["ingress"],
        json!([
            {"action": "Allow", "source": {"selector": format!("{K8S} && role == 'fe'")}, "destination": {}},
            {"action": "Allow", "source": {"selector": K8S, "namespaceSelector": "team == 'a'"}, "destination": {}},
            {"action": "Allow", "source": {"selector": K8S, "namespaceSelector": "all()"}, "destination": {}},
            {"action": "Allow", "source": {"selector": K8S, "namespaceSelector": "team == 'b'"}, "destination": {}},
            {"action": "Allow", "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16", "10.2.3.0/24"]}, "destination": {}},
        ])
    );
}

#[test]
fn egress_peers_and_ports_go_on_the_destination() {
    let s = spec(
        "policyTypes: [Egress]\negress:\n- to:\n  - podSelector: {matchLabels: {app: db}}\n    namespaceSelector: {matchLabels: {env: prod}}\n  - ipBlock: {cidr: 192.168.0.0/16}\n  ports:\n  - {port: 5432}\n",
    );
    assert_eq!(
        s["egress"],
        json!([
            {"action": "Allow", "protocol": "TCP", "source": {}, "destination": {
                "selector": format!("{K8S} && app == 'db'"), "namespaceSelector": "env == 'prod'", "ports": [5432]}},
            {"action": "Allow", "protocol": "TCP", "source": {}, "destination": {
                "nets": ["192.168.0.0/16"], "ports": [5432]}},
        ])
    );
    assert!(s.get("ingress").is_none());
}

#[test]
fn ports_group_by_protocol_with_ranges_and_names() {
    let s = spec(
        "ingress:\n- from: [{podSelector: {}}]\n  ports:\n  - {port: 80}\n  - {protocol: UDP, port: 53}\n  - {port: 8000, endPort: 8080}\n  - {port: http}\n  - {protocol: TCP, port: 80}\n  - {protocol: SCTP, port: 9, endPort: 9}\n",
    );
    assert_eq!(
        s["ingress"],
        json!([
            {"action": "Allow", "protocol": "SCTP", "source": {"selector": K8S}, "destination": {"ports": [9]}},
            {"action": "Allow", "protocol": "TCP", "source": {"selector": K8S}, "destination": {"ports": [80, "8000:8080", "http"]}},
            {"action": "Allow", "protocol": "UDP", "source": {"selector": K8S}, "destination": {"ports": [53]}},
        ])
    );
}

#[test]
fn a_port_entry_without_a_port_allows_every_port_of_its_protocol() {
    let s = spec(
        "ingress:\n- ports:\n  - {protocol: UDP}\n  - {protocol: UDP, port: 53}\n  - {port: 22}\n",
    );
    assert_eq!(
        s["ingress"],
        json!([
            {"action": "Allow", "protocol": "TCP", "source": {}, "destination": {"ports": [22]}},
            {"action": "Allow", "protocol": "UDP", "source": {}, "destination": {}},
        ])
    );
    // `{}`: TCP (the default protocol), every port.
    let s = spec("ingress:\n- ports: [{}]\n");
    assert_eq!(
        s["ingress"],
        json!([{"action": "Allow", "protocol": "TCP", "source": {}, "destination": {}}])
    );
}

#[test]
fn ports_times_peers() {
    let s = spec(
        "ingress:\n- from:\n  - podSelector: {matchLabels: {a: x}}\n  - ipBlock: {cidr: 10.0.0.1/24}\n  ports:\n  - {port: 80}\n  - {protocol: UDP, port: 53}\n",
    );
    let rules = s["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 4);
    let summary: Vec<(String, Value)> = rules
        .iter()
        .map(|r| {
            (
                r["protocol"].as_str().unwrap().to_owned(),
                r["source"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "TCP".into(),
                json!({"selector": format!("{K8S} && a == 'x'")})
            ),
            ("TCP".into(), json!({"nets": ["10.0.0.0/24"]})),
            (
                "UDP".into(),
                json!({"selector": format!("{K8S} && a == 'x'")})
            ),
            ("UDP".into(), json!({"nets": ["10.0.0.0/24"]})),
        ]
    );
}

#[test]
fn several_rules_concatenate() {
    let s = spec("ingress:\n- ports: [{port: 80}]\n- from: [{namespaceSelector: {}}]\n");
    let rules = s["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0]["destination"]["ports"], json!([80]));
    assert_eq!(rules[1]["source"]["namespaceSelector"], "all()");
}

#[test]
fn ipv6_ip_blocks() {
    let s = spec("ingress:\n- from:\n  - ipBlock: {cidr: 'fd00::/64', except: ['fd00::/96']}\n");
    assert_eq!(
        s["ingress"][0]["source"],
        json!({"nets": ["fd00::/64"], "notNets": ["fd00::/96"]})
    );
}

#[test]
fn bad_ports_protocols_and_cidrs_are_refused() {
    for (rule, want) in [
        (
            "ports: [{port: 0}]",
            "spec.ingress[0].ports[0].port 0 is outside 1..=65535",
        ),
        ("ports: [{port: 65536}]", "port 65536 is outside"),
        ("ports: [{port: -1}]", "port -1 is outside"),
        (
            "ports: [{port: 80, endPort: 79}]",
            "endPort 79 is below port 80",
        ),
        (
            "ports: [{port: 80, endPort: 70000}]",
            "endPort 70000 is outside",
        ),
        ("ports: [{endPort: 90}]", "endPort needs a port"),
        (
            "ports: [{port: http, endPort: 90}]",
            "endPort needs a numeric port",
        ),
        ("ports: [{port: '80'}]", "port name \"80\""),
        ("ports: [{port: Http}]", "port name \"Http\""),
        ("ports: [{port: a-very-long-port-name}]", "port name"),
        (
            "ports: [{protocol: ICMP}]",
            "protocol \"ICMP\" must be TCP, UDP or SCTP",
        ),
        (
            "ports: [{protocol: tcp, port: 80}]",
            "protocol \"tcp\" must be TCP",
        ),
        ("ports: [{prot: TCP}]", "unknown field `prot`"),
        (
            "from: [{ipBlock: {cidr: nope}}]",
            "spec.ingress[0].from[0].ipBlock.cidr \"nope\" is not a CIDR",
        ),
        ("from: [{ipBlock: {cidr: 10.0.0.1}}]", "is not a CIDR"),
        ("from: [{ipBlock: {cidr: 10.0.0.0/33}}]", "is not a CIDR"),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]",
            "except[0] 11.0.0.0/16 is not strictly inside cidr 10.0.0.0/8",
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]",
            "not strictly inside",
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]",
            "not strictly inside",
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/8, except: [x]}}]",
            "except[0] \"x\" is not a CIDR",
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]",
            "ipBlock cannot be combined",
        ),
        (
            "from: [{}]",
            "a peer needs podSelector, namespaceSelector or ipBlock",
        ),
        ("form: [{podSelector: {}}]", "unknown field `form`"),
        (
            "from: [{namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]",
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0]",
        ),
    ] {
        let e = spec_err(&format!("ingress:\n- {rule}"));
        assert!(e.contains(want), "{rule}: {e}");
    }
    let e = spec_err("egress:\n- to: [{ipBlock: {cidr: bad}}]");
    assert!(e.contains("spec.egress[0].to[0].ipBlock.cidr"), "{e}");
    let e = spec_err("ingres: []");
    assert!(e.contains("unknown field `ingres`"), "{e}");
}

#[test]
fn bad_names_are_refused() {
    for (meta, want) in [
        ("{name: Bad}", "metadata.name \"Bad\""),
        ("{name: ''}", "metadata.name \"\""),
        ("{name: a, namespace: x.y}", "metadata.namespace \"x.y\""),
        ("{name: a, namespace: -x}", "metadata.namespace"),
    ] {
        let e = translate(&format!("metadata: {meta}\nspec: {{}}")).unwrap_err();
        assert!(e.contains(want), "{meta}: {e}");
    }
    let long = "a".repeat(250);
    let e = translate(&format!("metadata: {{name: {long}}}\nspec: {{}}")).unwrap_err();
    assert!(e.contains("too long"), "{e}");
}

#[test]
fn namespace_to_profile() {
    let ns = K8sNamespace::from_value(&value(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n  labels: {team: a, kubernetes.io/metadata.name: spoofed}\n  annotations: {x: y}\n",
    ))
    .unwrap();
    let p = ns.to_profile().unwrap();
    assert_eq!(
        serde_json::to_value(&p).unwrap(),
        json!({
            "kind": "Profile",
            "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "kns.prod"},
            "spec": {
                "labelsToApply": {"team": "a", "kubernetes.io/metadata.name": "prod"},
                "ingress": [{"action": "Allow"}],
                "egress": [{"action": "Allow"}]
            }
        })
    );
    let bare = K8sNamespace::from_value(&value("metadata: {name: dev}")).unwrap();
    assert_eq!(
        bare.to_profile().unwrap().labels_to_apply(),
        BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "dev".to_owned())])
    );
    for (meta, want) in [
        ("{name: Prod}", "metadata.name \"Prod\""),
        ("{name: a.b}", "metadata.name"),
        ("{name: a, labels: {'x y': z}}", "label key"),
        ("{name: a, labels: {x: 'y z'}}", "label value"),
    ] {
        let e = K8sNamespace::from_value(&value(&format!("metadata: {meta}")))
            .unwrap()
            .to_profile()
            .unwrap_err();
        assert!(e.contains(want), "{meta}: {e}");
    }
}

#[test]
fn pods_are_stored_trimmed_with_named_ports() {
    let pod = K8sPod::from_manifest(&value(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  labels: {app: web}\n  annotations: {a: b}\nspec:\n  nodeName: node-1\n  containers:\n  - name: web\n    image: nginx\n    ports:\n    - {name: http, containerPort: 80}\n    - {containerPort: 9090}\n  - name: dns\n    ports:\n    - {name: dns, containerPort: 53, protocol: UDP, hostPort: 5353}\nstatus: {phase: Running}\n",
    ))
    .unwrap();
    assert_eq!(pod.key(), "/calico/k8s/pods/default/web-0");
    assert_eq!(
        serde_json::to_value(&pod).unwrap(),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [
                {"name": "web", "ports": [
                    {"name": "http", "containerPort": 80, "protocol": "TCP"},
                    {"containerPort": 9090, "protocol": "TCP"}]},
                {"name": "dns", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}
            ]}
        })
    );
    assert_eq!(pod.labels()["app"], "web");
    let ports = pod.named_ports();
    assert_eq!(
        serde_json::to_value(&ports).unwrap(),
        json!([
            {"name": "http", "protocol": "TCP", "port": 80},
            {"name": "dns", "protocol": "UDP", "port": 53}
        ])
    );
    // What is stored reads back as the same pod.
    let back: K8sPod = serde_json::from_value(serde_json::to_value(&pod).unwrap()).unwrap();
    assert_eq!(back, pod);
    let bare = K8sPod::from_manifest(&value("metadata: {name: p, namespace: ns}")).unwrap();
    assert!(bare.named_ports().is_empty() && bare.labels().is_empty());
    assert_eq!(bare.key(), "/calico/k8s/pods/ns/p");
}

#[test]
fn bad_pods_are_refused() {
    for (spec, want) in [
        (
            "containers: [{ports: [{containerPort: 0}]}]",
            "spec.containers[0].ports[0].containerPort 0 is outside",
        ),
        (
            "containers: [{ports: [{containerPort: 70000}]}]",
            "containerPort 70000 is outside",
        ),
        (
            "containers: [{ports: [{containerPort: http}]}]",
            "is not a port number",
        ),
        (
            "containers: [{ports: [{name: x}]}]",
            "containerPort is required",
        ),
        (
            "containers: [{}, {ports: [{containerPort: 80, protocol: ICMP}]}]",
            "spec.containers[1].ports[0].protocol \"ICMP\"",
        ),
        (
            "containers: [{ports: [{containerPort: 80, name: HTTP}]}]",
            "port name \"HTTP\"",
        ),
    ] {
        let e = K8sPod::from_manifest(&value(&format!("metadata: {{name: p}}\nspec: {{{spec}}}")))
            .unwrap_err();
        assert!(e.contains(want), "{spec}: {e}");
    }
    let e = K8sPod::from_manifest(&value("metadata: {name: P}")).unwrap_err();
    assert!(e.contains("metadata.name \"P\""), "{e}");
    let e = K8sPod::from_manifest(&value("metadata: {name: p, labels: {a: 'b c'}}")).unwrap_err();
    assert!(e.contains("label value"), "{e}");
}

#[test]
fn name_rules() {
    assert!(check_dns_label("n", "a-1").is_ok());
    assert!(check_dns_label("n", &"a".repeat(64)).is_err());
    assert!(check_dns_subdomain("n", "a.b-c.d").is_ok());
    assert!(check_dns_subdomain("n", "a..b").is_err());
    assert!(check_dns_subdomain("n", "a.-b").is_err());
    assert!(check_label_key("app.kubernetes.io/name").is_ok());
    assert!(check_label_key("A_b.c").is_ok());
    assert!(check_label_key("/x").is_err());
    assert!(check_label_key("Example.com/x").is_err());
    assert!(check_label_value("").is_ok());
    assert!(check_label_value("v1.2_x").is_ok());
    assert!(check_label_value(&"a".repeat(64)).is_err());
    assert!(check_port_name("http-alt").is_ok());
    assert!(check_port_name("h--x").is_err());
    assert!(check_port_name("-h").is_err());
    assert!(check_port_name("123").is_err());
}
