//! L2 announcement on the write-up's flat segment: the directors `dir1` and `dir2` (namespaces on
//! br0, the nodes' segment) run `ipvslb run --role director --l2-interface eth0`, elect through
//! their Leases which of them answers ARP and NDP for each VIP of `examples/l2/`, and hand the
//! VIPs over when one is killed, stops, or loses the API server. The client on the segment
//! (`client`) reaches the VIPs by ARP and NDP alone, as the write-up's `master1` does.
//!
//! The director of the root namespace serves every pool too, without an announcement mode: for
//! this step its br0 answers ARP only for its own addresses (`arp_ignore=1`), as every director
//! on an L2 segment must; it answers neighbour solicitations for its own addresses only anyway.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::{self, Family, Kube, apply, kubectl, wait_for};
use crate::hosts::{Background, CLIENT, DIRECTOR_V4, PODS, in_ns, sh};
use crate::web::{self, now_ms};

/// The L2 directors (the namespaces the tier step made).
const DIRECTORS: [&str; 2] = ["dir1", "dir2"];
const POLL: Duration = Duration::from_millis(20);

/// The step's VIPs: `l2-api`'s, `l2-web`'s IPv4 and IPv6 ones.
struct Vips {
    api: String,
    web4: String,
    web6: String,
}

impl Vips {
    fn all(&self) -> [&str; 3] {
        [&self.api, &self.web4, &self.web6]
    }
}

/// `ipvslb run --role director` in `ns`, in L2 mode on its `eth0`; its log has every Lease
/// renewal, for reading a failure.
fn director(ns: &str) -> Result<Background, String> {
    Background::start_with(
        &format!("ipvslb-l2-{ns}"),
        Some(ns),
        "/tests/ipvslb",
        &[
            "run",
            "--role",
            "director",
            "--kubeconfig",
            "/e2e/kubeconfig-node",
            "--director-name",
            ns,
            "--l2-interface",
            "eth0",
            "--resync",
            "3s",
            "--set-ipvs-sysctls",
        ],
        &[("RUST_LOG", "info,ipvslb::peers=debug")],
    )
}

/// The addresses on `ns`'s `eth0`, one per line, as `ip -o addr` lists them.
fn eth0(ns: &str) -> Result<String, String> {
    in_ns(ns, &["ip", "-o", "addr", "show", "dev", "eth0"])
}

/// Whether `addresses` (from [`eth0`]) hold `vip`.
fn holds(addresses: &str, vip: &str) -> bool {
    addresses.contains(&format!(" {vip}/"))
}

/// The directors whose `eth0` holds `vip`: the ones whose kernel answers ARP or NDP for it.
fn holders(vip: &str) -> Result<Vec<&'static str>, String> {
    let mut found = Vec::new();
    for ns in DIRECTORS {
        if holds(&eth0(ns)?, vip) {
            found.push(ns);
        }
    }
    Ok(found)
}

/// The VIPs `ns`'s eth0 holds, from one reading of it.
fn held_by<'a>(ns: &str, vips: &'a Vips) -> Result<Vec<&'a str>, String> {
    let addresses = eth0(ns)?;
    Ok(vips
        .all()
        .into_iter()
        .filter(|vip| holds(&addresses, vip))
        .collect())
}

/// Waits until every VIP has exactly one holder among `live`; returns them.
fn settled(
    vips: &Vips,
    live: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, &'static str>, String> {
    wait_for(
        &format!("one announcer among {live:?} for each L2 VIP"),
        timeout,
        Duration::from_millis(100),
        || {
            let mut found = BTreeMap::new();
            for vip in vips.all() {
                match holders(vip)?.as_slice() {
                    [one] if live.contains(one) => {
                        found.insert(vip.to_owned(), *one);
                    }
                    other => return Err(format!("{vip} held by {other:?}")),
                }
            }
            Ok(Some(found))
        },
    )
}

/// Whom the election gives each VIP while both directors are live.
fn elected(vips: &Vips) -> BTreeMap<String, &'static str> {
    let election = ipvslb::election::Election {
        me: DIRECTORS[0].to_owned(),
        live: DIRECTORS.iter().map(|d| (*d).to_owned()).collect(),
    };
    vips.all()
        .into_iter()
        .map(|vip| {
            let winner = vip
                .parse()
                .ok()
                .and_then(|v| election.winner(&v).map(str::to_owned));
            let director = DIRECTORS
                .into_iter()
                .find(|d| winner.as_deref() == Some(*d))
                .unwrap_or(DIRECTORS[0]);
            (vip.to_owned(), director)
        })
        .collect()
}

