//! The allocator and director against a real kube-apiserver and etcd, driven with the real
//! kubectl. Every assertion reads what the API server returns (or the director's table).

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use common::{
    Controllers, Ipvslb, Relay, body, classes, cluster, eventually, http_get, ingress,
    make_nodes_ready, service_yaml, status, turn, wait_ingress,
};
use ipvslb_api::IPPool;
use ipvslb_ipvs::{Protocol, ServiceKey};
use k8s_openapi::api::core::v1::{Event, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};

const SECOND: Duration = Duration::from_secs(1);

/// A pool of load-balancer `class` (the test controllers' own) for `namespaces`.
fn pool_yaml(name: &str, class: &str, addresses: &[&str], namespaces: &[&str]) -> String {
    let addresses: String = addresses.iter().map(|a| format!("  - {a}\n")).collect();
    let namespaces = namespaces
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  loadBalancerClass: {class}\n  addresses:\n{addresses}  serviceAllocation:\n    namespaces: [{namespaces}]\n"
    )
}

async fn warning_events(client: &kube::Client, namespace: &str, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name) && e.type_.as_deref() == Some("Warning")
        })
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_apply_and_kubectl_get_ippools_shows_what_is_used() {
    let cluster = cluster();
    let (_turn, client) = turn(&["default"]).await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/whoami");
    let out = cluster.kubectl(&["apply", "-f", examples.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    make_nodes_ready(cluster);
    let controllers = Controllers::start(
        &client,
        ipvslb::translate::ClassPolicy {
            class: "ipvslb.io/ipvs".into(),
            unclassed: ipvslb::translate::Unclassed::Serve,
        },
    );
    wait_ingress(&client, "default", "whoami", &["10.240.0.210"], 10 * SECOND).await;
    let row = eventually(
        "kubectl get ippools to show 1 assigned",
        10 * SECOND,
        || async {
            let out = cluster.kubectl(&["get", "ippools"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let row = text.lines().find(|l| l.starts_with("default"))?.to_owned();
            let header = text.lines().next()?.to_owned();
            assert!(
                header.contains("ADDRESSES")
                    && header.contains("ASSIGNED")
                    && header.contains("AVAILABLE")
                    && header.contains("NODESET"),
                "{header}"
            );
            let cells: Vec<&str> = row.split_whitespace().collect();
            (cells.get(3) == Some(&"1")).then_some(row)
        },
    )
    .await;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "[\"10.240.0.210-10.240.0.215\"]", "{row}");
    assert_eq!(cells[2], "true", "{row}");
    assert_eq!(cells[4], "5", "{row}");
    assert_eq!(cells[5], "default", "{row}");
    // The director programmed the table of the write-up.
    let key = ServiceKey::addr("10.240.0.210".parse().unwrap(), Protocol::Tcp, 80);
    eventually(
        "the director to route whoami to both nodes",
        10 * SECOND,
        || async {
            let table = controllers.dataplane.table().ok()?;
            let dests: Vec<IpAddr> = table
                .services
                .get(&key)?
                .destinations
                .values()
                .map(|d| d.address)
                .collect();
            (dests.len() == 2).then_some(())
        },
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = services.get("whoami").await.unwrap();
    assert_eq!(
        svc.annotations()
            .get("ipvslb.io/assigned-pool")
            .map(String::as_str),
        Some("default")
    );
    let mode = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
        .ip_mode
        .clone();
    assert_eq!(mode.as_deref(), Some("VIP"));
    controllers.stop().await;
    services
        .delete("whoami", &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pools_are_refused_by_kubectl_apply_naming_the_field() {
    let cluster = cluster();
    let (_turn, _client) = turn(&[]).await;
    let cases = [
        ("bad-cidr", "addresses: [10.0.0.0/33]", "spec.addresses[0]"),
        ("host-bits", "addresses: [10.0.0.1/24]", "host bits"),
        ("empty", "addresses: []", "spec.addresses"),
        (
            "mixed-range",
            "addresses: [10.0.0.1-2001:db8::1]",
            "spec.addresses[0]",
        ),
    ];
    for (name, spec, expected) in cases {
        let yaml = format!(
            "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
        );
        let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(err.contains(expected), "{name}: {err}");
    }
    let nodeset = "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: bad}\nspec: {scheduler: fastest}\n";
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], nodeset);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.scheduler"),
        "{err}"
    );
    let flags = "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: bad}\nspec: {scheduler: rr, schedulerFlags: [mh-port]}\n";
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], flags);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mh-port") || err.contains("need scheduler mh"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_service_frees_its_address_and_changing_ports_updates_the_table() {
    let cluster = cluster();
    let (_turn, client) = turn(&["lifecycle"]).await;
    let class = "test.ipvslb.io/lifecycle";
    cluster.apply(&pool_yaml(
        "lifecycle",
        class,
        &["10.250.0.10-10.250.0.11"],
        &["lifecycle"],
    ));
    cluster.apply("apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: default}\nspec: {forwarding: DirectRouting}\n");
    make_nodes_ready(cluster);
    let controllers = Controllers::start(&client, classes(class));
    cluster.apply(&service_yaml("lifecycle", "a", class, &[80], &[]));
    wait_ingress(&client, "lifecycle", "a", &["10.250.0.10"], 5 * SECOND).await;
    cluster.apply(&service_yaml("lifecycle", "b", class, &[80], &[]));
    wait_ingress(&client, "lifecycle", "b", &["10.250.0.11"], 5 * SECOND).await;

    // a moves from port 80 to 8080: the director drops :80 and adds :8080
    cluster.apply(&service_yaml("lifecycle", "a", class, &[8080], &[]));
    let vip: IpAddr = "10.250.0.10".parse().unwrap();
    eventually("the table to follow a's new port", 10 * SECOND, || async {
        let table = controllers.dataplane.table().ok()?;
        let has = |port| {
            table
                .services
                .contains_key(&ServiceKey::addr(vip, Protocol::Tcp, port))
        };
        (has(8080) && !has(80)).then_some(())
    })
    .await;

    let services: Api<Service> = Api::namespaced(client.clone(), "lifecycle");
    services
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    cluster.apply(&service_yaml("lifecycle", "c", class, &[80], &[]));
    wait_ingress(&client, "lifecycle", "c", &["10.250.0.10"], 5 * SECOND).await;
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_the_service_pending_with_a_warning_and_others_untouched() {
    let cluster = cluster();
    let (_turn, client) = turn(&["refusals"]).await;
    let class = "test.ipvslb.io/refusals";
    cluster.apply(&pool_yaml(
        "refusals",
        class,
        &["10.250.1.10"],
        &["refusals"],
    ));
    let controllers = Controllers::start(&client, classes(class));
    cluster.apply(&service_yaml("refusals", "first", class, &[80], &[]));
    wait_ingress(&client, "refusals", "first", &["10.250.1.10"], 5 * SECOND).await;
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 5] = [
        ("exhausted", &[], "refusals"),
        (
            "outside",
            &[("ipvslb.io/load-balancer-ips", "192.0.2.1")],
            "192.0.2.1",
        ),
        (
            "taken",
            &[("ipvslb.io/load-balancer-ips", "10.250.1.10")],
            "refusals/first",
        ),
        ("unknown-pool", &[("ipvslb.io/pool", "nope")], "nope"),
        (
            "bad-annotation",
            &[("ipvslb.io/load-balancer-ips", "ten.dot")],
            "ten.dot",
        ),
    ];
    for (name, annotations, _) in cases {
        cluster.apply(&service_yaml("refusals", name, class, &[80], annotations));
    }
    for (name, _, says) in cases {
        let warnings = eventually(&format!("a warning on {name}"), 10 * SECOND, || async {
            let w = warning_events(&client, "refusals", name).await;
            (!w.is_empty()).then_some(w)
        })
        .await;
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("AllocationFailed") && w.contains(says)),
            "{name}: {warnings:?}"
        );
        let svc: Service = Api::namespaced(client.clone(), "refusals")
            .get(name)
            .await
            .unwrap();
        assert!(ingress(&svc).is_empty(), "{name} must stay pending");
    }
    wait_ingress(&client, "refusals", "first", &["10.250.1.10"], SECOND).await;
    // freeing the address assigns it to a waiting Service
    Api::<Service>::namespaced(client.clone(), "refusals")
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "a pending Service to get the freed address",
        10 * SECOND,
        || async {
            let list = Api::<Service>::namespaced(client.clone(), "refusals")
                .list(&ListParams::default())
                .await
                .ok()?;
            list.items
                .iter()
                .find(|s| ingress(s) == ["10.250.1.10"])
                .map(|_| ())
        },
    )
    .await;
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ip_dual_stack_selective_pools_and_the_class_filter() {
    let cluster = cluster();
    let (_turn, client) = turn(&["shop", "sandbox"]).await;
    let class = "test.ipvslb.io/features";
    cluster.apply(&pool_yaml(
        "shop",
        class,
        &["10.250.2.0/30", "2001:db8:250::/64"],
        &["shop"],
    ));
    cluster.apply(&pool_yaml(
        "sandbox",
        class,
        &["10.250.3.10-10.250.3.20"],
        &["sandbox"],
    ));
    let controllers = Controllers::start(&client, classes(class));
    let share = [("ipvslb.io/allow-shared-ip", "dns")];
    cluster.apply(&service_yaml("shop", "dns-a", class, &[53], &share));
    cluster.apply(&service_yaml("shop", "dns-b", class, &[853], &share));
    cluster.apply(&service_yaml("sandbox", "play", class, &[80], &[]));
    cluster.apply(&service_yaml(
        "sandbox",
        "other-class",
        "example.com/other",
        &[80],
        &[],
    ));
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: LoadBalancer\n  loadBalancerClass: test.ipvslb.io/features\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  ports: [{port: 443}]\n",
    );
    wait_ingress(&client, "shop", "dns-a", &["10.250.2.0"], 5 * SECOND).await;
    wait_ingress(&client, "shop", "dns-b", &["10.250.2.0"], 5 * SECOND).await;
    wait_ingress(&client, "sandbox", "play", &["10.250.3.10"], 5 * SECOND).await;
    wait_ingress(
        &client,
        "shop",
        "web",
        &["2001:db8:250::", "10.250.2.1"],
        5 * SECOND,
    )
    .await;
    tokio::time::sleep(SECOND).await;
    let other: Service = Api::namespaced(client.clone(), "sandbox")
        .get("other-class")
        .await
        .unwrap();
    assert!(ingress(&other).is_empty(), "another class is left alone");
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_addresses_assigns_new_services_and_releases_deleted_ones() {
    let cluster = cluster();
    let (_turn, client) = turn(&["restart"]).await;
    let class = "test.ipvslb.io/restart";
    cluster.apply(&pool_yaml(
        "restart",
        class,
        &["10.250.4.0/29"],
        &["restart"],
    ));
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: default}\nspec: {}\n",
    );
    make_nodes_ready(cluster);
    let first = Controllers::start(&client, classes(class));
    for name in ["a", "b", "c"] {
        cluster.apply(&service_yaml("restart", name, class, &[80], &[]));
    }
    wait_ingress(&client, "restart", "c", &["10.250.4.2"], 5 * SECOND).await;
    first.kill();

    let services: Api<Service> = Api::namespaced(client.clone(), "restart");
    services
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    cluster.apply(&service_yaml("restart", "d", class, &[80], &[]));
    let second = Controllers::start(&client, classes(class));
    wait_ingress(&client, "restart", "b", &["10.250.4.1"], 5 * SECOND).await;
    wait_ingress(&client, "restart", "c", &["10.250.4.2"], 5 * SECOND).await;
    // d gets a's freed address: the lowest free one
    wait_ingress(&client, "restart", "d", &["10.250.4.0"], 5 * SECOND).await;
    let vips: Vec<IpAddr> = ["10.250.4.0", "10.250.4.1", "10.250.4.2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    eventually(
        "the new director's table to hold b, c and d",
        10 * SECOND,
        || async {
            let table = second.dataplane.table().ok()?;
            let keys: Vec<IpAddr> = table.services.keys().filter_map(|k| k.address()).collect();
            (keys == vips).then_some(())
        },
    )
    .await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_allocators_one_assigns_and_the_other_takes_over_within_the_lease() {
    let cluster = cluster();
    let (_turn, client) = turn(&["election", "ipvslb-system"]).await;
    let class = "test.ipvslb.io/election";
    cluster.apply(&pool_yaml(
        "election",
        class,
        &["10.250.5.0/24"],
        &["election"],
    ));
    let timings = ipvslb::leader::Timings {
        lease: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry: Duration::from_millis(300),
    };
    let mut replicas = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let (leading_tx, leading) = tokio::sync::watch::channel(false);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let elector = ipvslb::leader::Elector::new(
            client.clone(),
            "ipvslb-system",
            "election-test",
            identity,
            timings,
        )
        .expect("the test's timings are valid");
        let election = tokio::spawn(elector.run(leading_tx, stop));
        let controllers = Controllers::start_with(&client, classes(class), leading.clone(), None);
        replicas.push((identity, leading, stop_tx, election, controllers));
    }
    for i in 0..20 {
        cluster.apply(&service_yaml(
            "election",
            &format!("s{i}"),
            class,
            &[80],
            &[],
        ));
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "election");
    eventually("all 20 Services assigned", 20 * SECOND, || async {
        let list = services.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .all(|s| ingress(s).len() == 1)
            .then_some(())
    })
    .await;
    let leaders: Vec<&str> = replicas
        .iter()
        .filter(|r| *r.1.borrow())
        .map(|r| r.0)
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {leaders:?}");
    // stop the leader: its lease is released and the other takes over
    let leader = replicas.iter().position(|r| *r.1.borrow()).unwrap();
    let (_, _, stop, election, controllers) = replicas.remove(leader);
    let _ = stop.send(true);
    let _ = election.await;
    controllers.stop().await;
    let (_, standby_leading, ..) = &replicas[0];
    let mut standby = standby_leading.clone();
    tokio::time::timeout(timings.lease + SECOND, standby.wait_for(|l| *l))
        .await
        .expect("the standby leads within the lease duration")
        .unwrap();
    for i in 20..30 {
        cluster.apply(&service_yaml(
            "election",
            &format!("s{i}"),
            class,
            &[80],
            &[],
        ));
    }
    let list = eventually(
        "30 Services assigned by the new leader",
        20 * SECOND,
        || async {
            let list = services.list(&ListParams::default()).await.ok()?;
            (list.items.len() == 30 && list.items.iter().all(|s| ingress(s).len() == 1))
                .then_some(list)
        },
    )
    .await;
    let mut seen = BTreeMap::new();
    for s in &list.items {
        let ip = ingress(s)[0].clone();
        if let Some(other) = seen.insert(ip.clone(), s.name_any()) {
            panic!("{ip} assigned twice: {other} and {}", s.name_any());
        }
    }
    for (_, _, stop, election, controllers) in replicas {
        let _ = stop.send(true);
        let _ = election.await;
        controllers.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_restarts_ends_with_unique_complete_assignments_and_exact_pool_counts() {
    let cluster = cluster();
    let (_turn, client) = turn(&["churn"]).await;
    let class = "test.ipvslb.io/churn";
    cluster.apply(&pool_yaml("churn", class, &["10.251.0.0/20"], &["churn"]));
    let services: Api<Service> = Api::namespaced(client.clone(), "churn");
    let mut controllers = Some(Controllers::start(&client, classes(class)));
    let total = 1000usize;
    // A fixed pseudo-random order (xorshift), so a failure can be replayed.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut live: Vec<usize> = Vec::new();
    let mut created = 0usize;
    let mut step = 0usize;
    while created < total {
        step += 1;
        if live.len() > 10 && next() % 3 == 0 {
            let victim = live.swap_remove((next() % live.len() as u64) as usize);
            let _ = services
                .delete(&format!("s{victim}"), &DeleteParams::default())
                .await;
        } else {
            let yaml: Service = serde_norway::from_str(&service_yaml(
                "churn",
                &format!("s{created}"),
                class,
                &[80],
                &[],
            ))
            .unwrap();
            services.create(&Default::default(), &yaml).await.unwrap();
            live.push(created);
            created += 1;
        }
        if step == 400 || step == 900 {
            controllers.take().unwrap().kill();
            controllers = Some(Controllers::start(&client, classes(class)));
        }
    }
    let list = eventually("every live Service assigned", 60 * SECOND, || async {
        let list = services.list(&ListParams::default()).await.ok()?;
        (list.items.len() == live.len() && list.items.iter().all(|s| ingress(s).len() == 1))
            .then_some(list)
    })
    .await;
    let mut seen = BTreeMap::new();
    for s in &list.items {
        let ip = ingress(s)[0].clone();
        assert!(
            seen.insert(ip.clone(), s.name_any()).is_none(),
            "{ip} assigned twice"
        );
    }
    let pools: Api<IPPool> = Api::all(client.clone());
    let expected = live.len() as u64;
    eventually(
        "the pool status to count every assignment",
        20 * SECOND,
        || async {
            let status = pools.get("churn").await.ok()?.status?;
            (status.assigned_ipv4 == expected && status.available_ipv4 == 4096 - expected)
                .then_some(())
        },
    )
    .await;
    controllers.take().unwrap().stop().await;
}

/// The real binary, as a Pod would run it, with only the chart's ClusterRole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_cluster_role_is_enough_and_a_missing_permission_is_a_clear_log_line() {
    let cluster = cluster();
    let (_turn, client) = turn(&["rbac", "ipvslb-system"]).await;
    let class = "test.ipvslb.io/rbac";
    let (role, _) = common::Cluster::chart_role();
    let out = cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = cluster.service_account_kubeconfig("rbac-kubeconfig");
    cluster.apply(&pool_yaml(
        "rbac",
        class,
        &["10.250.6.10-10.250.6.20"],
        &["rbac"],
    ));
    // In L2 mode, so that its Lease and its Director resource are written with these rules too.
    let ipvslb = Ipvslb::spawn(
        &kubeconfig,
        class,
        "rbac-test",
        &["--l2-interface", "seg0", "--director-name", "rbac-director"],
        "",
        cluster.dir.join("rbac-ipvslb.log"),
    );
    let probes = ipvslb.probes.clone();
    cluster.apply(&service_yaml("rbac", "web", class, &[80], &[]));
    let logs = || ipvslb.logs();
    wait_ingress(&client, "rbac", "web", &["10.250.6.10"], 15 * SECOND).await;
    assert!(
        !logs().contains("forbidden"),
        "no permission was missing:\n{}",
        logs()
    );
    let expected = [
        "ipvslb_leader 1",
        "ipvslb_assignments{pool=\"rbac\"} 1",
        "ipvslb_reconcile_duration_seconds_count{controller=\"allocator\"}",
        "ipvslb_pool_addresses{pool=\"rbac\",family=\"IPv4\",state=\"available\"} 10",
    ];
    let deadline = std::time::Instant::now() + 20 * SECOND;
    loop {
        let ready = http_get(&probes, "/readyz");
        let metrics = http_get(&probes, "/metrics");
        let healthy = status(&http_get(&probes, "/healthz")) == Some(200);
        if healthy && status(&ready) == Some(200) && expected.iter().all(|e| metrics.contains(e)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "probes on {probes}: /readyz {ready:?}\nwanted {expected:?} in /metrics:\n{metrics}\nlog:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "ipvslb-system");
    let directors: Api<ipvslb_api::Director> = Api::all(client.clone());
    eventually(
        "the director's Lease and its Director resource, ready",
        20 * SECOND,
        || async {
            leases.get("ipvslb-director-rbac-director").await.ok()?;
            directors
                .get("rbac-director")
                .await
                .ok()?
                .status?
                .ready
                .then_some(())
        },
    )
    .await;
    assert!(
        !logs().contains("forbidden"),
        "no permission was missing:\n{}",
        logs()
    );

    // Take away the status write: the next assignment fails with a line naming what and why.
    let full = common::Cluster::chart_role().1;
    let narrowed = common::without_service_status_writes(&full);
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &narrowed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.apply(&service_yaml("rbac", "api", class, &[80], &[]));
    eventually(
        "a log line naming the Service and the refusal",
        20 * SECOND,
        || async {
            let text = logs();
            text.lines()
                .any(|l| {
                    l.contains("writing the status of Service rbac/api") && l.contains("forbidden")
                })
                .then_some(())
        },
    )
    .await;
    let mut ipvslb = ipvslb;
    assert!(
        ipvslb.exited().is_none(),
        "ipvslb keeps running instead of crashing:\n{}",
        ipvslb.logs()
    );
    let out = cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]);
    assert!(out.status.success());
}

