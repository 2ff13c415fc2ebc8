//! The steps of the demo, in order; each builds on the state the one before left.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::cluster::{self, Family, Kube, apply, kubectl, wait_for};
use crate::hosts::{self, Background, CLIENT, CLIENT_V4, NODES, PODS, REMOTE, in_ns, node_of, sh};
use crate::web::{self, Answer, now_ms};
use crate::witness;

/// The write-up's VIP: the first address of the example's pool.
const VIP: &str = "10.240.0.210";

/// An IPVS service of somebody else, which ipvslb must leave alone.
const FOREIGN: (&str, &str) = ("-t", "10.240.0.250:8080");

/// How long a step waits for the system to converge before it fails.
const CONVERGE: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(100);

/// The state the steps share.
struct Run {
    kube: Kube,
    director: Option<Background>,
    /// kube-proxy on each node, the pods' servers.
    others: Vec<Background>,
    /// Lines of numbers printed at the end.
    numbers: Vec<String>,
    /// The health step's `detection = X s`, `recovery = Y s`, `flaps = N`, printed last.
    health: Vec<String>,
}

type Step = (&'static str, fn(&mut Run) -> Result<(), String>);

const STEPS: [Step; 13] = [
    ("apply", apply_the_demo),
    ("round-robin", round_robin),
    ("port-change", port_change),
    ("node-not-ready", node_not_ready),
    ("ipvsadm-clear", ipvsadm_clear),
    ("delete", delete_the_service),
    ("masquerade", masquerade),
    ("tunnel", tunnel),
    ("ipv6", ipv6),
    ("local-traffic-policy", local_traffic_policy),
    ("health", health),
    ("director-tier", director_tier),
    ("l2", l2),
];

/// `e2e run`: the hosts, then every step; fails when any step failed.
pub fn run() -> Result<(), String> {
    let chosen = chosen_steps()?;
    let mut run = match setup() {
        Ok(run) => run,
        Err(why) => {
            println!("FAILED setup: {why}");
            for (name, _) in STEPS {
                println!("FAILED {name}: not run: the setup failed");
            }
            println!("0 passed, {} failed", STEPS.len() + 1);
            return Err(format!("the setup failed: {why}"));
        }
    };
    let mut passed = 0;
    let mut failed = 0;
    let mut skipped = 0;
    let mut broken: Option<&str> = None;
    for (name, step) in STEPS {
        if chosen.as_ref().is_some_and(|c| !c.contains(&name)) {
            skipped += 1;
            println!("skipped {name}: not in {STEPS_VAR}");
            continue;
        }
        let outcome = match broken {
            Some(first) => Err(format!("not run: step {first} failed and the rest need it")),
            None => {
                println!("e2e: step {name}");
                step(&mut run)
            }
        };
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("ok {name}");
            }
            Err(why) => {
                failed += 1;
                println!("FAILED {name}: {why}");
                if broken.is_none() {
                    diagnose(&mut run);
                }
                if name == "apply" {
                    broken = Some(name);
                }
            }
        }
    }
    for line in &run.numbers {
        println!("e2e: {line}");
    }
    for line in &run.health {
        println!("{line}");
    }
    if let Some(director) = run.director.take() {
        // Whatever the director found worth a warning during the run, for the reader.
        let log = director.stop(Duration::from_secs(10));
        for line in log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .take(20)
        {
            println!("ipvslb log: {line}");
        }
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} of {} steps failed", STEPS.len()))
    }
}

/// Names some steps to run, for working on one: `apply` and the named ones (the others
/// build on `apply`'s director). Never set by `cargo xtask test`.
const STEPS_VAR: &str = "IPVSLB_E2E_STEPS";

/// The steps [`STEPS_VAR`] names, if it is set; an unknown name is an error.
fn chosen_steps() -> Result<Option<Vec<&'static str>>, String> {
    let Some(list) = std::env::var(STEPS_VAR).ok().filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut chosen = vec!["apply"];
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let (name, _) = STEPS
            .iter()
            .find(|(name, _)| *name == word)
            .ok_or_else(|| format!("{STEPS_VAR}: no step {word}"))?;
        chosen.push(*name);
    }
    Ok(Some(chosen))
}

/// What helps to read a failure: processes that ended, the last words of the director and of
/// kube-proxy, and the kernel's table.
fn diagnose(run: &mut Run) {
    for process in run.director.iter_mut().chain(run.others.iter_mut()) {
        if let Some(status) = process.ended() {
            println!(
                "--- {} ended ({status}):\n{}",
                process.name,
                process.tail(25)
            );
        } else if process.name.starts_with("kube-proxy") || process.name == "ipvslb" {
            println!("--- last lines of {}:\n{}", process.name, process.tail(25));
        }
    }
    if let Ok(table) = sh("ipvsadm", &["-L", "-n"]) {
        println!("--- ipvsadm -L -n:\n{table}");
    }
}