/// Waits until each VIP is announced by the director `owners` says, and by no other.
fn back_to(vips: &Vips, owners: &BTreeMap<String, &'static str>) -> Result<(), String> {
    wait_for(
        &format!("the announcers to be {owners:?}"),
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let now = settled(vips, &DIRECTORS, Duration::ZERO)?;
            if &now == owners {
                Ok(Some(()))
            } else {
                Err(format!("announcers {now:?}"))
            }
        },
    )
}

/// The MAC address of `eth0` in `ns`.
fn mac(ns: &str) -> Result<String, String> {
    let text = in_ns(ns, &["ip", "-o", "link", "show", "dev", "eth0"])?;
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "link/ether")
        .map(|w| w[1].to_owned())
        .ok_or_else(|| format!("no link/ether in {text}"))
}

/// The MAC address the client's neighbour table holds for `vip`, if any.
fn client_neighbour(vip: &str) -> Result<Option<String>, String> {
    let text = in_ns(CLIENT, &["ip", "neigh", "show", vip, "dev", "eth0"])?;
    let words: Vec<&str> = text.split_whitespace().collect();
    Ok(words
        .windows(2)
        .find(|w| w[0] == "lladdr")
        .map(|w| w[1].to_owned()))
}

/// The distinct MAC addresses that answer an ARP probe for `vip` from the client.
fn arp_answers(vip: &str) -> Result<Vec<String>, String> {
    // busybox arping exits non-zero when nobody answers; its output still tells.
    let text = in_ns(CLIENT, &["arping", "-c", "3", "-w", "3", "-I", "eth0", vip])
        .or_else(|e| if e.contains("Sent") { Ok(e) } else { Err(e) })?;
    let mut macs: Vec<String> = text
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_lowercase()))
        .collect();
    macs.sort();
    macs.dedup();
    Ok(macs)
}

/// `count` requests in a row from the client to `vip`, all answered. A round with a failure
/// is asked again for a while: a lapse of the announcer (see [`status_agrees`]) can outlast a
/// connection attempt.
fn answered(vip: &str, count: usize) -> Result<(), String> {
    wait_for(
        &format!("{count} requests in a row to {vip} answered"),
        Duration::from_secs(20),
        Duration::from_millis(500),
        || round(vip, count).map(Some),
    )
}

/// `count` requests from the client to `vip`; all must be answered.
fn round(vip: &str, count: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let addr = if vip.contains(':') {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    };
    let text = in_ns(
        CLIENT,
        &[
            &exe.to_string_lossy(),
            "ask",
            &addr,
            &count.to_string(),
            "0",
        ],
    )?;
    let answers = web::parse(&text);
    let failed = answers.iter().filter(|a| a.outcome.is_err()).count();
    if answers.len() != count || failed > 0 {
        return Err(format!(
            "{addr}: {failed} of {} requests failed:\n{text}",
            answers.len()
        ));
    }
    Ok(())
}

/// How a handover went, seen from the client.
struct Handover {
    /// From the change until the client's traffic went to the new announcer and was answered.
    took: Duration,
    /// Requests that failed meanwhile.
    failed: usize,
}