/// The real binary with a ClusterRole that may not list NodeSets: not ready, and saying why,
/// until the permission is granted; alive all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_kind_whose_cache_cannot_be_filled_until_its_list_is_allowed() {
    let cluster = cluster();
    let (_turn, _client) = turn(&["ready", "ipvslb-system"]).await;
    let (role, full) = common::Cluster::chart_role();
    let narrowed = full.replace(
        "  resources: [ippools, nodesets]\n  verbs: [get, list, watch]",
        "  resources: [ippools]\n  verbs: [get, list, watch]",
    );
    assert_ne!(narrowed, full, "the chart's rule for NodeSets moved");
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &narrowed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = cluster.service_account_kubeconfig("ready-kubeconfig");
    let mut ipvslb = Ipvslb::spawn(
        &kubeconfig,
        "test.ipvslb.io/ready",
        "ready-test",
        &[],
        "",
        cluster.dir.join("ready-ipvslb.log"),
    );
    let answer = eventually("/readyz to name NodeSet", 30 * SECOND, || async {
        let answer = ipvslb.get("/readyz");
        (status(&answer) == Some(503)
            && body(&answer).contains("NodeSet (director): cache cannot be filled"))
        .then_some(answer)
    })
    .await;
    assert!(
        answer.contains("forbidden"),
        "the reason says why: {answer}"
    );
    eventually("a warn line naming the kind", 30 * SECOND, || async {
        ipvslb
            .logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("watch failed") && l.contains("NodeSet"))
            .then_some(())
    })
    .await;
    let health = ipvslb.get("/healthz");
    assert_eq!(
        status(&health),
        Some(200),
        "alive while not ready: {health}"
    );

    let out = cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]);
    assert!(out.status.success());
    // The watcher's backoff grows to half a minute between retries.
    eventually(
        "/readyz to answer 200 once NodeSets may be listed",
        90 * SECOND,
        || async { (status(&ipvslb.get("/readyz")) == Some(200)).then_some(()) },
    )
    .await;
    assert!(ipvslb.exited().is_none(), "{}", ipvslb.logs());
}

