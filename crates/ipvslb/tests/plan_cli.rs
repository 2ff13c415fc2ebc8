//! `ipvslb plan` as a user runs it: the real binary over the repository's examples and over
//! broken manifests written to a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(dir)
}

fn ipvslb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipvslb"))
        .args(args)
        .env_remove("IPVSLB_LOAD_BALANCER_CLASS")
        .env_remove("IPVSLB_UNCLASSED_SERVICES")
        .output()
        .expect("the ipvslb binary runs")
}

fn plan_json(paths: &[PathBuf]) -> Value {
    let mut args = vec!["plan", "-o", "json"];
    for p in paths {
        args.extend(["-f", p.to_str().unwrap()]);
    }
    let out = ipvslb(&args);
    assert!(
        out.status.success(),
        "plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plan -o json prints one JSON object")
}

fn service<'a>(plan: &'a Value, namespace: &str, name: &str) -> &'a Value {
    plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["namespace"] == namespace && s["name"] == name)
        .unwrap_or_else(|| panic!("{namespace}/{name} is not in the plan: {plan}"))
}

fn virtual_service<'a>(plan: &'a Value, address: &str, protocol: &str, port: u64) -> &'a Value {
    plan["ipvs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["address"] == address && v["protocol"] == protocol && v["port"] == port)
        .unwrap_or_else(|| panic!("{protocol} {address}:{port} is not in the plan: {plan}"))
}

fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ipvslb-plan-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

#[test]
fn whoami_gets_the_first_vip_and_is_routed_to_both_nodes() {
    let plan = plan_json(&[examples("whoami")]);
    let whoami = service(&plan, "default", "whoami");
    assert_eq!(whoami["ingress"], serde_json::json!(["10.240.0.210"]));
    assert_eq!(whoami["pool"], "default");
    assert_eq!(whoami["reason"], Value::Null);
    let vs = virtual_service(&plan, "10.240.0.210", "TCP", 80);
    assert_eq!(vs["scheduler"], "rr");
    assert_eq!(
        vs["destinations"],
        serde_json::json!([
            {"address": "10.240.0.101", "port": 80, "forwarding": "Route", "weight": 1},
            {"address": "10.240.0.102", "port": 80, "forwarding": "Route", "weight": 1}
        ])
    );
    assert_eq!(plan["ipvs"].as_array().unwrap().len(), 1);
}