/// Requests every 50 ms from the client to `vip` while `change` happens; how long until the
/// client's neighbour entry holds `to`'s MAC and a request after that is answered.
fn handover(
    vip: &str,
    to: &str,
    change: impl FnOnce() -> Result<(), String>,
) -> Result<Handover, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let addr = if vip.contains(':') {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    };
    let asking = Background::start(
        &format!("ask-l2-{}", vip.replace(':', "-")),
        Some(CLIENT),
        &exe.to_string_lossy(),
        &["ask", &addr, "0", "50"],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let target = mac(to)?;
    let started = now_ms();
    let clock = Instant::now();
    change()?;
    let switched = wait_for(
        &format!("the client's neighbour entry for {vip} to be {to}'s {target}"),
        Duration::from_secs(15),
        POLL,
        || Ok((client_neighbour(vip)?.as_deref() == Some(target.as_str())).then(|| clock.elapsed())),
    );
    // A few answers after the switch, then the requests stop.
    std::thread::sleep(Duration::from_secs(2));
    let log = std::fs::read_to_string(&asking.log).unwrap_or_default();
    asking.kill();
    let switched = switched?;
    let answers = web::parse(&log);
    let switched_ms = started + switched.as_millis();
    let first_after = answers
        .iter()
        .find(|a| a.at_ms >= switched_ms && a.outcome.is_ok())
        .ok_or_else(|| format!("no request to {vip} was answered after the switch:\n{log}"))?;
    let failed = answers
        .iter()
        .filter(|a| a.at_ms >= started && a.at_ms <= first_after.at_ms && a.outcome.is_err())
        .count();
    Ok(Handover {
        took: Duration::from_millis(u64::try_from(first_after.at_ms - started).unwrap_or(u64::MAX)),
        failed,
    })
}

/// `announcer`, the other director, and the announcer's index in [`DIRECTORS`].
fn roles(announcer: &'static str) -> (&'static str, &'static str, usize) {
    let index = DIRECTORS.iter().position(|d| *d == announcer).unwrap_or(0);
    (announcer, DIRECTORS[1 - index], index)
}

/// SIGKILL, as a crash ends a process.
fn kill(slot: &mut Option<Background>) {
    if let Some(process) = slot.take() {
        process.kill();
    }
}

/// Checks `kubectl get directors` and each director's `ipvslb status` against the kernels.
fn views_agree_with_the_kernels(vips: &Vips) -> Result<(), String> {
    println!("{}", kubectl(&["get", "directors"])?);
    wait_for(
        "each Director's Announcing column to list what its kernel answers for",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            for ns in DIRECTORS {
                let listed = kubectl(&[
                    "get",
                    "director",
                    ns,
                    "-o",
                    "jsonpath={.status.ready} {.status.announcing}",
                ])?;
                let mut held = held_by(ns, vips)?;
                held.sort();
                let (ready, announcing) = listed.split_once(' ').unwrap_or((listed.as_str(), ""));
                let mut said: Vec<&str> = announcing.split(',').filter(|s| !s.is_empty()).collect();
                said.sort();
                if ready != "true" || said != held {
                    return Err(format!(
                        "{ns}: ready {ready}, announcing {said:?}, its kernel holds {held:?}"
                    ));
                }
            }
            Ok(Some(()))
        },
    )?;
    for ns in DIRECTORS {
        // A director lets go of its VIPs for a moment (safely) when none of its Lease renewals
        // comes back within its deadline, as happens at times on this 2-core TCG machine, so
        // the kernel may change while the status is read: a reading taken
        // while `ns`'s eth0 changed, or while the director had not yet caught up with its own
        // lapse (out of sync), is taken again. What `ipvslb status` says the kernel holds must
        // match an eth0 that held still around it.
        let text = wait_for(
            &format!("ipvslb status in {ns} to agree with its kernel"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || status_agrees(ns, vips),
        )??;
        println!("ipvslb status in {ns}:\n{text}");
    }
    Ok(())
}

/// One reading of `ipvslb status` in `ns` next to its eth0, for [`wait_for`]: `Err` to read
/// again; `Some(Ok(text))` when they agree and the director is in sync; `Some(Err)`, which ends
/// the wait, when the status misreads an eth0 that held still around it.
fn status_agrees(ns: &str, vips: &Vips) -> Result<Option<Result<String, String>>, String> {
    let before = held_by(ns, vips)?;
    let text = in_ns(ns, &["/tests/ipvslb", "status"])?;
    let json = in_ns(ns, &["/tests/ipvslb", "status", "-o", "json"])?;
    let after = held_by(ns, vips)?;
    if before != after {
        return Err(format!(
            "{ns}'s eth0 changed while its status was read: {before:?}, then {after:?}"
        ));
    }
    let report: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| format!("ipvslb status -o json in {ns}: {e}\n{json}"))?;
    if report["inSync"] != serde_json::Value::Bool(true) {
        return Err(format!("ipvslb status in {ns} says out of sync:\n{text}"));
    }
    let mut said: Vec<&str> = report["announcedInKernel"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    said.sort();
    let mut held = after;
    held.sort();
    if said != held {
        return Ok(Some(Err(format!(
            "ipvslb status in {ns} says its kernel announces {said:?}, its eth0 holds {held:?}:\n{text}"
        ))));
    }
    Ok(Some(Ok(text)))
}