/// SIGTERM while the API server has stopped answering: the lease release and any reconcile
/// hang, and the process exits at its deadline anyway, naming what it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_the_process_exits_by_its_deadline_naming_what_it_left_unfinished() {
    let cluster = cluster();
    let (_turn, client) = turn(&["stop", "ipvslb-system"]).await;
    let class = "test.ipvslb.io/stop";
    cluster.apply(&pool_yaml(
        "stop",
        class,
        &["10.250.7.10-10.250.7.20"],
        &["stop"],
    ));
    let upstream = cluster.url.trim_start_matches("https://").parse().unwrap();
    let relay = Relay::start(upstream).await;
    let admin = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    assert!(admin.contains(&cluster.url));
    let kubeconfig = cluster.dir.join("stop-kubeconfig");
    std::fs::write(
        &kubeconfig,
        admin.replace(&cluster.url, &format!("https://{}", relay.addr)),
    )
    .unwrap();
    let mut ipvslb = Ipvslb::spawn(
        &kubeconfig,
        class,
        "stop-test",
        &[],
        // As a Pod spec would set it.
        "export IPVSLB_SHUTDOWN_TIMEOUT=2s &&",
        cluster.dir.join("stop-ipvslb.log"),
    );
    cluster.apply(&service_yaml("stop", "web", class, &[80], &[]));
    wait_ingress(&client, "stop", "web", &["10.250.7.10"], 20 * SECOND).await;
    for i in 0..5 {
        cluster.apply(&service_yaml("stop", &format!("s{i}"), class, &[80], &[]));
    }
    relay.freeze();
    ipvslb.terminate();
    let deadline = std::time::Instant::now() + 30 * SECOND;
    let exit = loop {
        if let Some(exit) = ipvslb.exited() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 30 s after SIGTERM:\n{}",
            ipvslb.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = ipvslb.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("shutdown deadline passed"))
        .unwrap_or_else(|| panic!("no line says what was left ({exit}):\n{logs}"));
    assert!(line.contains("the lease (release)"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_director_says_on_the_service_what_keeps_it_unserved() {
    let cluster = cluster();
    let (_turn, client) = turn(&["unserved"]).await;
    let class = "test.ipvslb.io/unserved";
    // A pool whose NodeSet does not exist: the VIP is assigned, and nothing can serve it.
    let pool = pool_yaml("unserved", class, &["10.250.2.10"], &["unserved"]);
    cluster.apply(&format!("{pool}  nodeSet: nowhere\n"));
    let controllers = Controllers::start(&client, classes(class));
    cluster.apply(&service_yaml("unserved", "lost", class, &[80], &[]));
    wait_ingress(&client, "unserved", "lost", &["10.250.2.10"], 10 * SECOND).await;
    let warnings = eventually("a warning on lost", 10 * SECOND, || async {
        let w = warning_events(&client, "unserved", "lost").await;
        w.iter()
            .any(|w| w.starts_with("UnknownNodeSet"))
            .then_some(w)
    })
    .await;
    assert!(
        warnings.iter().any(|w| w.contains("\"nowhere\"")),
        "the Event names the missing NodeSet: {warnings:?}"
    );
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_director_writes_which_nodes_of_a_node_set_take_traffic() {
    let cluster = cluster();
    let (_turn, client) = turn(&["statuses"]).await;
    make_nodes_ready(cluster);
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata:\n  name: statuses\nspec:\n  nodeSelector:\n    matchLabels: {ipvslb.io/backend: \"true\"}\n",
    );
    let controllers = Controllers::start(&client, classes("test.ipvslb.io/statuses"));
    let sets: Api<ipvslb_api::NodeSet> = Api::all(client.clone());
    let status = || async {
        sets.get("statuses")
            .await
            .ok()
            .and_then(|s| s.status)
            .unwrap_or_default()
    };
    let all = eventually("both nodes counted ready", 10 * SECOND, || async {
        let s = status().await;
        (s.ready_backends == 2 && s.total_backends == 2).then_some(s)
    })
    .await;
    assert_eq!(all.directors.len(), 1, "{all:?}");
    assert_eq!(all.directors[0].name, "test-director");
    assert_eq!(all.conditions[0].reason, "AllReady");
    let out = cluster.kubectl(&[
        "patch",
        "node",
        "node2",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"KubeletNotReady","message":"down","lastHeartbeatTime":"2026-01-01T00:00:00Z","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let some = eventually("node2 counted down", 10 * SECOND, || async {
        let s = status().await;
        (s.ready_backends == 1).then_some(s)
    })
    .await;
    assert_eq!(some.total_backends, 2);
    assert_eq!(some.directors[0].down, ["node2: NotReady"]);
    assert_eq!(some.conditions[0].reason, "SomeDown");
    assert!(
        some.conditions[0].message.contains("node2: NotReady"),
        "{some:?}"
    );
    let columns = cluster.kubectl(&["get", "nodesets", "statuses"]);
    let text = String::from_utf8_lossy(&columns.stdout);
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row.get(3..5),
        Some(&["1", "2"][..]),
        "READY and TOTAL: {text}"
    );
    controllers.stop().await;
    make_nodes_ready(cluster);
}
