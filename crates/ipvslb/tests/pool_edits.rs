//! Pool edits, pool statuses and two installations against a real kube-apiserver and etcd,
//! driven with the real kubectl: after each edit every Service the rule does not name still has
//! its address, and no address is ever assigned twice.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use common::{Controllers, classes, cluster, eventually, ingress, service_yaml, turn};
use ipvslb_api::IPPool;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const SECOND: Duration = Duration::from_secs(1);

fn pool(name: &str, class: &str, addresses: &[&str], extra: &str) -> String {
    let addresses: String = addresses.iter().map(|a| format!("  - {a}\n")).collect();
    format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  loadBalancerClass: {class}\n  addresses:\n{addresses}{extra}"
    )
}

async fn create_services(client: &kube::Client, namespace: &str, class: &str, names: &[String]) {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    for name in names {
        let service: Service =
            serde_norway::from_str(&service_yaml(namespace, name, class, &[80], &[])).unwrap();
        api.create(&PostParams::default(), &service).await.unwrap();
    }
}

/// Every Service of `namespace` with its addresses.
async fn addresses(client: &kube::Client, namespace: &str) -> BTreeMap<String, Vec<String>> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| (s.name_any(), ingress(s)))
        .collect()
}

/// Waits until the allocator has written the status of `pool` for its current generation.
async fn processed(client: &kube::Client, pool: &str) -> IPPool {
    let api: Api<IPPool> = Api::all(client.clone());
    eventually(
        &format!("pool {pool}'s status to follow its current spec"),
        20 * SECOND,
        || async {
            let p = api.get(pool).await.ok()?;
            let generation = p.metadata.generation;
            let status = p.status.as_ref()?;
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == generation)
                .then_some(())
                .filter(|_| !status.conditions.is_empty())?;
            Some(p)
        },
    )
    .await
}

fn condition(pool: &IPPool, type_: &str) -> (String, String) {
    pool.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.message.clone()))
        .unwrap_or_default()
}

async fn warnings(client: &kube::Client, namespace: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.involved_object.name.unwrap_or_default())
        .collect()
}