/// The step.
pub fn step(kube: &Kube, lines: &mut Vec<String>) -> Result<(), String> {
    // The root namespace's director runs without L2 mode: it must not answer ARP on the
    // segment for the VIPs on its ipvslb0 (see the module's comment).
    for setting in [
        "net.ipv4.conf.br0.arp_ignore=1",
        "net.ipv4.conf.br0.arp_announce=2",
    ] {
        sh("sysctl", &["-q", "-w", setting])?;
    }
    let outcome = run(kube, lines);
    for ns in DIRECTORS {
        println!("e2e: {ns}'s Lease renewals: {}", renewals(ns));
        println!("{ns}'s live sets:\n{}", live_sets(ns));
    }
    if outcome.is_err() {
        for ns in DIRECTORS {
            println!(
                "--- {ns}'s Lease and announcement lines:\n{}",
                lease_lines(ns, 80)
            );
        }
    }
    for setting in [
        "net.ipv4.conf.br0.arp_ignore=0",
        "net.ipv4.conf.br0.arp_announce=0",
    ] {
        let _ = sh("sysctl", &["-q", "-w", setting]);
    }
    outcome
}

/// The log of `ns`'s latest director process (empty if there is none).
fn log_of(ns: &str) -> String {
    std::fs::read_to_string(format!("/tmp/ipvslb-l2-{ns}.log")).unwrap_or_default()
}

/// The last `count` lines of `ns`'s director log that tell how its election went.
fn lease_lines(ns: &str, count: usize) -> String {
    let log = log_of(ns);
    let kept: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["Lease", "L2 ", "claim", " WARN ", " ERROR "]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    kept[kept.len().saturating_sub(count)..].join("\n")
}

/// How the Lease renewals of `ns`'s latest director process went: how many, how long the
/// writes took, how many timed out or failed.
fn renewals(ns: &str) -> String {
    let log = log_of(ns);
    let mut took: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("director Lease renewed"))
        .filter_map(|l| {
            let value = l.split("took=").nth(1)?.split_whitespace().next()?;
            let (number, scale) = [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)]
                .iter()
                .find_map(|(unit, scale)| Some((value.strip_suffix(unit)?, *scale)))?;
            Some(number.parse::<f64>().ok()? * scale)
        })
        .collect();
    took.sort_by(f64::total_cmp);
    let count = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    format!(
        "{} written, median {:.0} ms, slowest {:.0} ms; {} timed out, {} failed; {} changes of the live set; its claim lapsed {} times",
        took.len(),
        took.get(took.len() / 2).copied().unwrap_or(0.0),
        took.last().copied().unwrap_or(0.0),
        count("renewing the director Lease timed out"),
        count("renewing the director Lease failed"),
        count("director Leases changed"),
        count("this director's claim lapsed"),
    )
}