/// The hosts, the way to the API server, the Nodes and namespace, kube-proxy on each node, the
/// pods' servers, and the foreign IPVS service.
fn setup() -> Result<Run, String> {
    hosts::build()?;
    crate::tier::build()?;
    let nodes: Vec<&str> = NODES.iter().map(|n| n.name).collect();
    witness::add_path_counters(&nodes, (CLIENT_V4, hosts::CLIENT_V6))?;
    crate::relay::start()?;
    wait_for(
        "the API server through qemu's forwarding",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || kubectl(&["get", "--raw", "/readyz"]).map(|t| t.contains("ok").then_some(())),
    )?;
    let kube = Kube::connect()?;
    // What kubelets would have registered, and the namespace the chart would have made.
    cluster::create(&cluster::nodes_yaml())?;
    kubectl(&["create", "namespace", "ipvslb-system"])?;
    let mut others = Vec::new();
    let exe = own_exe()?;
    for pod in PODS {
        let v4 = format!("{}:80", pod.v4());
        let v6 = format!("[{}]:80", pod.v6());
        others.push(Background::start(
            pod.name,
            Some(pod.name),
            &exe,
            &["whoami", pod.name, &v4, &v6],
        )?);
    }
    for node in NODES {
        let cidrs = "10.32.0.0/16,fd00:10:32::/56";
        others.push(Background::start(
            &format!("kube-proxy-{}", node.name),
            Some(node.name),
            "/bin/kube-proxy",
            &[
                "--kubeconfig=/e2e/kubeconfig-node",
                &format!("--hostname-override={}", node.name),
                "--proxy-mode=iptables",
                &format!("--cluster-cidr={cidrs}"),
                // A namespace cannot change the host's conntrack table size.
                "--conntrack-max-per-core=0",
                "--conntrack-min=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--iptables-min-sync-period=0s",
                // Each sync rewrites the chains and so zeroes the rule counters the test
                // reads; changes still sync at once.
                "--iptables-sync-period=1h",
                "--iptables-localhost-nodeports=false",
                "--v=1",
            ],
        )?);
    }
    sh("ipvsadm", &["-A", FOREIGN.0, FOREIGN.1, "-s", "rr"])?;
    Ok(Run {
        kube,
        director: None,
        others,
        numbers: Vec::new(),
        health: Vec::new(),
    })
}

/// Step 1: the CRDs, the director, the example's pool and the whoami Service; the EXTERNAL-IP
/// and `kubectl get ippools`.
fn apply_the_demo(run: &mut Run) -> Result<(), String> {
    kubectl(&["apply", "-f", "/e2e/crds/"])?;
    kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/ippools.ipvslb.io",
        "crd/nodesets.ipvslb.io",
    ])?;
    run.director = Some(Background::start(
        "ipvslb",
        None,
        "/tests/ipvslb",
        &[
            "run",
            "--kubeconfig",
            cluster::KUBECONFIG,
            // Short, so that the repair step does not wait five minutes.
            "--resync",
            "3s",
            "--drain-grace",
            "5s",
            "--metrics-addr",
            "127.0.0.1:9090",
            "--identity",
            "director1",
            // The VM's host name, "(none)", names no Kubernetes object.
            "--director-name",
            "director",
            "--set-ipvs-sysctls",
        ],
    )?);
    apply(&cluster::slice_yaml("whoami", "web", Family::V4, &PODS))?;
    kubectl(&["apply", "-f", "/e2e/examples/whoami/pool.yaml"])?;

    let baseline = baseline(run)?;
    let poller = poller("first-answer", &format!("{VIP}:80"), 100)?;
    let applied = now_ms();
    kubectl(&["apply", "-f", "/e2e/examples/whoami/whoami.yaml"])?;
    wait_for_ingress(run, "whoami", |a| a == VIP, Duration::from_millis(50))?;
    let assigned = now_ms();
    let first = wait_for(
        "a first answer through the VIP",
        Duration::from_secs(90),
        POLL,
        || {
            let text = std::fs::read_to_string(&poller.log).unwrap_or_default();
            Ok(web::parse(&text)
                .into_iter()
                .find(|a| a.at_ms >= applied && a.outcome.is_ok()))
        },
    )?;
    poller.stop(Duration::from_secs(1));
    let ratio = |ms: u128| ms as f64 / baseline.max(1) as f64;
    let to_ip = assigned.saturating_sub(applied);
    let to_answer = first.at_ms.saturating_sub(applied);
    run.numbers.push(format!(
        "apply -> EXTERNAL-IP = {to_ip} ms (baseline {baseline} ms, ratio {:.2})",
        ratio(to_ip)
    ));
    run.numbers.push(format!(
        "apply -> first answer through the VIP = {to_answer} ms (ratio {:.2})",
        ratio(to_answer)
    ));

    let services = kubectl(&["get", "service", "whoami"])?;
    println!("{services}");
    let row = services.lines().nth(1).unwrap_or_default();
    if !row.split_whitespace().any(|w| w == VIP) {
        return Err(format!(
            "kubectl get service whoami shows no EXTERNAL-IP {VIP}: {row}"
        ));
    }
    // The pool's status follows the Service's, a status write later.
    let pools = wait_for("pool default counting one assigned", CONVERGE, POLL, || {
        let pools = kubectl(&["get", "ippools"])?;
        match column(&pools, "default", "ASSIGNED").as_deref() {
            Some("1") => Ok(Some(pools)),
            other => Err(format!("ASSIGNED {other:?} in\n{pools}")),
        }
    })?;
    println!("{pools}");
    Ok(())
}

