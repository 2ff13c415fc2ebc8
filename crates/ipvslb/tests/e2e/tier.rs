//! A tier of two active directors behind a router, as the write-up's architecture has them:
//! each announces the VIPs it can serve over BGP through BIRD (with the shipped
//! `deploy/bird/` configurations), the router spreads the flows over both by ECMP, and every
//! director sends a flow to the same backend (`mh`), so losing a director breaks no flow.
//!
//! ```text
//!  bgpclient 198.51.100.2 ── router 198.51.100.1 / 10.240.0.1 (BIRD, ECMP)
//!                                      │ br0 (the nodes' segment)
//!        dir1 10.240.0.21 ─────────────┼───────────── dir2 10.240.0.22
//!        ipvslb --role director, BIRD  │              ipvslb --role director, BIRD
//!                          node1, node2 (kube-proxy; they answer the client through the router)
//! ```

use std::time::{Duration, Instant};

use crate::cluster::{self, Family, Kube, apply, kubectl, wait_for};
use crate::hosts::{Background, NODES, PODS, in_ns, sh};

pub const ROUTER: &str = "router";
pub const ROUTER_V4: &str = "10.240.0.1";
pub const CLIENT: &str = "bgpclient";
pub const DIRECTORS: [(&str, &str); 2] = [("dir1", "10.240.0.21"), ("dir2", "10.240.0.22")];
/// Their IPv6 addresses on the segment: BGP gives an IPv6 VIP the announcing director's
/// address as its next hop, so each needs one before BIRD starts.
const SEGMENT_V6: [(&str, &str); 3] = [
    (ROUTER, "fd00:240::1"),
    ("dir1", "fd00:240::21"),
    ("dir2", "fd00:240::22"),
];
/// The tier's VIP: the first of the example's pool.
pub const VIP: &str = "10.240.0.232";
/// How many downloads run across each director change, and for how long.
const STREAMS: usize = 16;
const STREAM_SECONDS: u64 = 20;

/// What the tier's run measured, printed at the end of the run.
#[derive(Debug, Default)]
pub struct Measured {
    pub lines: Vec<String>,
}

/// The router, its client and the two directors' namespaces, linked to the nodes' segment.
pub fn build() -> Result<(), String> {
    let on_segment = [(ROUTER, ROUTER_V4), DIRECTORS[0], DIRECTORS[1]];
    for (i, (ns, v4)) in on_segment.iter().enumerate() {
        sh("ip", &["netns", "add", ns])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        let outer = format!("vt{i}");
        sh(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        sh("ip", &["link", "set", &outer, "master", "br0", "up"])?;
        in_ns(
            ns,
            &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"],
        )?;
        in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
    }
    for (ns, v6) in SEGMENT_V6 {
        // No duplicate address detection: the test hosts are alone on their links.
        in_ns(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
    }
    sh("ip", &["netns", "add", CLIENT])?;
    in_ns(CLIENT, &["ip", "link", "set", "lo", "up"])?;
    in_ns(
        ROUTER,
        &[
            "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", CLIENT,
        ],
    )?;
    in_ns(
        ROUTER,
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "eth1"],
    )?;
    in_ns(ROUTER, &["ip", "link", "set", "eth1", "up"])?;
    in_ns(
        CLIENT,
        &["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"],
    )?;
    in_ns(CLIENT, &["ip", "link", "set", "eth0", "up"])?;
    in_ns(
        CLIENT,
        &["ip", "route", "add", "default", "via", "198.51.100.1"],
    )?;
    // ECMP on the 5-tuple, as the router needs (deploy/bird/README.md).
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.fib_multipath_hash_policy=1",
    ] {
        in_ns(ROUTER, &["sysctl", "-q", "-w", setting])?;
    }
    for (ns, _) in DIRECTORS {
        in_ns(ns, &["ip", "route", "add", "default", "via", ROUTER_V4])?;
    }
    // Direct routing: the nodes answer the client themselves, through the router.
    for node in NODES {
        in_ns(
            node.name,
            &["ip", "route", "add", "198.51.100.0/24", "via", ROUTER_V4],
        )?;
    }
    Ok(())
}

/// `deploy/bird/NAME.conf` with its `define NAME = VALUE;` lines set as `values` say.
fn bird_config(name: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let path = format!("/e2e/deploy/bird/{name}.conf");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut missing: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            for (key, value) in values {
                let prefix = format!("define {key} ");
                if line.starts_with(&prefix) {
                    missing.retain(|k| k != key);
                    return format!("define {key} = {value};");
                }
            }
            line.to_owned()
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!("{path} defines no {missing:?}"));
    }
    Ok(lines.join("\n") + "\n")
}

