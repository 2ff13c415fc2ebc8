//! The controller against a real kube-apiserver: time from Service creation to EXTERNAL-IP in its
//! status (p50, p99 over 1,000 Services), against the API server's own write-to-watch latency
//! measured in the same run as the baseline; the resident memory of `ipvslb run` holding
//! 10,000 Services; and, with those 10,000 Services on 100 nodes (10 of them the NodeSet's),
//! a node flap: the time from the Node status write to the director's last data-plane write,
//! against the Node write seen through a watch of this process.
//!
//! `cargo bench -p ipvslb --bench controller` (needs `cargo xtask apiserver build` first).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

const CLASS: &str = "bench.ipvslb.io/latency";
const LATENCY_SERVICES: usize = 1000;
const MEMORY_SERVICES: usize = 10_000;
/// Nodes of the flap phase, and how many of them the NodeSet selects.
const FLAP_NODES: usize = 100;
const FLAP_BACKENDS: usize = 10;

fn service(namespace: &str, name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            // 10,000 LoadBalancer Services would exhaust the NodePort range.
            "allocateLoadBalancerNodePorts": false,
            "ports": [{"port": 80, "protocol": "TCP"}]
        }
    }))
    .expect("a valid Service")
}

/// Sends `(name, instant)` each time a Service in `namespace` first shows an ingress address;
/// the watch ends when the receiver is dropped, so it adds no load to later phases.
fn watch_assignments(
    client: &Client,
    namespace: &str,
) -> mpsc::UnboundedReceiver<(String, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        let mut stream = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        loop {
            let svc = tokio::select! {
                _ = tx.closed() => return,
                next = stream.try_next() => match next {
                    Ok(Some(svc)) => svc,
                    _ => return,
                },
            };
            if !common::ingress(&svc).is_empty() && seen.insert(svc.name_any()) {
                let _ = tx.send((svc.name_any(), Instant::now()));
            }
        }
    });
    rx
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn latencies(client: &Client, namespace: &str, patch_ourselves: bool) -> Vec<Duration> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let mut assigned = watch_assignments(client, namespace);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(LATENCY_SERVICES);
    for i in 0..LATENCY_SERVICES {
        let name = format!("s{i}");
        let start = Instant::now();
        api.create(&PostParams::default(), &service(namespace, &name))
            .await
            .expect("create");
        if patch_ourselves {
            // The baseline: the same status write done by the client itself, seen through the
            // same watch. What is left above it is the controller's own work.
            let ip = format!("10.253.{}.{}", i / 250, i % 250);
            let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("patch");
        }
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(30), assigned.recv())
                .await
                .expect("an assignment within 30 s")
                .expect("the watch runs");
            if seen == name {
                latencies.push(at - start);
                break;
            }
        }
    }
    latencies.sort();
    latencies
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A free loopback port for the probes server of a child `ipvslb`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts `ipvslb run` on the in-memory data plane, serving `CLASS`, its probes on `port`.
fn spawn_ipvslb(cluster: &common::Cluster, port: u16, log: &str) -> std::process::Child {
    let log = cluster.dir.join(log);
    std::process::Command::new(env!("CARGO_BIN_EXE_ipvslb"))
        .args([
            "run",
            "--kubeconfig",
            cluster.kubeconfig.to_str().unwrap(),
            "--dataplane",
            "memory",
        ])
        .args([
            "--load-balancer-class",
            CLASS,
            "--unclassed-services",
            "ignore",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("ipvslb runs")
}

/// The value of `series` (a metric name with its labels) on a child's `/metrics`.
fn metric(port: u16, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Waits until the child's allocator holds `count` assignments in pool `bench`.
async fn wait_for_assignments(port: u16, count: usize) {
    let series = "ipvslb_assignments{pool=\"bench\"}";
    common::eventually(
        &format!("{count} assignments"),
        Duration::from_secs(600),
        || async { (metric(port, series) == Some(count as f64)).then_some(()) },
    )
    .await;
}

async fn delete_all(client: &Client, namespace: &str) {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    futures::stream::iter(names)
        .for_each_concurrent(16, |name| {
            let api = api.clone();
            async move {
                let _ = api.delete(&name, &Default::default()).await;
            }
        })
        .await;
}

/// Stops a child with SIGTERM, as a rolling update does: it releases its Lease on the way out.
fn stop(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Node `i` of the flap phase; the first [`FLAP_BACKENDS`] carry the NodeSet's label.
fn bench_node(i: usize) -> Node {
    let labels = if i < FLAP_BACKENDS {
        serde_json::json!({"bench.ipvslb.io/backend": "true"})
    } else {
        serde_json::json!({})
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": format!("bench-n{i}"), "labels": labels},
        "status": {
            "addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", i / 250, i % 250 + 1)}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        }
    }))
    .expect("a valid Node")
}