#[test]
fn whoami_text_output_shows_the_external_ip_and_the_ipvsadm_listing() {
    let out = ipvslb(&["plan", "-f", examples("whoami").to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text
        .lines()
        .find(|l| l.contains("whoami"))
        .expect("a row for whoami");
    assert!(row.contains("10.240.0.210"), "{text}");
    assert!(text.contains("TCP  10.240.0.210:80 rr"), "{text}");
    let routes = text
        .lines()
        .filter(|l| l.trim_start().starts_with("-> 10.240.0.10") && l.contains("Route"))
        .count();
    assert_eq!(routes, 2, "{text}");
    // the Deployment is not ours to read, and plan says so
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignored apps/v1/Deployment"));
}

#[test]
fn dual_stack_service_gets_one_vip_per_family_primary_first() {
    let plan = plan_json(&[examples("dual-stack")]);
    let web = service(&plan, "default", "web");
    let ingress = web["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "{web}");
    assert!(
        ingress[0].as_str().unwrap().contains(':'),
        "IPv6 is listed first: {web}"
    );
    assert!(ingress[1].as_str().unwrap().contains('.'), "{web}");
    let dns = service(&plan, "default", "dns");
    assert_eq!(dns["ingress"], serde_json::json!(["2001:db8:240::53"]));
    let udp = virtual_service(&plan, "2001:db8:240::53", "UDP", 53);
    let dests = udp["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 2);
    assert!(
        dests
            .iter()
            .all(|d| d["port"] == 30053 && d["forwarding"] == "Masq"),
        "{udp}"
    );
    assert!(
        dests
            .iter()
            .all(|d| d["address"].as_str().unwrap().starts_with("fd00:240::")),
        "{udp}"
    );
}

#[test]
fn services_with_one_sharing_key_share_a_vip_unless_their_ports_collide() {
    let plan = plan_json(&[examples("shared-ip")]);
    let tcp = &service(&plan, "dns", "dns-tcp")["ingress"];
    let udp = &service(&plan, "dns", "dns-udp")["ingress"];
    let canary = &service(&plan, "dns", "dns-udp-canary")["ingress"];
    assert_eq!(tcp, udp);
    assert_ne!(udp, canary);
    assert_eq!(canary.as_array().unwrap().len(), 1);
    assert_eq!(plan["ipvs"].as_array().unwrap().len(), 3);
}

#[test]
fn selective_pools_serve_their_namespaces_and_other_classes_are_left_alone() {
    let plan = plan_json(&[examples("selective-pools")]);
    assert_eq!(service(&plan, "shop", "checkout")["pool"], "prod");
    assert_eq!(service(&plan, "sandbox", "playground")["pool"], "general");
    assert_eq!(
        service(&plan, "shop", "partner-api")["ingress"],
        serde_json::json!(["10.240.3.10"])
    );
    // avoidBuggyIPs skips 10.240.1.0
    assert_eq!(
        service(&plan, "shop", "checkout")["ingress"],
        serde_json::json!(["10.240.1.1"])
    );
    let names: Vec<&str> = plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"elsewhere"), "{names:?}");
}

#[test]
fn ignoring_unclassed_services_leaves_whoami_alone() {
    let out = ipvslb(&[
        "plan",
        "-o",
        "json",
        "--unclassed-services",
        "ignore",
        "-f",
        examples("whoami").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["services"], serde_json::json!([]));
    assert_eq!(plan["ipvs"], serde_json::json!([]));
}

#[test]
fn a_pending_service_says_why() {
    let dir = scratch(
        "pending",
        &[(
            "objects.yaml",
            "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {addresses: [10.0.0.1]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x, creationTimestamp: '2024-01-02T00:00:00Z'}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: x, annotations: {ipvslb.io/load-balancer-ips: 'not-an-ip'}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: d, namespace: x, annotations: {ipvslb.io/pool: nope}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n",
        )],
    );
    let plan = plan_json(&[dir]);
    assert_eq!(
        service(&plan, "x", "a")["ingress"],
        serde_json::json!(["10.0.0.1"])
    );
    let reason = |name| {
        service(&plan, "x", name)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        reason("b").contains("tiny"),
        "exhaustion names the pool: {}",
        reason("b")
    );
    assert!(reason("c").contains("not-an-ip"), "{}", reason("c"));
    assert!(reason("d").contains("nope"), "{}", reason("d"));
}

#[test]
fn a_yaml_syntax_error_names_the_file_and_document_and_prints_nothing() {
    let dir = scratch(
        "syntax",
        &[(
            "bad.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\nkind: [unclosed\n",
        )],
    );
    let out = ipvslb(&["plan", "-f", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing is printed half");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("document 2"),
        "{err}"
    );
}

#[test]
fn an_invalid_pool_names_the_object_and_the_field() {
    let dir = scratch(
        "invalid",
        &[(
            "pool.yaml",
            "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: broken}\nspec: {addresses: [10.0.0.0/24, 10.0.1.7/24]}\n",
        )],
    );
    let out = ipvslb(&["plan", "-f", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken") && err.contains("spec.addresses[1]") && err.contains("pool.yaml"),
        "{err}"
    );
}

#[test]
fn a_wrongly_typed_field_names_its_path() {
    let dir = scratch(
        "typed",
        &[(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: LoadBalancer, ports: [{port: eighty}]}\n",
        )],
    );
    let out = ipvslb(&["plan", "-f", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.ports[0].port") && err.contains("document 1"),
        "{err}"
    );
}

#[test]
fn crds_prints_both_custom_resource_definitions() {
    let out = ipvslb(&["crds"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("name: ippools.ipvslb.io") && text.contains("name: nodesets.ipvslb.io"));
}

/// The report that found the overlap bug, reviewed offline: whoami, s1 and s3 hold .210, .211
/// and .213 of `default` in their statuses, and a one-address pool named before it is added.
#[test]
fn a_stray_pool_reviewed_with_plan_moves_nobody_and_is_reported_as_overlapping() {
    let recorded = |name: &str, second: u8, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"2026-01-01T00:00:0{second}Z\"}}\nspec:\n  type: LoadBalancer\n  ports: [{{port: 80}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n"
        )
    };
    let services = [
        recorded("whoami", 1, "10.240.0.210"),
        recorded("s1", 2, "10.240.0.211"),
        recorded("s3", 4, "10.240.0.213"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s4, namespace: default}\nspec:\n  type: LoadBalancer\n  ports: [{port: 80}]\n".to_owned(),
    ]
    .join("---\n");
    let dir = scratch(
        "stray",
        &[
            (
                "pools.yaml",
                "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: default, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec:\n  addresses: [10.240.0.210-10.240.0.215]\n---\napiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: a-stray, creationTimestamp: \"2026-02-01T00:00:00Z\"}\nspec:\n  addresses: [10.240.0.214]\n",
            ),
            ("services.yaml", &services),
        ],
    );
    let plan = plan_json(std::slice::from_ref(&dir));
    for (name, ip) in [
        ("whoami", "10.240.0.210"),
        ("s1", "10.240.0.211"),
        ("s3", "10.240.0.213"),
        ("s4", "10.240.0.212"),
    ] {
        assert_eq!(
            service(&plan, "default", name)["ingress"],
            serde_json::json!([ip]),
            "{name}: {plan}"
        );
    }
    let out = ipvslb(&["plan", "-f", dir.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pool a-stray overlaps pool default on 10.240.0.214"),
        "{text}"
    );
}

#[test]
fn a_restricted_pool_stays_restricted_and_a_single_family_service_gets_one_vip() {
    let dir = scratch(
        "semantics",
        &[
            (
                "pools.yaml",
                "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: prod}\nspec:\n  addresses: [10.240.4.0/29]\n  serviceAllocation: {namespaces: [prod]}\n---\napiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {name: ds}\nspec:\n  addresses: [10.240.5.0/29, \"2001:db8:5::/64\"]\n",
            ),
            (
                "services.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: sneaky, namespace: dev, annotations: {ipvslb.io/pool: prod}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: asks, namespace: dev}\nspec: {type: LoadBalancer, loadBalancerIP: 10.240.4.3, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: v4-cluster, namespace: dev}\nspec: {type: LoadBalancer, ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4], clusterIPs: [10.96.0.20], ports: [{port: 80}]}\n",
            ),
        ],
    );
    let plan = plan_json(std::slice::from_ref(&dir));
    for name in ["sneaky", "asks"] {
        let outcome = service(&plan, "dev", name);
        assert_eq!(outcome["ingress"], serde_json::json!([]), "{name}: {plan}");
        let reason = outcome["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("pool prod serves only namespaces prod, not Service dev/"),
            "{name}: {reason}"
        );
    }
    assert_eq!(
        service(&plan, "dev", "v4-cluster")["ingress"],
        serde_json::json!(["10.240.5.0"]),
        "{plan}"
    );
}

#[test]
fn the_director_tier_example_hashes_each_flow_with_maglev_over_the_nodes() {
    let nodes = examples("whoami").join("nodes.yaml");
    let plan = plan_json(&[nodes, examples("bgp-tier")]);
    assert_eq!(
        service(&plan, "default", "tier-web")["ingress"],
        serde_json::json!(["10.240.0.232"])
    );
    let web = virtual_service(&plan, "10.240.0.232", "TCP", 80);
    assert_eq!(web["scheduler"], "mh", "{web}");
    let dests = web["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 2, "{web}");
    assert!(dests.iter().all(|d| d["forwarding"] == "Route"), "{web}");
}