/// BIRD in `ns` with `config`, its control socket at `/tmp/bird-<ns>.ctl`.
fn bird(ns: &str, config: &str) -> Result<Background, String> {
    let path = format!("/tmp/bird-{ns}.conf");
    std::fs::write(&path, config).map_err(|e| format!("writing {path}: {e}"))?;
    let socket = format!("/tmp/bird-{ns}.ctl");
    Background::start(
        &format!("bird-{ns}"),
        Some(ns),
        "/sbin/bird",
        &["-f", "-c", &path, "-s", &socket],
    )
}

fn director_bird(ns: &str, v4: &str) -> Result<Background, String> {
    bird(
        ns,
        &bird_config(
            "director",
            &[("DIRECTOR_ADDR", v4), ("ROUTER_ADDR", ROUTER_V4)],
        )?,
    )
}

/// How a director takes over the flows another one started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// `--sloppy`: from any packet, by the same Maglev hash.
    Sloppy,
    /// `--sync-interface`: from the connections the other director multicast.
    Sync,
}

/// `ipvslb run --role director` in `ns`, announcing over BGP.
fn director(ns: &str, takeover: Takeover) -> Result<Background, String> {
    // The setting outlives the process: a director started without it must not inherit it.
    let sloppy = u8::from(takeover == Takeover::Sloppy);
    for setting in ["sloppy_tcp", "sloppy_sctp"] {
        let _ = in_ns(
            ns,
            &[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.vs.{setting}={sloppy}"),
            ],
        );
    }
    let mut args = vec![
        "run",
        "--role",
        "director",
        "--kubeconfig",
        "/e2e/kubeconfig-node",
        "--director-name",
        ns,
        "--announce-interface",
        "ipvslb-announce",
        "--drain-on-stop",
        "3s",
        "--resync",
        "3s",
        "--set-ipvs-sysctls",
    ];
    match takeover {
        Takeover::Sloppy => args.push("--sloppy"),
        Takeover::Sync => args.extend(["--sync-interface", "eth0", "--sync-id", "7"]),
    }
    Background::start(&format!("ipvslb-{ns}"), Some(ns), "/tests/ipvslb", &args)
}

/// The directors whose next hop the router's route for the VIP has.
fn next_hops() -> Result<Vec<&'static str>, String> {
    let route = in_ns(ROUTER, &["ip", "route", "show", &format!("{VIP}/32")])?;
    Ok(DIRECTORS
        .iter()
        .filter(|(_, v4)| route.contains(&format!("via {v4} ")))
        .map(|(ns, _)| *ns)
        .collect())
}

/// Waits until the router's next hops for the VIP are `wanted`; returns how long it took.
fn until_next_hops(wanted: &[&str], timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    wait_for(
        &format!("the router's next hops for {VIP} to be {wanted:?}"),
        timeout,
        Duration::from_millis(20),
        || {
            let now = next_hops()?;
            if now == wanted {
                Ok(Some(()))
            } else {
                Err(format!("next hops {now:?}"))
            }
        },
    )?;
    Ok(started.elapsed())
}

/// The connections a director's IPVS scheduled for the VIP so far.
fn connections(ns: &str) -> Result<u64, String> {
    let text = in_ns(
        ns,
        &["ipvsadm", "-L", "-n", "--stats", "-t", &format!("{VIP}:80")],
    )?;
    text.lines()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["TCP", addr, conns, ..] if addr.starts_with(VIP) => conns.parse().ok(),
                _ => None,
            }
        })
        .ok_or_else(|| format!("no TCP {VIP}:80 in the table of {ns}:\n{text}"))
}

/// The longest this guest's threads went unscheduled while watched: a thread that sleeps
/// 20 ms at a time and keeps the longest oversleep. Under TCG the whole guest stalls at
/// times, which reads as a network outage to every connection at once.
struct Stalls {
    longest_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stalls {
    fn watch() -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let stalls = Self {
            longest_ms: Default::default(),
            stop: Default::default(),
        };
        let (longest, stop) = (stalls.longest_ms.clone(), stalls.stop.clone());
        std::thread::spawn(move || {
            let tick = Duration::from_millis(20);
            while !stop.load(Relaxed) {
                let before = Instant::now();
                std::thread::sleep(tick);
                let over = before.elapsed().saturating_sub(tick);
                longest.fetch_max(u64::try_from(over.as_millis()).unwrap_or(u64::MAX), Relaxed);
            }
        });
        stalls
    }