/// Checks that only `moved` differ between `before` and `now`, and that no address is held
/// twice.
fn only_moved(
    says: &str,
    before: &BTreeMap<String, Vec<String>>,
    now: &BTreeMap<String, Vec<String>>,
    moved: &[&str],
) {
    for (name, held) in before {
        if !moved.contains(&name.as_str()) {
            assert_eq!(Some(held), now.get(name), "{says}: {name} moved");
        }
    }
    let mut seen = BTreeMap::new();
    for (name, held) in now {
        for ip in held {
            if let Some(other) = seen.insert(ip.clone(), name.clone()) {
                panic!("{says}: {ip} held by {other} and {name}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_edits_under_200_assigned_services_move_only_the_services_the_rule_names() {
    let cluster = cluster();
    let (_turn, client) = turn(&["edits"]).await;
    let class = "test.ipvslb.io/edits";
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: default}\nspec: {}\n",
    );
    cluster.apply(&pool("edits", class, &["10.252.8.0-10.252.8.199"], ""));
    cluster.apply(&pool(
        "edits-small",
        class,
        &["10.252.9.0/30"],
        "  autoAssign: false\n",
    ));
    let controllers = Controllers::start(&client, classes(class));
    let names: Vec<String> = (0..200).map(|i| format!("s{i:03}")).collect();
    create_services(&client, "edits", class, &names).await;
    let before = eventually("200 Services assigned", 60 * SECOND, || async {
        let all = addresses(&client, "edits").await;
        (all.len() == 200 && all.values().all(|a| a.len() == 1)).then_some(all)
    })
    .await;
    // Three Services of the small pool, which only gives addresses to those who name it.
    let small_api: Api<Service> = Api::namespaced(client.clone(), "edits");
    for name in ["small-a", "small-b", "small-c"] {
        let yaml = service_yaml(
            "edits",
            name,
            class,
            &[80],
            &[("ipvslb.io/pool", "edits-small")],
        );
        small_api
            .create(
                &PostParams::default(),
                &serde_norway::from_str(&yaml).unwrap(),
            )
            .await
            .unwrap();
    }
    let mut before = before;
    let all = eventually(
        "the small pool's Services assigned",
        20 * SECOND,
        || async {
            let all = addresses(&client, "edits").await;
            (all.len() == 203 && all.values().all(|a| a.len() == 1)).then_some(all)
        },
    )
    .await;
    before.extend(all.into_iter().filter(|(n, _)| n.starts_with("small")));

    // 1. A younger stray pool whose name sorts first, over held addresses and a free one.
    cluster.apply(&pool(
        "a-stray",
        class,
        &["10.252.8.150-10.252.8.160", "10.252.8.200"],
        "  autoAssign: false\n",
    ));
    let stray = processed(&client, "a-stray").await;
    let (overlapping, message) = condition(&stray, "Overlapping");
    assert_eq!(overlapping, "True", "{message}");
    assert!(
        message.contains("10.252.8.150-10.252.8.160") && message.contains("stay with edits"),
        "{message}"
    );
    processed(&client, "edits").await;
    let now = addresses(&client, "edits").await;
    only_moved("a younger overlapping pool", &before, &now, &[]);
    eventually(
        "an Overlap event on the stray pool",
        10 * SECOND,
        || async {
            let events: Api<Event> = Api::all(client.clone());
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("Overlap")
                        && e.involved_object.name.as_deref() == Some("a-stray")
                })
                .then_some(())
        },
    )
    .await;

    // 2. Narrowing: the pool serves another namespace only.
    cluster.apply(&pool(
        "edits",
        class,
        &["10.252.8.0-10.252.8.199"],
        "  serviceAllocation:\n    namespaces: [elsewhere]\n",
    ));
    let edits = processed(&client, "edits").await;
    let now = addresses(&client, "edits").await;
    only_moved("narrowing the namespaces", &before, &now, &[]);
    let status = edits.status.clone().unwrap();
    assert_eq!(status.non_matching_holders, 200, "{status:?}");
    assert_eq!(status.assigned, 200);

    // 3. Invalid as written (an operator the API server does not check): holders stay.
    cluster.apply(&pool(
        "edits",
        class,
        &["10.252.8.0-10.252.8.199"],
        "  serviceAllocation:\n    serviceSelectors:\n    - matchExpressions: [{key: app, operator: Maybe}]\n",
    ));
    let edits = processed(&client, "edits").await;
    let (invalid, message) = condition(&edits, "Invalid");
    assert_eq!(invalid, "True", "{message}");
    assert!(message.contains("serviceSelectors"), "{message}");
    let now = addresses(&client, "edits").await;
    only_moved("an invalid pool", &before, &now, &[]);
    // The director keeps serving the invalid pool's holders.
    tokio::time::sleep(2 * SECOND).await;
    let table = controllers.dataplane.table().unwrap();
    let served = before
        .values()
        .filter(|ips| {
            let vip: IpAddr = ips[0].parse().unwrap();
            table.services.keys().any(|k| k.address() == Some(vip))
        })
        .count();
    assert_eq!(served, 203, "every holder is still programmed");

    // 4. Removing the top five addresses releases their holders only; none is free.
    cluster.apply(&pool("edits", class, &["10.252.8.0-10.252.8.194"], ""));
    let top: Vec<String> = before
        .iter()
        .filter(|(_, a)| {
            a.first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(|a| {
                    a >= "10.252.8.195".parse::<IpAddr>().unwrap()
                        && a <= "10.252.8.199".parse::<IpAddr>().unwrap()
                })
        })
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(top.len(), 5, "{top:?}");
    let top_refs: Vec<&str> = top.iter().map(String::as_str).collect();
    let now = eventually("the five holders released", 20 * SECOND, || async {
        let now = addresses(&client, "edits").await;
        top.iter().all(|n| now[n].is_empty()).then_some(now)
    })
    .await;
    only_moved("removing five addresses", &before, &now, &top_refs);
    let released = eventually(
        "a warning on each released Service",
        20 * SECOND,
        || async {
            let w = warnings(&client, "edits", "AddressReleased").await;
            top.iter().all(|n| w.contains(n)).then_some(w)
        },
    )
    .await;
    assert!(
        released.iter().all(|n| top.contains(n)),
        "only the released Services are warned: {released:?}"
    );

    // 5. Adding a range gives the five new addresses; nobody else moves.
    cluster.apply(&pool(
        "edits",
        class,
        &["10.252.8.0-10.252.8.194", "10.252.10.0/29"],
        "",
    ));
    let now = eventually("the five reassigned", 20 * SECOND, || async {
        let now = addresses(&client, "edits").await;
        top.iter().all(|n| now[n].len() == 1).then_some(now)
    })
    .await;
    only_moved("adding a range", &before, &now, &top_refs);
    for name in &top {
        assert!(
            now[name][0].starts_with("10.252.10."),
            "{name}: {:?}",
            now[name]
        );
    }
    let before = now;

    // 6. Deleting the stray pool and then the small pool releases the small pool's three only.
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .delete("a-stray", &DeleteParams::default())
        .await
        .unwrap();
    pools
        .delete("edits-small", &DeleteParams::default())
        .await
        .unwrap();
    let small = ["small-a", "small-b", "small-c"];
    let now = eventually(
        "the small pool's Services released",
        20 * SECOND,
        || async {
            let now = addresses(&client, "edits").await;
            small.iter().all(|n| now[*n].is_empty()).then_some(now)
        },
    )
    .await;
    processed(&client, "edits").await;
    only_moved("deleting two pools", &before, &now, &small);
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_status_lists_exactly_the_holders_and_is_not_written_while_nothing_changes() {
    let cluster = cluster();
    let (_turn, client) = turn(&["status"]).await;
    let class = "test.ipvslb.io/status";
    cluster.apply(&pool("status", class, &["10.252.11.0/29"], ""));
    let controllers = Controllers::start(&client, classes(class));
    let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    create_services(&client, "status", class, &names).await;
    let pools: Api<IPPool> = Api::all(client.clone());
    eventually("three allocations listed", 20 * SECOND, || async {
        let status = pools.get("status").await.ok()?.status?;
        (status.allocations.len() == 3).then_some(())
    })
    .await;
    Api::<Service>::namespaced(client.clone(), "status")
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the status to list exactly a and c",
        20 * SECOND,
        || async {
            let p = pools.get("status").await.ok()?;
            let status = p.status.as_ref()?;
            // In address order, which depends on which Service was assigned first.
            let mut listed: Vec<&str> = status.allocations.values().map(String::as_str).collect();
            listed.sort_unstable();
            (listed == ["status/a", "status/c"] && status.assigned == 2).then_some(())
        },
    )
    .await;
    // The writer counts a write when the API server's answer reaches it, which can be after
    // the write is seen here: the count is taken once it stays put over a status round (one
    // every 1.5 s in these tests). A writer that never stops is caught below.
    let mut writes = controllers.metrics.pool_status_writes.get();
    for _ in 0..5 {
        tokio::time::sleep(2 * SECOND).await;
        let now = controllers.metrics.pool_status_writes.get();
        if now == writes {
            break;
        }
        writes = now;
    }
    let settled = pools.get("status").await.unwrap();
    // Two or more status rounds with nothing to change.
    tokio::time::sleep(4 * SECOND).await;
    let now = pools.get("status").await.unwrap();
    assert_eq!(
        now.metadata.resource_version, settled.metadata.resource_version,
        "the pool was written while nothing changed: {:?}",
        now.status
    );
    assert_eq!(controllers.metrics.pool_status_writes.get(), writes);
    controllers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_of_two_classes_never_assign_one_address_twice() {
    let cluster = cluster();
    let (_turn, client) = turn(&["team-a", "team-b"]).await;
    let (class_a, class_b) = ("test.ipvslb.io/team-a", "test.ipvslb.io/team-b");
    cluster.apply(&pool("pool-a", class_a, &["10.252.12.0/28"], ""));
    // Younger and overlapping the top half of pool-a: pool-a keeps .8-.15.
    cluster.apply(&pool("pool-b", class_b, &["10.252.12.8-10.252.12.23"], ""));
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: default}\nspec: {}\n",
    );
    let a = Controllers::start(&client, classes(class_a));
    let b = Controllers::start(&client, classes(class_b));
    let names: Vec<String> = (0..16).map(|i| format!("s{i:02}")).collect();
    create_services(&client, "team-a", class_a, &names).await;
    create_services(&client, "team-b", class_b, &names[..8]).await;
    let (in_a, in_b) = eventually(
        "every Service of both classes assigned",
        30 * SECOND,
        || async {
            let a = addresses(&client, "team-a").await;
            let b = addresses(&client, "team-b").await;
            (a.values().all(|x| x.len() == 1)
                && b.values().all(|x| x.len() == 1)
                && a.len() == 16
                && b.len() == 8)
                .then_some((a, b))
        },
    )
    .await;
    let mut seen = BTreeMap::new();
    for (who, map) in [("team-a", &in_a), ("team-b", &in_b)] {
        for (name, ips) in map {
            if let Some(other) = seen.insert(ips[0].clone(), format!("{who}/{name}")) {
                panic!("{} assigned twice: {other} and {who}/{name}", ips[0]);
            }
        }
    }
    let in_range = |ip: &str, first: &str, last: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        ip >= first.parse::<IpAddr>().unwrap() && ip <= last.parse::<IpAddr>().unwrap()
    };
    assert!(
        in_a.values()
            .all(|x| in_range(&x[0], "10.252.12.0", "10.252.12.15"))
    );
    assert!(
        in_b.values()
            .all(|x| in_range(&x[0], "10.252.12.16", "10.252.12.23"))
    );
    let pending_b = in_b.values().filter(|x| x.is_empty()).count();
    assert_eq!(pending_b, 0);
    let pb = processed(&client, "pool-b").await;
    let (overlapping, message) = condition(&pb, "Overlapping");
    assert_eq!(overlapping, "True", "{message}");
    // Each director programs its own class's VIPs only.
    for (controllers, range) in [
        (&a, ("10.252.12.0", "10.252.12.15")),
        (&b, ("10.252.12.16", "10.252.12.23")),
    ] {
        let table = eventually("each director's table", 20 * SECOND, || async {
            let table = controllers.dataplane.table().ok()?;
            (table.services.len() >= 8).then_some(table)
        })
        .await;
        for key in table.services.keys() {
            let vip = key.address().unwrap().to_string();
            assert!(in_range(&vip, range.0, range.1), "{vip} outside {range:?}");
        }
    }
    a.stop().await;
    b.stop().await;
}