/// Waits until an address of Service `name`'s `status.loadBalancer.ingress` is as `wanted`
/// says, and returns it.
fn wait_for_ingress(
    run: &Run,
    name: &str,
    wanted: impl Fn(&str) -> bool,
    every: Duration,
) -> Result<String, String> {
    wait_for(
        &format!("the EXTERNAL-IP of {name}"),
        CONVERGE,
        every,
        || Ok(run.kube.ingress(name)?.into_iter().find(|a| wanted(a))),
    )
}

/// This binary, which is also the pods' server and the client.
fn own_exe() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    Ok(exe.to_string_lossy().into_owned())
}

/// The baseline of the apply timings, measured the same way: `kubectl apply` of a Service of
/// another load balancer class, whose status this test writes itself, until it is seen.
fn baseline(run: &Run) -> Result<u128, String> {
    let start = now_ms();
    apply(
        "apiVersion: v1
kind: Service
metadata:
  name: baseline
  namespace: default
spec:
  type: LoadBalancer
  loadBalancerClass: example.com/not-ipvslb
  ports:
  - port: 80
",
    )?;
    run.kube.set_ingress("baseline", "192.0.2.99")?;
    wait_for(
        "the baseline's status",
        CONVERGE,
        Duration::from_millis(50),
        || {
            Ok(run
                .kube
                .ingress("baseline")?
                .contains(&"192.0.2.99".to_owned())
                .then_some(()))
        },
    )?;
    let took = now_ms().saturating_sub(start);
    kubectl(&["delete", "service", "baseline"])?;
    Ok(took)
}

/// The value in column `header` of the row named `name` of a `kubectl get` table.
fn column(table: &str, name: &str, header: &str) -> Option<String> {
    let mut lines = table.lines();
    let index = lines.next()?.split_whitespace().position(|h| h == header)?;
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.first() == Some(&name))
        .and_then(|words| words.get(index).map(|w| (*w).to_owned()))
}

/// A client in `client` asking `target` every `every_ms` until stopped; its answers are in its
/// log.
fn poller(name: &str, target: &str, every_ms: u32) -> Result<Background, String> {
    let exe = own_exe()?;
    let every = every_ms.to_string();
    Background::start(name, Some(CLIENT), &exe, &["ask", target, "0", &every])
}

/// `count` requests from `ns` to `target`, one after another.
fn ask(ns: &str, target: &str, count: usize) -> Result<Vec<Answer>, String> {
    let exe = own_exe()?;
    let count = count.to_string();
    Ok(web::parse(&in_ns(ns, &[&exe, "ask", target, &count, "0"])?))
}

/// Waits until `count` requests in a row are all answered (kube-proxy and the director may
/// still be catching up with a change), then returns those answers.
fn ask_until_answered(ns: &str, target: &str, count: usize) -> Result<Vec<Answer>, String> {
    wait_for(
        &format!("answers from {target} in {ns}"),
        CONVERGE,
        POLL,
        || {
            let answers = ask(ns, target, count)?;
            match answers.iter().find_map(|a| a.outcome.clone().err()) {
                Some(e) => Err(e),
                None if answers.len() == count => Ok(Some(answers)),
                None => Err(format!("{} answers of {count}", answers.len())),
            }
        },
    )
}

/// The node each answer came through (from the address the pod saw).
fn via(answers: &[Answer]) -> Vec<&'static str> {
    answers
        .iter()
        .map(|a| a.remote().and_then(node_of).unwrap_or("?"))
        .collect()
}

