//! L2 election against the real API server: directors in this process (in-memory data planes
//! in L2 mode) hold their Leases, agree on one announcer per VIP, hand the VIPs over when one
//! stops cleanly (at once) or dies (when its Lease expires), and report themselves in their
//! Director resources and on the Services. The kernel side (ARP, NDP, the client's traffic)
//! is proven in the VM by `cargo xtask e2e`.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Controllers, classes, cluster, eventually, service_yaml, turn, wait_ingress};
use ipvslb::dataplane::Dataplane;
use ipvslb_api::Director;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

const SECOND: Duration = Duration::from_secs(1);
const NAMESPACE: &str = "l2-election";
const CLASS: &str = "test.ipvslb.io/l2";

fn announced(director: &Controllers) -> BTreeSet<IpAddr> {
    director
        .dataplane
        .announced()
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Waits until every one of `vips` is announced by exactly one of `directors`, and by none
/// of the others; returns what each announces.
async fn one_announcer_each(
    what: &str,
    vips: &BTreeSet<IpAddr>,
    directors: &[&Controllers],
    timeout: Duration,
) -> Vec<BTreeSet<IpAddr>> {
    eventually(what, timeout, || async {
        let sets: Vec<BTreeSet<IpAddr>> = directors.iter().map(|d| announced(d)).collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<IpAddr> = sets.iter().flatten().copied().collect();
        (total == vips.len() && &union == vips).then_some(sets)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directors_elect_one_announcer_per_vip_and_hand_over_on_stop_and_on_death() {
    let cluster = cluster();
    let (_turn, client) = turn(&[NAMESPACE]).await;
    cluster.apply(&format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: l2\nspec:\n  loadBalancerClass: {CLASS}\n  announce: L2\n  addresses: [10.250.9.1-10.250.9.8]\n---\napiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {{name: default}}\nspec: {{forwarding: DirectRouting}}\n"
    ));
    common::make_nodes_ready(cluster);
    // The allocator (and a director of no announcement mode, which announces nothing).
    let allocator = Controllers::start(&client, classes(CLASS));
    let mut vips = BTreeSet::new();
    for i in 1..=8 {
        cluster.apply(&service_yaml(
            NAMESPACE,
            &format!("s{i}"),
            CLASS,
            &[80],
            &[],
        ));
        let vip = format!("10.250.9.{i}");
        wait_ingress(&client, NAMESPACE, &format!("s{i}"), &[&vip], 10 * SECOND).await;
        vips.insert(vip.parse::<IpAddr>().unwrap());
    }
    let a = Controllers::start_l2_director(&client, classes(CLASS), "dir-a", NAMESPACE);
    let b = Controllers::start_l2_director(&client, classes(CLASS), "dir-b", NAMESPACE);
    let sets =
        one_announcer_each("one announcer for each VIP", &vips, &[&a, &b], 20 * SECOND).await;
    assert!(
        !sets[0].is_empty() && !sets[1].is_empty(),
        "both directors announce some of the 8 VIPs: {sets:?}"
    );
    assert!(announced(&allocator).is_empty());

    // Each reports itself: its Director resource lists what it announces, and the Services
    // got an Event naming it.
    let directors: Api<Director> = Api::all(client.clone());
    for (name, set) in [("dir-a", &sets[0]), ("dir-b", &sets[1])] {
        let listed: Vec<String> = set.iter().map(ToString::to_string).collect();
        eventually(
            &format!("Director {name} to list {listed:?}"),
            10 * SECOND,
            || async {
                let status = directors.get(name).await.ok()?.status?;
                (status.ready
                    && status.announcing == listed.join(",")
                    && status.peers == ["dir-a", "dir-b"])
                .then_some(())
            },
        )
        .await;
    }
    let out = cluster.kubectl(&["get", "directors"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("dir-a") && table.contains("L2") && table.contains("eth1"),
        "{table}"
    );
    let first = sets[0].iter().next().unwrap().to_string();
    let holder = (1..=8).find(|i| format!("10.250.9.{i}") == first).unwrap();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("an Announced Event naming dir-a", 10 * SECOND, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.involved_object.name.as_deref() == Some(&format!("s{holder}"))
                    && e.reason.as_deref() == Some("Announced")
                    && e.message.as_deref().is_some_and(|m| m.contains("dir-a"))
            })
            .then_some(())
    })
    .await;

    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), NAMESPACE);
    let condition = |service: String, wanted: String| {
        let services = services.clone();
        async move {
            eventually(
                &format!("{service}'s Announced condition to say {wanted}"),
                10 * SECOND,
                || async {
                    let svc = services.get_status(&service).await.ok()?;
                    let conditions = svc.status?.conditions?;
                    let c = conditions
                        .iter()
                        .find(|c| c.type_ == "ipvslb.io/Announced")?;
                    (c.status == "True" && c.message == wanted).then_some(())
                },
            )
            .await;
        }
    };
    condition(format!("s{holder}"), format!("{first} by dir-a")).await;

    // dir-a stops cleanly: it withdraws and deletes its Lease, and dir-b takes every VIP at
    // once, well within the Lease duration.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(leases.get("ipvslb-director-dir-a").await.is_ok());
    let stopped = Instant::now();
    a.stop_within(10 * SECOND).await;
    assert!(
        leases.get("ipvslb-director-dir-a").await.is_err(),
        "dir-a's Lease is gone once it stopped"
    );
    one_announcer_each("dir-b to announce every VIP", &vips, &[&b], 10 * SECOND).await;
    let graceful = stopped.elapsed();
    condition(format!("s{holder}"), format!("{first} by dir-b")).await;
    println!("graceful handover: {graceful:?}");
    assert!(
        graceful < Duration::from_millis(1500),
        "{graceful:?}: not faster than the Lease"
    );

    // dir-a back: the same VIPs as before move back to it (the election is stable).
    let a = Controllers::start_l2_director(&client, classes(CLASS), "dir-a", NAMESPACE);
    eventually(
        "the VIPs dir-a had before to move back to it",
        20 * SECOND,
        || async { (announced(&a) == sets[0] && announced(&b) == sets[1]).then_some(()) },
    )
    .await;

    // dir-b dies (its tasks aborted: no withdrawal, its Lease stays): dir-a takes over when
    // the Lease expires, not before.
    let died = Instant::now();
    b.kill();
    one_announcer_each("dir-a to take over dir-b's VIPs", &vips, &[&a], 10 * SECOND).await;
    let took = died.elapsed();
    println!("takeover after a death: {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "{took:?}: dir-a took over before dir-b's Lease could expire"
    );
    a.stop_within(10 * SECOND).await;
    allocator.stop().await;
}