    fn longest(&self) -> Duration {
        Duration::from_millis(self.longest_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for Stalls {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Downloads running from the client while `change` happens to the tier; how many broke.
fn across(label: &str, change: impl FnOnce() -> Result<(), String>) -> Result<usize, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let streams = Background::start(
        &format!("streams-{label}"),
        Some(CLIENT),
        &exe.to_string_lossy(),
        &[
            "streams",
            &format!("{VIP}:80"),
            &STREAMS.to_string(),
            &STREAM_SECONDS.to_string(),
        ],
    )?;
    let stalls = Stalls::watch();
    // Every download under way, over both directors, before the change.
    std::thread::sleep(Duration::from_secs(4));
    let changed = change();
    let mut streams = streams;
    wait_for(
        &format!("the downloads across {label} to end"),
        Duration::from_secs(STREAM_SECONDS + 30),
        Duration::from_millis(200),
        || Ok(streams.ended()),
    )?;
    changed?;
    let log = std::fs::read_to_string(&streams.log).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ok ") || l.contains(" broken "))
        .collect();
    if lines.len() != STREAMS {
        return Err(format!(
            "{label}: {} download lines, not {STREAMS}:\n{log}",
            lines.len()
        ));
    }
    let broken: Vec<&&str> = lines.iter().filter(|l| l.contains(" broken ")).collect();
    let pods: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter(|l| l.contains(" ok "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    println!(
        "e2e: across {label}: {} of {STREAMS} downloads broken, pods {pods:?}; the guest's longest stall meanwhile {:?}",
        broken.len(),
        stalls.longest()
    );
    for line in &broken {
        println!("e2e:   {line}");
    }
    Ok(broken.len())
}

/// The step: the tier comes up, spreads the flows, loses a director, gets it back, drains one
/// on purpose, withdraws when it cannot serve, and does it all again with the sync daemons.
pub fn step(kube: &Kube, measured: &mut Measured) -> Result<(), String> {
    let router = bird(
        ROUTER,
        &bird_config("router", &[("ROUTER_ADDR", ROUTER_V4)])?,
    )?;
    let mut birds: Vec<Option<Background>> = Vec::new();
    let mut directors: Vec<Option<Background>> = Vec::new();
    for (ns, v4) in DIRECTORS {
        birds.push(Some(director_bird(ns, v4)?));
        directors.push(Some(director(ns, Takeover::Sloppy)?));
    }
    kubectl(&["apply", "-f", "/e2e/examples/bgp-tier/tier.yaml"])?;
    apply(&cluster::slice_yaml("tier-web", "web", Family::V4, &PODS))?;
    wait_for(
        "the EXTERNAL-IP of tier-web",
        Duration::from_secs(45),
        Duration::from_millis(100),
        || Ok(kube.ingress("tier-web")?.into_iter().find(|a| a == VIP)),
    )?;
    let up = until_next_hops(&["dir1", "dir2"], Duration::from_secs(60))?;
    println!("e2e: the router has both directors as next hops for {VIP} after {up:.1?}");

    // Flows spread over both directors, every one answered.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let before = [connections("dir1")?, connections("dir2")?];
    let asked = in_ns(
        CLIENT,
        &[
            &exe.to_string_lossy(),
            "ask",
            &format!("{VIP}:80"),
            "40",
            "0",
        ],
    )?;
    let answers = crate::web::parse(&asked);
    let failed = answers.iter().filter(|a| a.outcome.is_err()).count();
    // The kernel sums its per-CPU counters every two seconds.
    std::thread::sleep(Duration::from_secs(3));
    let share = [
        connections("dir1")? - before[0],
        connections("dir2")? - before[1],
    ];
    measured
        .lines
        .push(format!("flow share = {}/{}", share[0], share[1]));
    if failed > 0 || answers.len() != 40 || share.contains(&0) {
        return Err(format!(
            "40 requests: {failed} failed of {}, {} and {} through dir1 and dir2",
            answers.len(),
            share[0],
            share[1]
        ));
    }

    // Losing dir1 without a word: its ipvslb and BIRD killed. Its kernel keeps its table, as a
    // crashed process leaves it; what moves the flows is the router's withdrawal.
    let mut withdrawal = Duration::ZERO;
    let mut on_dir2 = 0;
    let broken_kill = across("the loss of dir1", || {
        on_dir2 = connections("dir2")?;
        let lost = Instant::now();
        for process in [directors[0].take(), birds[0].take()].into_iter().flatten() {
            process.kill();
        }
        until_next_hops(&["dir2"], Duration::from_secs(15))?;
        withdrawal = lost.elapsed();
        Ok(())
    })?;
    // The downloads dir1 carried went on through dir2: sloppy mode scheduled each there anew,
    // to the node the Maglev hash gave it on dir1.
    let moved = connections("dir2")? - on_dir2;
    println!("e2e: {moved} downloads moved from dir1 to dir2 mid-connection");
    if moved == 0 {
        return Err(
            "no download went through dir1, so none moved: the loss proved nothing".to_owned(),
        );
    }
    measured
        .lines
        .push(format!("withdrawal = {:.2} s", withdrawal.as_secs_f64()));
    measured.lines.push(format!("flows broken = {broken_kill}"));

    // dir1 back: the flows rehash over both directors again.
    let broken_back = across("the return of dir1", || {
        birds[0] = Some(director_bird(DIRECTORS[0].0, DIRECTORS[0].1)?);
        directors[0] = Some(director(DIRECTORS[0].0, Takeover::Sloppy)?);
        until_next_hops(&["dir1", "dir2"], Duration::from_secs(60)).map(drop)
    })?;

    // dir2 stops on purpose: it withdraws first, serves on for the drain, then exits.
    let mut graceful = String::new();
    let broken_drain = across("the drained stop of dir2", || {
        let Some(dir2) = directors[1].take() else {
            return Err("dir2 is not running".to_owned());
        };
        let stopped = Instant::now();
        let withdrawn = std::thread::scope(|s| {
            let waiting = s.spawn(|| until_next_hops(&["dir1"], Duration::from_secs(15)));
            let log = dir2.stop(Duration::from_secs(20));
            let exited = stopped.elapsed();
            (waiting.join(), exited, log)
        });
        let (withdrawn, exited, log) = withdrawn;
        let withdrawn = withdrawn.map_err(|_| "the wait panicked".to_owned())??;
        graceful = format!(
            "withdrawn after {:.2} s, exited after {:.2} s",
            withdrawn.as_secs_f64(),
            exited.as_secs_f64()
        );
        if withdrawn >= exited || !log.contains("VIP announcements withdrawn") {
            return Err(format!(
                "dir2 did not withdraw before it stopped: {graceful}\n{log}"
            ));
        }
        Ok(())
    })?;
    println!("e2e: drained stop of dir2: {graceful}");

    // No backend that takes connections: both nodes NotReady. Neither director may draw the
    // VIP's traffic; once a node is back, both announce it again.
    directors[1] = Some(director(DIRECTORS[1].0, Takeover::Sloppy)?);
    until_next_hops(&["dir1", "dir2"], Duration::from_secs(60))?;
    for node in NODES {
        kube.set_ready(node.name, false)?;
    }
    let none = until_next_hops(&[], Duration::from_secs(30));
    for node in NODES {
        kube.set_ready(node.name, true)?;
    }
    let none = none?;
    let back = until_next_hops(&["dir1", "dir2"], Duration::from_secs(30))?;
    println!(
        "e2e: no ready node: withdrawn by both after {none:.1?}, announced again {back:.1?} after the nodes were back"
    );

    // The stateful way: the kernel's sync daemons, no sloppy mode, and dir2 lost this time.
    for slot in &mut directors {
        if let Some(process) = slot.take() {
            process.stop(Duration::from_secs(10));
        }
    }
    until_next_hops(&[], Duration::from_secs(15))?;
    for (i, (ns, _)) in DIRECTORS.iter().enumerate() {
        directors[i] = Some(director(ns, Takeover::Sync)?);
    }
    until_next_hops(&["dir1", "dir2"], Duration::from_secs(60))?;
    let before_sync = connections("dir2")?;
    let mut carried = 0;
    let broken_sync = across("the loss of dir2, with sync daemons", || {
        // The downloads dir2 carries when it goes: those its sync daemon handed to dir1.
        carried = connections("dir2")? - before_sync;
        for process in [directors[1].take(), birds[1].take()].into_iter().flatten() {
            process.kill();
        }
        until_next_hops(&["dir1"], Duration::from_secs(15)).map(drop)
    })?;
    println!("e2e: dir2 carried {carried} downloads when it was lost");
    if carried == 0 {
        return Err(
            "no download went through dir2, so none moved: the loss proved nothing".to_owned(),
        );
    }
    measured.lines.push(format!(
        "flows broken = {broken_sync} (sync daemons), {broken_back} (a director back), {broken_drain} (a drained stop)"
    ));

    for process in directors.into_iter().chain(birds).flatten() {
        process.stop(Duration::from_secs(5));
    }
    router.stop(Duration::from_secs(2));
    let total = broken_kill + broken_back + broken_drain + broken_sync;
    if total > 0 {
        return Err(format!(
            "{total} downloads broke across the director changes"
        ));
    }
    Ok(())
}