/// `pod@node` for each answer (`pod@address` when the pod saw an address of no node), for the
/// log.
fn shown(answers: &[Answer]) -> String {
    answers
        .iter()
        .map(|a| match (a.pod(), a.remote()) {
            (Some(pod), Some(remote)) => match node_of(remote) {
                Some(node) => format!("{pod}@{node}"),
                None => format!("{pod}@{remote}"),
            },
            _ => "error".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The nodes must take turns, as `rr` over two destinations sends them.
fn alternates(answers: &[Answer]) -> Result<(), String> {
    let nodes = via(answers);
    let turns = nodes.windows(2).all(|w| w[0] != w[1]);
    let both = NODES.iter().all(|n| nodes.contains(&n.name));
    if turns && both && !nodes.contains(&"?") {
        Ok(())
    } else {
        Err(format!("the nodes did not take turns: {}", shown(answers)))
    }
}

/// How the traffic of some requests went: the director's IPVS counters of the virtual service,
/// the packets the director forwarded through its IP stack, and those each node sent straight
/// to the client on the segment.
struct Paths {
    ipvs: witness::Counters,
    forwarded: u64,
    to_client: Vec<u64>,
}

/// Reads the path counters around `traffic`.
fn paths<T>(key: &str, traffic: impl FnOnce() -> Result<T, String>) -> Result<(T, Paths), String> {
    let read = || -> Result<_, String> {
        let stats = witness::stats()?;
        let forwarded = witness::forwarded()?;
        let to_client: Vec<u64> = NODES
            .iter()
            .map(|n| witness::sent_to_client(n.name))
            .collect::<Result<_, _>>()?;
        Ok((stats, forwarded, to_client))
    };
    let (stats, forwarded, to_client) = read()?;
    let result = traffic()?;
    let (stats_after, forwarded_after, to_client_after) = read()?;
    Ok((
        result,
        Paths {
            ipvs: witness::delta(&stats, &stats_after, key)?,
            forwarded: forwarded_after.saturating_sub(forwarded),
            to_client: to_client_after
                .iter()
                .zip(&to_client)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        },
    ))
}

/// Direct routing and tunnels answer from the node: the director forwards nothing, and every
/// node sends to the client itself.
fn answered_directly(paths: &Paths) -> Result<(), String> {
    if paths.forwarded != 0 {
        return Err(format!(
            "the director forwarded {} packets; the nodes should answer the client themselves",
            paths.forwarded
        ));
    }
    if paths.to_client.contains(&0) {
        return Err(format!(
            "a node sent nothing straight to the client (packets per node: {:?})",
            paths.to_client
        ));
    }
    Ok(())
}

/// Step 2: round robin over both nodes, through the director and through kube-proxy, the
/// answers straight from the nodes.
fn round_robin(_: &mut Run) -> Result<(), String> {
    const N: usize = 24;
    let target = format!("{VIP}:80");
    let key = format!("TCP {target}");
    // Both nodes' kube-proxy has the VIP's rules once two requests in a row are answered.
    ask_until_answered(CLIENT, &target, 2)?;
    let service = witness::service(&key)?.ok_or_else(|| format!("no {key} in the kernel"))?;
    if service.scheduler != "rr" {
        return Err(format!(
            "{key} is scheduled by {}, not the NodeSet's rr",
            service.scheduler
        ));
    }
    let hits_before: Vec<u64> = NODES
        .iter()
        .map(|n| witness::kube_proxy_hits(n.name, VIP, 80))
        .collect::<Result<_, _>>()?;
    let before = witness::stats()?;
    let (answers, paths) = paths(&key, || ask(CLIENT, &target, N))?;
    let after = witness::stats()?;
    println!("round robin: {}", shown(&answers));
    if let Some(e) = answers.iter().find_map(|a| a.outcome.clone().err()) {
        return Err(format!("a request through the VIP failed: {e}"));
    }
    alternates(&answers)?;
    let pods: BTreeSet<usize> = answers
        .iter()
        .filter_map(|a| PODS.iter().find(|p| Some(p.name) == a.pod()))
        .map(|p| p.node)
        .collect();
    if pods.len() != NODES.len() {
        return Err(format!(
            "pods of only one node answered: {}",
            shown(&answers)
        ));
    }
    let half = (N / 2) as u64;
    for (node, hits_before) in NODES.iter().zip(hits_before) {
        let counted = witness::delta(&before, &after, &format!("{key} -> {}:80", node.v4))?;
        if counted.conns != half {
            return Err(format!(
                "ipvsadm counted {} connections to {}, not {half}",
                counted.conns, node.name
            ));
        }
        let hits = witness::kube_proxy_hits(node.name, VIP, 80)?
            .checked_sub(hits_before)
            .ok_or("kube-proxy's rule counters went down: it rewrote its chains meanwhile")?;
        if hits != half {
            return Err(format!(
                "kube-proxy's rules for {VIP}:80 on {} matched {hits} connections, not {half}",
                node.name
            ));
        }
    }
    answered_directly(&paths)?;
    // The kernel's own counters reach the director's metrics (refreshed by each full pass).
    for node in NODES {
        let series = format!(
            "ipvslb_destination_total{{counter=\"connections\",service=\"{key}\",destination=\"{}:80\"}}",
            node.v4
        );
        let exported = wait_for("the kernel's counters in /metrics", CONVERGE, POLL, || {
            Ok(witness::metric(&series)?.filter(|n| *n >= half))
        })?;
        println!("{series} {exported}");
    }
    Ok(())
}

/// The destinations of `key`, once the director's table has it as `check` wants.
fn table_until(
    what: &str,
    key: &str,
    check: impl Fn(Option<&witness::Service>) -> bool,
) -> Result<Option<witness::Service>, String> {
    wait_for(what, CONVERGE, POLL, || {
        let service = witness::service(key)?;
        if check(service.as_ref()) {
            Ok(Some(service))
        } else {
            Err(format!("{key}: {service:?}"))
        }
    })
}

/// Whether `service` sends to exactly the nodes `nodes` (by address) with weight 1 over
/// `forward` to `port`.
fn serves(service: Option<&witness::Service>, nodes: &[&str], port: u16, forward: &str) -> bool {
    let Some(service) = service else {
        return false;
    };
    let mut want: Vec<String> = nodes.iter().map(|n| endpoint(n, port)).collect();
    want.sort();
    let mut have: Vec<String> = service
        .destinations
        .iter()
        .filter(|d| d.weight > 0 && d.forward == forward)
        .map(|d| d.addr.clone())
        .collect();
    have.sort();
    have == want && service.destinations.len() == nodes.len()
}

/// `addr:port`, bracketed for IPv6, as ipvsadm prints it.
fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

fn both_nodes_v4() -> Vec<&'static str> {
    NODES.iter().map(|n| n.v4).collect()
}

/// Step 3: the Service's port changes; the table follows.
fn port_change(_: &mut Run) -> Result<(), String> {
    let nodes = both_nodes_v4();
    let set_port = |port: u16| {
        kubectl(&[
            "patch",
            "service",
            "whoami",
            "--type=json",
            "-p",
            &format!(r#"[{{"op":"replace","path":"/spec/ports/0/port","value":{port}}}]"#),
        ])
    };
    set_port(8080)?;
    table_until(
        "the virtual service on port 8080",
        &format!("TCP {VIP}:8080"),
        |s| serves(s, &nodes, 8080, "Route"),
    )?;
    table_until("port 80 gone", &format!("TCP {VIP}:80"), |s| s.is_none())?;
    ask_until_answered(CLIENT, &format!("{VIP}:8080"), 4)?;
    let old = ask(CLIENT, &format!("{VIP}:80"), 2)?;
    if let Some(answer) = old.iter().find(|a| a.outcome.is_ok()) {
        return Err(format!("the old port 80 still answered: {answer:?}"));
    }
    set_port(80)?;
    table_until(
        "the virtual service back on port 80",
        &format!("TCP {VIP}:80"),
        |s| serves(s, &nodes, 80, "Route"),
    )?;
    ask_until_answered(CLIENT, &format!("{VIP}:80"), 4).map(drop)
}

/// Step 4: node2 reported NotReady; new connections go to node1 only.
fn node_not_ready(run: &mut Run) -> Result<(), String> {
    let key = format!("TCP {VIP}:80");
    let poller = poller("not-ready", &format!("{VIP}:80"), 50)?;
    std::thread::sleep(Duration::from_secs(1));
    let written = now_ms();
    run.kube.set_ready("node2", false)?;
    let drained = table_until("node2 out of rotation", &key, |s| {
        s.is_some_and(|s| {
            s.destinations
                .iter()
                .all(|d| d.addr != endpoint(NODES[1].v4, 80) || d.weight == 0)
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = poller.stop(Duration::from_secs(1));
    drained?;
    let answers: Vec<Answer> = web::parse(&log)
        .into_iter()
        .filter(|a| a.at_ms >= written)
        .collect();
    let last_node2 = answers
        .iter()
        .zip(via(&answers))
        .filter(|(_, node)| *node == "node2")
        .map(|(a, _)| a.at_ms)
        .max();
    run.numbers.push(match last_node2 {
        Some(at) => format!("node NotReady -> last answer from it = {} ms", at - written),
        None => "node NotReady -> last answer from it = 0 ms (none after the write)".to_owned(),
    });
    let later: Vec<Answer> = answers
        .iter()
        .filter(|a| last_node2.is_none_or(|at| a.at_ms > at))
        .cloned()
        .collect();
    if let Some(e) = answers.iter().find_map(|a| a.outcome.clone().err()) {
        return Err(format!("a request failed while node2 left: {e}"));
    }
    if later.len() < 10 || via(&later).iter().any(|n| *n != "node1") {
        return Err(format!(
            "after node2's last answer, wanted 10 or more answers all through node1: {}",
            shown(&later)
        ));
    }
    println!("after NotReady: {}", shown(&later[..later.len().min(12)]));
    run.kube.set_ready("node2", true)?;
    let nodes = both_nodes_v4();
    table_until("node2 back", &key, |s| serves(s, &nodes, 80, "Route"))?;
    Ok(())
}

/// Step 5: `ipvsadm -C` wipes the table; the next full pass puts it back as planned.
fn ipvsadm_clear(run: &mut Run) -> Result<(), String> {
    let foreign = format!("TCP {}", FOREIGN.1);
    if witness::service(&foreign)?.is_none() {
        return Err(format!(
            "the foreign service {foreign} is gone after several full passes"
        ));
    }
    let planned = witness::saved(VIP)?;
    if planned.is_empty() {
        return Err(format!(
            "ipvsadm -S shows nothing for {VIP} before the clear"
        ));
    }
    let cleared = now_ms();
    sh("ipvsadm", &["-C"])?;
    wait_for(
        "the table repaired",
        CONVERGE,
        Duration::from_millis(50),
        || {
            let now = witness::saved(VIP)?;
            if now == planned {
                Ok(Some(()))
            } else {
                Err(format!("{now:?}, planned {planned:?}"))
            }
        },
    )?;
    run.numbers.push(format!(
        "ipvsadm -C -> table repaired by the full pass = {} ms (--resync 3s)",
        now_ms() - cleared
    ));
    // Its owner would put the foreign service back; the next step checks ipvslb leaves it.
    sh("ipvsadm", &["-A", FOREIGN.0, FOREIGN.1, "-s", "rr"])?;
    ask_until_answered(CLIENT, &format!("{VIP}:80"), 4).map(drop)
}

/// Step 6: the Service deleted; its virtual service and VIP leave, the foreign service stays.
fn delete_the_service(_: &mut Run) -> Result<(), String> {
    kubectl(&["delete", "service", "whoami"])?;
    wait_for("the VIP gone from the kernel", CONVERGE, POLL, || {
        let rules = witness::saved(VIP)?;
        let addresses = witness::addresses("ipvslb0")?;
        if rules.is_empty() && !addresses.iter().any(|a| a == VIP) {
            Ok(Some(()))
        } else {
            Err(format!("rules {rules:?}, ipvslb0 {addresses:?}"))
        }
    })?;
    // A full pass (every 3 s) is what would collect an entry it wrongly took for its own.
    std::thread::sleep(Duration::from_secs(4));
    let foreign = format!("TCP {}", FOREIGN.1);
    if witness::service(&foreign)?.is_none() {
        return Err(format!("the foreign service {foreign} is gone"));
    }
    Ok(())
}

/// Sets `spec.forwarding` of NodeSet `node_set`.
fn set_forwarding(node_set: &str, forwarding: &str) -> Result<(), String> {
    patch_node_set(node_set, &format!(r#"{{"forwarding":"{forwarding}"}}"#))
}

/// Merges `spec` (JSON) into NodeSet `node_set`.
fn patch_node_set(node_set: &str, spec: &str) -> Result<(), String> {
    kubectl(&[
        "patch",
        "nodeset",
        node_set,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{spec}}}"#),
    ])
    .map(drop)
}

/// Eight requests from `ns` to `target` once it answers, which must take turns between the
/// nodes; returns the paths they took.
fn taking_turns(label: &str, ns: &str, target: &str, key: &str) -> Result<Paths, String> {
    ask_until_answered(ns, target, 2)?;
    let (answers, paths) = paths(key, || ask_until_answered(ns, target, 8))?;
    println!("{label}: {}", shown(&answers));
    alternates(&answers)?;
    Ok(paths)
}

/// Step 7a: masquerade to the NodePort, from a client beyond the director.
fn masquerade(run: &mut Run) -> Result<(), String> {
    set_forwarding("default", "Masquerade")?;
    kubectl(&["apply", "-f", "/e2e/examples/whoami/whoami.yaml"])?;
    wait_for_ingress(run, "whoami", |a| a == VIP, POLL)?;
    let node_port: u16 = kubectl(&[
        "get",
        "service",
        "whoami",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ])?
    .trim()
    .parse()
    .map_err(|e| format!("the NodePort of whoami: {e}"))?;
    let key = format!("TCP {VIP}:80");
    table_until("masquerading to the NodePort", &key, |s| {
        serves(s, &both_nodes_v4(), node_port, "Masq")
    })?;
    let paths = taking_turns("masquerade", REMOTE, &format!("{VIP}:80"), &key)?;
    if paths.ipvs.out_pkts == 0 || paths.forwarded == 0 {
        return Err(format!(
            "masquerading needs the answers back through the director: IPVS saw {} answer \
             packets, the director forwarded {}",
            paths.ipvs.out_pkts, paths.forwarded
        ));
    }
    Ok(())
}

/// Step 7b: IP-in-IP to the nodes, which decapsulate on `tunl0`.
fn tunnel(_: &mut Run) -> Result<(), String> {
    for node in NODES {
        hosts::accept_tunnel(node.name)?;
    }
    set_forwarding("default", "Tunnel")?;
    let key = format!("TCP {VIP}:80");
    table_until("tunnelling to the nodes", &key, |s| {
        serves(s, &both_nodes_v4(), 80, "Tunnel")
    })?;
    answered_directly(&taking_turns("tunnel", CLIENT, &format!("{VIP}:80"), &key)?)?;
    set_forwarding("default", "DirectRouting")?;
    table_until("direct routing again", &key, |s| {
        serves(s, &both_nodes_v4(), 80, "Route")
    })
    .map(drop)
}

/// Step 8: the dual-stack example's IPv6 VIP, over direct routing.
fn ipv6(run: &mut Run) -> Result<(), String> {
    let example = std::fs::read_to_string("/e2e/examples/dual-stack/dual-stack.yaml")
        .map_err(|e| format!("reading the dual-stack example: {e}"))?;
    // Its Nodes describe the same two nodes; the test's own (with labels) stay as they are.
    let without_nodes: Vec<&str> = example
        .split("\n---\n")
        .filter(|doc| !doc.lines().any(|l| l == "kind: Node"))
        .collect();
    apply(&without_nodes.join("\n---\n"))?;
    // The issue's IPv6 check is over direct routing, and turns are taken under rr (the example
    // shows masquerading and wlc).
    patch_node_set("dual", r#"{"forwarding":"DirectRouting","scheduler":"rr"}"#)?;
    apply(&cluster::slice_yaml("web", "https", Family::V6, &PODS))?;
    apply(&cluster::slice_yaml("web", "https", Family::V4, &PODS))?;
    let vip6 = wait_for_ingress(run, "web", |a| a.contains(':'), POLL)?;
    let key = format!("TCP [{vip6}]:443");
    let nodes: Vec<&str> = NODES.iter().map(|n| n.v6).collect();
    table_until("the IPv6 virtual service", &key, |s| {
        serves(s, &nodes, 443, "Route")
    })?;
    let label = format!("ipv6 {vip6}");
    answered_directly(&taking_turns(
        &label,
        CLIENT,
        &format!("[{vip6}]:443"),
        &key,
    )?)
}

/// Step 9: `externalTrafficPolicy: Local` with pods on node1 only.
fn local_traffic_policy(run: &mut Run) -> Result<(), String> {
    apply(
        "apiVersion: v1
kind: Service
metadata:
  name: whoami-local
  namespace: default
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector:
    app: whoami
  ports:
  - name: web
    port: 80
    protocol: TCP
",
    )?;
    apply(&cluster::slice_yaml(
        "whoami-local",
        "web",
        Family::V4,
        &cluster::pods_on(0),
    ))?;
    let vip = wait_for_ingress(run, "whoami-local", |a| !a.contains(':'), POLL)?;
    let key = format!("TCP {vip}:80");
    table_until("node1 only", &key, |s| {
        serves(s, &[NODES[0].v4], 80, "Route")
    })?;
    let answers = ask_until_answered(CLIENT, &format!("{vip}:80"), 6)?;
    println!("local {vip}: {}", shown(&answers));
    let client: std::net::IpAddr = CLIENT_V4.parse().map_err(|e| format!("{e}"))?;
    for answer in &answers {
        let on_node1 = PODS
            .iter()
            .any(|p| p.node == 0 && Some(p.name) == answer.pod());
        if !on_node1 || answer.remote() != Some(client) {
            return Err(format!(
                "wanted node1's pods seeing the client's own address {client}: {answer:?}"
            ));
        }
    }
    Ok(())
}

/// The port of the node agents the health step checks.
const AGENT_PORT: u16 = 8081;

/// A node agent: an HTTP server on `node`'s own address, which the health checks probe.
fn agent(node: &hosts::Node) -> Result<Background, String> {
    let exe = own_exe()?;
    let addr = format!("{}:{AGENT_PORT}", node.v4);
    Background::start(
        &format!("agent-{}", node.name),
        Some(node.name),
        &exe,
        &["whoami", &format!("agent-{}", node.name), &addr],
    )
}

/// Sets the health check of NodeSet `default`; `timing` is extra JSON fields.
fn check_agents(timing: &str) -> Result<(), String> {
    patch_node_set(
        "default",
        &format!(
            r#"{{"healthCheck":{{"type":"HTTP","port":{AGENT_PORT},"path":"/healthz"{timing}}}}}"#
        ),
    )
}

/// Step 10: the director checks the nodes itself: a dead node agent takes its node out within
/// the check's timing, a live download to it finishes, it comes back when the agent does, and
/// 20% packet loss does not make it flap.
fn health(run: &mut Run) -> Result<(), String> {
    let target = format!("{VIP}:80");
    let key = format!("TCP {target}");
    for (name, value) in ipvslb::dataplane::IPVS_SYSCTLS {
        let path = format!("/proc/sys/net/ipv4/vs/{name}");
        let set = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        if set.trim() != value {
            return Err(format!("--set-ipvs-sysctls left {path} at {}", set.trim()));
        }
    }
    let mut agents: Vec<Background> = NODES.iter().map(agent).collect::<Result<_, _>>()?;
    check_agents(r#","interval":"500ms","timeout":"400ms","rise":2,"fall":3"#)?;
    let both = both_nodes_v4();
    table_until("both nodes healthy", &key, |s| {
        serves(s, &both, 80, "Route")
    })?;
    // Two long downloads: round robin puts one on each node.
    let exe = own_exe()?;
    let downloads: Vec<Background> = (0..2)
        .map(|i| {
            Background::start(
                &format!("download-{i}"),
                Some(CLIENT),
                &exe,
                &["ask", &target, "1", "0", "/slow"],
            )
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(500));

    let node2 = endpoint(NODES[1].v4, 80);
    let killed = now_ms();
    agents.remove(1).stop(Duration::ZERO);
    wait_for(
        "node2 out after its agent died",
        CONVERGE,
        Duration::from_millis(50),
        || {
            let service = witness::service(&key)?;
            let out = service.is_some_and(|s| {
                s.destinations
                    .iter()
                    .all(|d| d.addr != node2 || d.weight == 0)
            });
            Ok(out.then_some(()))
        },
    )?;
    let detection = now_ms().saturating_sub(killed);
    // Not a timing target (the figure is printed): well under the 40 s of a NotReady and the
    // full pass, it says the check took the node out, not something else.
    if detection > 10_000 {
        return Err(format!(
            "node2 went out {detection} ms after its agent died: not by its health check"
        ));
    }
    let answers = ask(CLIENT, &target, 8)?;
    println!("after node2's agent died: {}", shown(&answers));
    if answers.iter().any(|a| a.outcome.is_err()) || via(&answers).iter().any(|n| *n != "node1") {
        return Err(format!(
            "wanted every new connection through node1: {}",
            shown(&answers)
        ));
    }
    let mut finished = Vec::new();
    for download in downloads {
        let log = wait_for("a long download to end", CONVERGE, POLL, || {
            let text = std::fs::read_to_string(&download.log).unwrap_or_default();
            Ok((!web::parse(&text).is_empty()).then_some(text))
        })?;
        finished.extend(web::parse(&log));
    }
    println!("downloads in flight: {}", shown(&finished));
    if let Some(e) = finished.iter().find_map(|a| a.outcome.clone().err()) {
        return Err(format!(
            "a download in flight while its node drained failed: {e}"
        ));
    }
    if !via(&finished).contains(&"node2") {
        return Err(format!(
            "no download went through node2, so none was in flight through the drained node: {}",
            shown(&finished)
        ));
    }
    if witness::transitions(NODES[1].v4, AGENT_PORT, "down")? == 0 {
        return Err("the director's metrics count no transition of node2's check".to_owned());
    }
    let columns = wait_for(
        "kubectl get nodesets counting node2 out",
        CONVERGE,
        POLL,
        || {
            let text = kubectl(&["get", "nodesets", "default"])?;
            let ready = column(&text, "default", "READY");
            let total = column(&text, "default", "TOTAL");
            Ok((ready.as_deref() == Some("1") && total.as_deref() == Some("2")).then_some(text))
        },
    )?;
    println!("{columns}");
    backend_event("BackendDown")?;

    let revived = now_ms();
    agents.push(agent(&NODES[1])?);
    table_until("node2 back with its agent", &key, |s| {
        serves(s, &both, 80, "Route")
    })?;
    let recovery = now_ms().saturating_sub(revived);
    backend_event("BackendUp")?;
    println!("health: detection at interval 500ms, fall 3; recovery at rise 2");
    run.health
        .push(format!("detection = {:.2} s", detection as f64 / 1000.0));
    run.health
        .push(format!("recovery = {:.2} s", recovery as f64 / 1000.0));

    // The default timing under 20% packet loss from node2, for a minute. A merge patch keeps
    // the fields it does not name, so the check is written afresh.
    patch_node_set("default", r#"{"healthCheck":null}"#)?;
    check_agents("")?;
    let set = kubectl(&[
        "get",
        "nodeset",
        "default",
        "-o",
        "jsonpath={.spec.healthCheck}",
    ])?;
    if !set.contains(r#""interval":"5s""#) {
        return Err(format!("the check is not at its default timing: {set}"));
    }
    let before: u64 = ["down", "up"]
        .iter()
        .map(|s| witness::transitions(NODES[1].v4, AGENT_PORT, s))
        .sum::<Result<_, _>>()?;
    witness::lossy(NODES[1].name, 20)?;
    std::thread::sleep(Duration::from_secs(60));
    witness::lossless(NODES[1].name)?;
    let after: u64 = ["down", "up"]
        .iter()
        .map(|s| witness::transitions(NODES[1].v4, AGENT_PORT, s))
        .sum::<Result<_, _>>()?;
    let flaps = after.saturating_sub(before);
    println!("health: flaps are transitions over a minute at 20% loss, default timing");
    run.health.push(format!("flaps = {flaps}"));
    patch_node_set("default", r#"{"healthCheck":null}"#)?;
    run.others.extend(agents);
    if flaps > 0 {
        return Err(format!(
            "node2's check flapped {flaps} times under 20% loss"
        ));
    }
    Ok(())
}

/// Waits for an Event of `reason` on NodeSet `default`, and prints it.
fn backend_event(reason: &str) -> Result<(), String> {
    let selector =
        format!("involvedObject.kind=NodeSet,involvedObject.name=default,reason={reason}");
    let events = wait_for(
        &format!("a {reason} Event on NodeSet default"),
        CONVERGE,
        POLL,
        || {
            let text = kubectl(&["get", "events", "-A", "--field-selector", &selector])?;
            Ok((text.lines().count() > 1).then_some(text))
        },
    )?;
    println!("{events}");
    Ok(())
}

/// Step 12: two directors announcing over BGP behind a router with ECMP; the loss, return and
/// drained stop of a director, and a VIP without a ready node, each with downloads running.
fn director_tier(run: &mut Run) -> Result<(), String> {
    let mut measured = crate::tier::Measured::default();
    let outcome = crate::tier::step(&run.kube, &mut measured);
    // What was measured is printed even when a later part failed.
    run.health.extend(measured.lines);
    outcome
}

/// Step 13: two directors on the flat segment in L2 mode: one MAC per VIP, the loss, clean
/// stop and partition of an announcer, IPv6 included, and `kubectl get directors` and
/// `ipvslb status` against the kernels.
fn l2(run: &mut Run) -> Result<(), String> {
    let mut lines = Vec::new();
    let outcome = crate::l2::step(&run.kube, &mut lines);
    run.health.extend(lines);
    outcome
}