/// The child's count of data-plane operations of `kinds`.
fn ops(port: u16, kinds: &[&str]) -> f64 {
    kinds
        .iter()
        .filter_map(|kind| {
            metric(
                port,
                &format!("ipvslb_dataplane_ops_total{{kind=\"{kind}\",result=\"ok\"}}"),
            )
        })
        .sum()
}

/// Waits until the child has made `count` operations of `kinds`; when it had.
async fn wait_for_ops(port: u16, kinds: &[&str], count: f64) -> Instant {
    common::eventually(
        &format!("{count} {kinds:?} operations"),
        Duration::from_secs(600),
        || async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            (ops(port, kinds) >= count).then(Instant::now)
        },
    )
    .await
}

/// Writes node `name`'s Ready condition; when the write returned.
async fn write_ready(client: &Client, name: &str, ready: bool) -> Instant {
    let api: Api<Node> = Api::all(client.clone());
    let status = if ready { "True" } else { "False" };
    let patch = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": "Bench"}]}});
    let started = Instant::now();
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("the Node status write");
    started
}

/// The flap phase, on a child holding the [`MEMORY_SERVICES`] Services: the time from each of
/// the two Node writes (NotReady, Ready) to the child's last write for it, and the same writes
/// seen through a Node watch of this process.
async fn flap(cluster: &common::Cluster, client: &Client, port: u16) {
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata: {name: default}\nspec:\n  nodeSelector: {matchLabels: {bench.ipvslb.io/backend: \"true\"}}\n  forwarding: DirectRouting\n",
    );
    let api: Api<Node> = Api::all(client.clone());
    for i in 0..FLAP_NODES {
        api.create(&PostParams::default(), &bench_node(i))
            .await
            .expect("a Node");
    }
    let destinations = (MEMORY_SERVICES * FLAP_BACKENDS) as f64;
    let started = Instant::now();
    wait_for_ops(port, &["add_dest"], destinations).await;
    println!(
        "{FLAP_NODES} nodes ({FLAP_BACKENDS} in the NodeSet) added: {destinations} destinations programmed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The baseline: the same writes, to a node no NodeSet selects, seen through a watch.
    let (tx, mut seen) = mpsc::unbounded_channel();
    let watch = tokio::spawn(async move {
        let mut stream = watcher(
            api,
            watcher::Config::default().fields("metadata.name=bench-n99"),
        )
        .applied_objects()
        .boxed();
        while let Ok(Some(node)) = stream.try_next().await {
            let _ = tx.send((node, Instant::now()));
        }
    });
    let writes = ["add_dest", "edit_dest", "del_dest"];
    let before = ops(port, &writes);
    let mut baseline = Vec::new();
    for ready in [false, true] {
        while seen.try_recv().is_ok() {}
        let written = write_ready(client, "bench-n99", ready).await;
        loop {
            let (node, at) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await
                .expect("the Node write seen within 30 s")
                .expect("the watch runs");
            let condition = node.status.and_then(|s| s.conditions).unwrap_or_default();
            if condition
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == if ready { "True" } else { "False" })
            {
                baseline.push(at - written);
                break;
            }
        }
    }
    watch.abort();
    // A node no NodeSet selects changes no Service's destinations.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ops(port, &writes),
        before,
        "the flap of a node no NodeSet selects wrote to the data plane"
    );

    // NotReady drains the node's destinations to weight 0; Ready again gives them their
    // weight back, or adds them again if the drain already ended.
    let mut flap = Vec::new();
    for ready in [false, true] {
        let kinds: &[&str] = if ready {
            &["edit_dest", "add_dest"]
        } else {
            &["edit_dest"]
        };
        let before = ops(port, kinds);
        let written = write_ready(client, "bench-n0", ready).await;
        let done = wait_for_ops(port, kinds, before + MEMORY_SERVICES as f64).await;
        flap.push(done - written);
    }
    for (i, what) in ["NotReady", "Ready again"].iter().enumerate() {
        println!(
            "  node flap, {what}: {MEMORY_SERVICES} destinations edited {:.0} ms after the Node write; the write seen through a watch (baseline) {:.1} ms",
            flap[i].as_secs_f64() * 1e3,
            baseline[i].as_secs_f64() * 1e3
        );
    }
    println!(
        "flap to last write at {MEMORY_SERVICES} Services x {FLAP_NODES} nodes: {:.0} us per Service requeued",
        flap.iter().sum::<Duration>().as_secs_f64() * 1e6 / (2 * MEMORY_SERVICES) as f64
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = common::cluster();
    let (_turn, client) = common::turn(&[
        "bench-baseline",
        "bench-latency",
        "bench-memory",
        "ipvslb-system",
    ])
    .await;
    cluster.apply(&format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata: {{name: bench}}\nspec:\n  loadBalancerClass: {CLASS}\n  addresses: [10.252.0.0/18]\n"
    ));

    let baseline = latencies(&client, "bench-baseline", true).await;

    let port = free_port();
    let child = spawn_ipvslb(cluster, port, "bench-latency.log");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let measured = latencies(&client, "bench-latency", false).await;

    println!(
        "creation to EXTERNAL-IP over {LATENCY_SERVICES} Services, created one after another:"
    );
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (ours, base) = (percentile(&measured, p), percentile(&baseline, p));
        println!(
            "  {label}: ipvslb {:>8.2} ms   baseline (client's own status write) {:>8.2} ms   ratio {:.2}",
            ours.as_secs_f64() * 1e3,
            base.as_secs_f64() * 1e3,
            ours.as_secs_f64() / base.as_secs_f64()
        );
    }
    stop(child);

    // The memory phase: a fresh process on a cluster holding the measured Services only.
    delete_all(&client, "bench-baseline").await;
    delete_all(&client, "bench-latency").await;
    let port = free_port();
    let child = spawn_ipvslb(cluster, port, "bench-memory.log");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(child.id());
    let api: Api<Service> = Api::namespaced(client.clone(), "bench-memory");
    let mut seen = watch_assignments(&client, "bench-memory");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let names: Vec<String> = (0..MEMORY_SERVICES).map(|i| format!("m{i}")).collect();
    futures::stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &service("bench-memory", name))
                    .await
                    .expect("create");
            }
        })
        .await;
    let created = started.elapsed();
    // The watch reports each Service once.
    for _ in 0..MEMORY_SERVICES {
        tokio::time::timeout(Duration::from_secs(120), seen.recv())
            .await
            .expect("assignments keep coming")
            .expect("the watch runs");
    }
    drop(seen);
    let assigned = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_burst = rss_kib(child.id());
    stop(child);

    // A restart finds them all assigned: the steady state of a director or a new leader.
    let port = free_port();
    let mut child = spawn_ipvslb(cluster, port, "bench-restart.log");
    let restarted = Instant::now();
    wait_for_assignments(port, MEMORY_SERVICES).await;
    let restored = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady = rss_kib(child.id());
    flap(cluster, &client, port).await;
    let _ = child.kill();
    let _ = child.wait();

    println!(
        "{MEMORY_SERVICES} Services created 16 at a time in {:.1} s, all assigned after {:.1} s",
        created.as_secs_f64(),
        assigned.as_secs_f64()
    );
    println!(
        "  ipvslb RSS: idle {:.1} MiB; after the burst {:.1} MiB (ratio {:.2}); restarted with all {MEMORY_SERVICES} in place {:.1} MiB (ratio {:.2}), restored in {:.1} s",
        mib(idle),
        mib(after_burst),
        after_burst as f64 / idle.max(1) as f64,
        mib(steady),
        steady as f64 / idle.max(1) as f64,
        restored.as_secs_f64()
    );
}