/// Each change of the live set `ns`'s latest director process saw: when, and what.
fn live_sets(ns: &str) -> String {
    let log = log_of(ns);
    log.lines()
        .filter(|l| l.contains("director Leases changed"))
        .map(|l| {
            let at = l.split_whitespace().next().unwrap_or_default();
            let what = l.split("changed").nth(1).unwrap_or_default().trim();
            format!("  {at} {what}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run(kube: &Kube, lines: &mut Vec<String>) -> Result<(), String> {
    let mut directors: Vec<Option<Background>> = DIRECTORS
        .iter()
        .map(|ns| director(ns).map(Some))
        .collect::<Result<_, _>>()?;
    kubectl(&["apply", "-f", "/e2e/examples/l2/l2.yaml"])?;
    for (service, family) in [
        ("l2-api", Family::V4),
        ("l2-web", Family::V4),
        ("l2-web", Family::V6),
    ] {
        apply(&cluster::slice_yaml(service, "web", family, &PODS))?;
    }
    let ingress = |name: &str, v6: bool| {
        wait_for(
            &format!("the EXTERNAL-IP of {name}"),
            Duration::from_secs(45),
            Duration::from_millis(100),
            || {
                Ok(kube
                    .ingress(name)?
                    .into_iter()
                    .find(|a| a.contains(':') == v6))
            },
        )
    };
    let vips = Vips {
        api: ingress("l2-api", false)?,
        web4: ingress("l2-web", false)?,
        web6: ingress("l2-web", true)?,
    };
    // Both live, the announcers must be those the election gives, VIP by VIP.
    let owners = elected(&vips);
    back_to(&vips, &owners)?;
    println!("e2e: L2 announcers: {owners:?}");

    // One MAC answers ARP for each IPv4 VIP: its announcer's. Traffic flows on both families,
    // and the client's neighbour entries (ARP and NDP) hold the announcer's MAC.
    // A lapse of the announcer (no renewal back within its deadline) leaves a probe
    // without answers for a moment: probed again, until one probe gets exactly one MAC.
    for vip in [&vips.api, &vips.web4] {
        let expected = mac(owners[vip.as_str()])?;
        wait_for(
            &format!("ARP for {vip} answered by {} alone", owners[vip.as_str()]),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let answers = arp_answers(vip)?;
                if answers == [expected.clone()] {
                    Ok(Some(()))
                } else {
                    Err(format!(
                        "answers from {answers:?}, expected only {expected}"
                    ))
                }
            },
        )?;
    }
    for vip in vips.all() {
        answered(vip, 6)?;
        let expected = mac(owners[vip])?;
        let seen = client_neighbour(vip)?;
        if seen.as_deref() != Some(expected.as_str()) {
            return Err(format!(
                "the client's neighbour entry for {vip}: {seen:?}, expected {expected} ({})",
                owners[vip]
            ));
        }
    }
    println!("e2e: one MAC answers each VIP, and every VIP answers on both families");
    views_agree_with_the_kernels(&vips)?;
    let selector = "involvedObject.name=l2-web,reason=Announced";
    let events = wait_for(
        "an Announced Event on l2-web",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let text = kubectl(&["get", "events", "--field-selector", selector])?;
            Ok((text.lines().count() > 1).then_some(text))
        },
    )?;
    println!("{events}");

    // Drift on one director: `ipvsadm -C` shows in its `ipvslb status` until the next pass.
    let drifted = owners[vips.web4.as_str()];
    // A full pass may repair it before the status is read: clear it again, a few times.
    let mut text = String::new();
    for _ in 0..5 {
        in_ns(drifted, &["ipvsadm", "-C"])?;
        text = in_ns(drifted, &["/tests/ipvslb", "status"])?;
        if text.contains("OUT OF SYNC") {
            break;
        }
    }
    if !text.contains("OUT OF SYNC") {
        return Err(format!(
            "after ipvsadm -C in {drifted}, ipvslb status says:\n{text}"
        ));
    }
    wait_for(
        "the full pass to repair the drift",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(in_ns(drifted, &["/tests/ipvslb", "status"])?
                .contains("IPVS:           in sync")
                .then_some(()))
        },
    )?;
    println!("e2e: ipvslb status in {drifted} showed the cleared table out of sync, then in sync");

    // SIGKILL of the announcer of l2-web's IPv4 VIP: its peer takes the VIP when the Lease
    // expires, and the kernel of the dead one drops the VIP from eth0 when its lifetime ends.
    let (lost, other, index) = roles(owners[vips.web4.as_str()]);
    let killed = handover(&vips.web4, other, || {
        kill(&mut directors[index]);
        Ok(())
    })?;
    let gone = wait_for(
        &format!("{lost}'s kernel to drop {} from eth0", vips.web4),
        Duration::from_secs(5),
        POLL,
        || Ok((!holders(&vips.web4)?.contains(&lost)).then_some(())),
    );
    lines.push(format!("l2 failover = {:.2} s", killed.took.as_secs_f64()));
    println!(
        "e2e: {lost} killed: {} requests failed before the client's traffic went through {other}",
        killed.failed
    );
    gone?;
    settled(&vips, &[other], Duration::from_secs(10))?;
    for vip in vips.all() {
        answered(vip, 3)?;
    }

    // It comes back and takes its VIPs back; then it stops cleanly: it withdraws, deletes its
    // Lease, and its peer takes over at once.
    directors[index] = Some(director(lost)?);
    back_to(&vips, &owners)?;
    let mut stop_log = String::new();
    let graceful = handover(&vips.web4, other, || {
        if let Some(process) = directors[index].take() {
            stop_log = process.stop(Duration::from_secs(10));
        }
        Ok(())
    })?;
    lines.push(format!(
        "l2 graceful failover = {:.2} s",
        graceful.took.as_secs_f64()
    ));
    println!(
        "e2e: {lost} stopped: {} requests failed meanwhile",
        graceful.failed
    );
    let Some(deleted) = stop_log
        .lines()
        .find(|l| l.contains("director Lease deleted"))
    else {
        return Err(format!(
            "{lost} did not delete its Lease when it stopped:\n{stop_log}"
        ));
    };
    // withdrawn=, settled=, deleted=: how long its stop took to get there.
    println!("e2e: {lost}'s stop: {deleted}");

    // IPv6 the same way: the announcer of l2-web's IPv6 VIP is killed, and the client's
    // neighbour entry moves by the unsolicited neighbour advertisement.
    directors[index] = Some(director(lost)?);
    back_to(&vips, &owners)?;
    let (lost6, other6, index6) = roles(owners[vips.web6.as_str()]);
    let killed6 = handover(&vips.web6, other6, || {
        kill(&mut directors[index6]);
        Ok(())
    })?;
    lines.push(format!(
        "l2 ipv6 failover = {:.2} s",
        killed6.took.as_secs_f64()
    ));
    directors[index6] = Some(director(lost6)?);
    back_to(&vips, &owners)?;

    // A director cut off from the API server stops answering before its Lease can expire, and
    // takes its VIPs back when the API server is back; sampled all along, no VIP ever has two
    // announcers.
    let cut = owners[vips.api.as_str()];
    let block = [
        "OUTPUT",
        "-d",
        DIRECTOR_V4,
        "-p",
        "tcp",
        "--dport",
        "6443",
        "-j",
        "DROP",
    ];
    let alone = DIRECTORS
        .iter()
        .copied()
        .filter(|d| *d != cut)
        .collect::<Vec<_>>();
    let mut doubles = 0;
    let mut samples = 0;
    // One sample of every VIP: counts those with two holders; whether `alone` holds each.
    let mut sample = || -> Result<bool, String> {
        let mut all_alone = true;
        for vip in vips.all() {
            let held = holders(vip)?;
            if held.len() > 1 {
                doubles += 1;
            }
            all_alone &= matches!(held.as_slice(), [one] if alone.contains(one));
        }
        samples += 1;
        Ok(all_alone)
    };
    let before = Instant::now() + Duration::from_secs(1);
    while Instant::now() < before {
        sample()?;
    }
    in_ns(cut, &[&["iptables", "-I"][..], &block].concat())?;
    let partitioned = Instant::now();
    // Six seconds cut off at least, and then until the other holds every VIP (a stall of the
    // VM longer than its deadline makes even a healthy director let go for a moment).
    let mut took_over = None;
    let held_alone = loop {
        let all = sample()?;
        let elapsed = partitioned.elapsed();
        if all && took_over.is_none() {
            took_over = Some(elapsed);
        }
        if (all && elapsed >= Duration::from_secs(6)) || elapsed >= Duration::from_secs(16) {
            break all;
        }
    };
    in_ns(cut, &[&["iptables", "-D"][..], &block].concat())?;
    let after = Instant::now() + Duration::from_secs(8);
    while Instant::now() < after {
        sample()?;
    }
    lines.push(format!("double announcers = {doubles}"));
    println!(
        "e2e: {cut} cut off from the API server: {samples} samples of every VIP, {doubles} with two announcers; {alone:?} held every VIP {took_over:.2?} after the cut"
    );
    if !held_alone {
        return Err(format!(
            "cut off for 16 s, {cut} left VIPs that {alone:?} did not hold alone"
        ));
    }
    back_to(&vips, &owners)?;
    if doubles > 0 {
        return Err(format!("{doubles} samples found a VIP with two announcers"));
    }
    for process in directors.into_iter().flatten() {
        process.stop(Duration::from_secs(10));
    }
    Ok(())
}
