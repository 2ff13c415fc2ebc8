//! Benchmark in the test VM (`cargo xtask vm-bench`): programming 10,000 virtual services x 10
//! destinations from an empty kernel and converging a 1% change, with
//! (a) this crate's batched netlink sync,
//! (b) one `ipvsadm` process per rule (the naive controller), on a sample of the rules,
//! (c) `ipvsadm -R` with the same rules,
//! (d) the floor: the same write requests encoded before the clock starts and sent in the same
//!     batches through the same socket code, which leaves the kernel's own work and the
//!     system calls;
//! and reading the table back, by this crate's dump and by `ipvsadm -L -n`; a full pass over
//! the table at rest (dump and diff, no write); the resident memory of this process holding the
//! desired and the dumped table. All measured in the same run. Ends with the ratios
//! `naive/ipvslb`, `restore/ipvslb` (per rule), `ipvslb/floor` and `dump/ipvsadm-list`.
//!
//! Every measurement from an empty kernel after the first runs in a fresh network namespace
//! (see [`PHASES`]); `cargo xtask vm-bench PHASE` runs one phase alone.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipvslb_ipvs::netlink::Ipvs;
use ipvslb_ipvs::{
    Destination, ForwardingMethod, OwnsAll, Protocol, Removal, Scheduler, ServiceKey, Table,
    VirtualService, diff,
};

const SERVICES: u32 = 10_000;
const DESTINATIONS: u32 = 10;
/// Services programmed by the naive approach: 200 x (1 + 10) = 2,200 rules.
const NAIVE_SERVICES: u32 = 200;

/// The measurements that start from an empty kernel, after the first: each runs in a network
/// namespace of its own (`PHASE` as the argument of this binary, under `nsenter`). A table
/// removed from IPVS leaves its destinations in the kernel's trash for minutes, and every
/// destination added meanwhile is first looked for in that trash, one by one: in a namespace
/// that held the previous measurement's table, adding 100,000 destinations took 100 times
/// longer. IPVS is per namespace, so a fresh one starts as empty as the first measurement did.
const PHASES: [(&str, Phase); 4] = [
    ("naive", naive),
    ("restore", restore),
    ("ipvslb", ipvslb),
    ("floor", floor),
];

/// The phases in the order they run. The sync from empty and the floor take about two
/// seconds each, where the load of a shared machine shows: each is measured three times,
/// taking turns, and the ratio compares the best of each. They go first, then `ipvsadm -R`:
/// all are done before the kernel frees the destinations of the tables cleared before them
/// (two minutes or more after), which the naive baseline, a minute of process starts,
/// absorbs.
const RUNS: [&str; 7] = [
    "floor", "ipvslb", "floor", "ipvslb", "floor", "restore", "naive",
];

/// A measurement run as a process of its own.
type Phase = fn() -> Result<Measured, String>;

/// What a phase reports to the main run: the time and the number of rules it measured.
struct Measured {
    time: Duration,
    rules: usize,
}

fn main() -> ExitCode {
    let phase = std::env::args().nth(1);
    let outcome = match phase.as_deref() {
        None => bench(),
        Some(name) => match PHASES.iter().find(|(n, _)| *n == name) {
            Some((_, run)) => run().map(|m| {
                println!("{MEASURED}{} {}", m.time.as_secs_f64(), m.rules);
            }),
            None => Err(format!("no phase {name}")),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kernel_bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// How a phase's last line starts: `seconds rules` follow.
const MEASURED: &str = "measured: ";

/// Runs phase `name` of this binary in a new network namespace, its output passed on; returns
/// what it measured.
fn in_fresh_namespace(name: &str, run_number: usize) -> Result<Measured, String> {
    let ns = format!("bench-{run_number}-{name}");
    run("ip", &["netns", "add", &ns])?;
    let net = format!("--net=/run/netns/{ns}");
    // Without its loopback up a namespace has no local routing table, and IPVS refuses
    // masquerading destinations whose address type it cannot tell.
    run("nsenter", &[&net, "ip", "link", "set", "lo", "up"])?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let output = Command::new("nsenter")
        .arg(&net)
        .arg(exe)
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut measured = None;
    for line in stdout.lines() {
        match line.strip_prefix(MEASURED) {
            Some(numbers) => measured = Some(numbers.to_owned()),
            None => println!("{line}"),
        }
    }
    if !output.status.success() {
        return Err(format!("phase {name} failed: {}", output.status));
    }
    let numbers = measured.ok_or_else(|| format!("phase {name} reported nothing"))?;
    let (seconds, rules) = numbers
        .split_once(' ')
        .ok_or_else(|| format!("phase {name} reported {numbers:?}"))?;
    Ok(Measured {
        time: Duration::from_secs_f64(
            seconds
                .parse()
                .map_err(|e| format!("phase {name}: {seconds:?}: {e}"))?,
        ),
        rules: rules
            .parse()
            .map_err(|e| format!("phase {name}: {rules:?}: {e}"))?,
    })
}

/// Runs a command that must succeed.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?} failed: {status}"))
    }
}

fn vip(s: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0af1_0000 + s))
}

fn table(services: u32) -> Table {
    let mut table = Table::new();
    for s in 0..services {
        let key = ServiceKey::addr(vip(s), Protocol::Tcp, 80);
        let dests = (0..DESTINATIONS).map(|d| {
            Destination::new(
                IpAddr::V4(Ipv4Addr::from(0xc0a8_0001 + d)),
                30000 + (s % 2000) as u16,
                ForwardingMethod::Masquerade,
                1,
            )
        });
        table.insert(VirtualService::new(key, Scheduler::Rr), dests);
    }
    table
}

/// The `ipvsadm` arguments that program `table`, one rule per line.
fn rules(table: &Table) -> Vec<String> {
    let mut rules = Vec::new();
    for (key, entry) in &table.services {
        let ServiceKey::Addr { address, port, .. } = key else {
            continue;
        };
        let service = format!("{address}:{port}");
        rules.push(format!("-A -t {service} -s {}", entry.service.scheduler));
        for dest in entry.destinations.values() {
            rules.push(format!(
                "-a -t {service} -r {} -m -w {}",
                dest.key(),
                dest.weight
            ));
        }
    }
    rules
}

fn clear() -> Result<(), String> {
    run("ipvsadm", &["-C"])
}

/// Fails unless the kernel holds as many services and destinations as `desired`.
fn check_holds(ipvs: &mut Ipvs, desired: &Table, who: &str) -> Result<(), String> {
    let held = ipvs.dump().map_err(|e| e.to_string())?;
    if held.service_count() != desired.service_count()
        || held.destination_count() != desired.destination_count()
    {
        return Err(format!(
            "after {who} the kernel holds {} services and {} destinations, not {} and {}",
            held.service_count(),
            held.destination_count(),
            desired.service_count(),
            desired.destination_count()
        ));
    }
    Ok(())
}

/// This process's resident memory (`VmRSS`), in KiB.
fn resident_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_owned())
}

/// `ipvsadm -L -n`, its output read whole through a pipe: the time and the number of lines.
fn ipvsadm_list() -> Result<(Duration, usize), String> {
    let started = Instant::now();
    let mut child = Command::new("ipvsadm")
        .args(["-L", "-n"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut output = Vec::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_end(&mut output)
        .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err("ipvsadm -L -n failed".to_owned());
    }
    Ok((elapsed, output.iter().filter(|b| **b == b'\n').count()))
}

fn per_rule(time: Duration, rules: usize) -> f64 {
    time.as_secs_f64() / rules.max(1) as f64
}

fn bench() -> Result<(), String> {
    let rss_before = resident_kib()?;
    let desired = table(SERVICES);
    let rule_count = desired.service_count() + desired.destination_count();
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;

    // (a) this crate, from an empty kernel.
    clear()?;
    let first = sync_from_empty(&mut ipvs, &desired)?;
    let dump_started = Instant::now();
    let dumped = ipvs.dump().map_err(|e| e.to_string())?;
    let dump_time = dump_started.elapsed();
    if dumped.service_count() != desired.service_count()
        || dumped.destination_count() != desired.destination_count()
    {
        return Err("the kernel does not hold the desired table".to_owned());
    }
    println!(
        "    full dump of {} services and {} destinations: {:.2} s",
        dumped.service_count(),
        dumped.destination_count(),
        dump_time.as_secs_f64()
    );
    // The same table read by ipvsadm: a header of 3 lines, then one line per rule.
    let (list_time, lines) = ipvsadm_list()?;
    if lines != rule_count + 3 {
        return Err(format!(
            "ipvsadm -L -n printed {lines} lines, not {}",
            rule_count + 3
        ));
    }
    println!(
        "    ipvsadm -L -n of the same table: {:.2} s",
        list_time.as_secs_f64()
    );
    // A full pass at rest: the kernel holds the desired table already.
    let started = Instant::now();
    let report = ipvs
        .sync(&OwnsAll, &desired, Removal::Delete)
        .map_err(|e| e.to_string())?;
    let at_rest = started.elapsed();
    if report.writes != 0 || report.total() != 0 {
        return Err(format!(
            "a full pass at rest made {} writes ({} changes), not 0",
            report.writes,
            report.total()
        ));
    }
    println!(
        "    full pass at rest (dump and diff): {:.2} s, {} writes",
        at_rest.as_secs_f64(),
        report.writes
    );
    let rss = resident_kib()?;
    println!(
        "    resident memory holding the desired and the dumped table: {:.1} MiB ({:.1} MiB over the {:.1} MiB before building them)",
        rss as f64 / 1024.0,
        rss.saturating_sub(rss_before) as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    drop(dumped);

    // A 1% change: in 1 service of every 100, one destination replaced and one reweighted.
    let mut changed = desired.clone();
    let mut changed_keys = Vec::new();
    for (i, (key, entry)) in changed.services.iter_mut().enumerate() {
        if i % 100 != 0 {
            continue;
        }
        changed_keys.push(*key);
        let first = *entry.destinations.keys().next().ok_or("no destination")?;
        let mut replacement = entry.destinations[&first].clone();
        entry.destinations.remove(&first);
        replacement.address = IpAddr::V4(Ipv4Addr::new(192, 168, 200, 1));
        entry.destinations.insert(replacement.key(), replacement);
        if let Some(dest) = entry.destinations.values_mut().nth(1) {
            dest.weight = 5;
        }
    }
    let started = Instant::now();
    let report = ipvs
        .sync(&OwnsAll, &changed, Removal::Delete)
        .map_err(|e| e.to_string())?;
    let change_sync = started.elapsed();
    println!(
        "    1% change by full sync: {} writes for {} changed services of {} ({:.2}% of {rule_count} rules) in {:.2} s (the full dump included)",
        report.writes,
        changed_keys.len(),
        SERVICES,
        report.writes as f64 * 100.0 / rule_count as f64,
        change_sync.as_secs_f64()
    );
    // The same change back, service by service, without a full dump.
    let started = Instant::now();
    let mut writes = 0;
    for key in &changed_keys {
        let report = ipvs
            .converge(key, desired.services.get(key), Removal::Delete)
            .map_err(|e| e.to_string())?;
        writes += report.writes;
    }
    let change_converge = started.elapsed();
    println!(
        "    1% change by per-service converge: {writes} writes in {:.3} s",
        change_converge.as_secs_f64()
    );

    clear()?;
    let mut measured: Vec<(&str, Measured)> = Vec::new();
    for (n, name) in RUNS.iter().enumerate() {
        measured.push((name, in_fresh_namespace(name, n)?));
    }
    // The best of each phase's runs; the sync in this namespace counts as one of ipvslb's.
    let best = |phase: &str| {
        measured
            .iter()
            .filter(|(name, _)| *name == phase)
            .map(|(_, m)| m.time)
            .chain((phase == "ipvslb").then_some(first))
            .min()
            .ok_or_else(|| format!("no run of phase {phase}"))
    };
    let rules_of = |phase: &str| {
        measured
            .iter()
            .find(|(name, _)| *name == phase)
            .map_or(0, |(_, m)| m.rules)
    };
    let (ours, floor) = (best("ipvslb")?, best("floor")?);
    let naive = Measured {
        time: best("naive")?,
        rules: rules_of("naive"),
    };
    let restore = Measured {
        time: best("restore")?,
        rules: rules_of("restore"),
    };
    println!(
        "best of {} syncs from empty {:.2} s, of {} floors {:.2} s",
        RUNS.iter().filter(|r| **r == "ipvslb").count() + 1,
        ours.as_secs_f64(),
        RUNS.iter().filter(|r| **r == "floor").count(),
        floor.as_secs_f64()
    );

    let ours_per_rule = per_rule(ours, rule_count);
    println!(
        "naive/ipvslb = {:.0}",
        per_rule(naive.time, naive.rules) / ours_per_rule
    );
    println!(
        "restore/ipvslb = {:.1}",
        per_rule(restore.time, restore.rules) / ours_per_rule
    );
    println!(
        "ipvslb/floor = {:.2}",
        ours.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "dump/ipvsadm-list = {:.2}",
        dump_time.as_secs_f64() / list_time.as_secs_f64()
    );
    Ok(())
}

/// (a) This crate's sync of `desired` into an empty kernel: its time, the changes checked.
fn sync_from_empty(ipvs: &mut Ipvs, desired: &Table) -> Result<Duration, String> {
    let rule_count = desired.service_count() + desired.destination_count();
    let started = Instant::now();
    let report = ipvs
        .sync(&OwnsAll, desired, Removal::Delete)
        .map_err(|e| e.to_string())?;
    let time = started.elapsed();
    if report.total() != rule_count || report.writes != rule_count as u64 {
        return Err(format!(
            "sync made {} changes in {} writes, not {rule_count}",
            report.total(),
            report.writes
        ));
    }
    println!(
        "(a) ipvslb sync: {rule_count} rules in {:.2} s, {:.1} us/rule ({} writes)",
        time.as_secs_f64(),
        per_rule(time, rule_count) * 1e6,
        report.writes
    );
    Ok(time)
}

/// (a) again, in a namespace of its own.
fn ipvslb() -> Result<Measured, String> {
    let desired = table(SERVICES);
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    let time = sync_from_empty(&mut ipvs, &desired)?;
    check_holds(&mut ipvs, &desired, "the sync")?;
    clear()?;
    Ok(Measured {
        time,
        rules: desired.service_count() + desired.destination_count(),
    })
}

/// (d) The floor: the write requests of a sync from empty, encoded before the clock starts,
/// then sent in the same batches through the same socket code as [`Ipvs::sync`].
fn floor() -> Result<Measured, String> {
    let desired = table(SERVICES);
    let rule_count = desired.service_count() + desired.destination_count();
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let ops = diff(&Table::new(), &desired, &OwnsAll, Removal::Delete);
    let diff_time = started.elapsed();
    let started = Instant::now();
    let batches = ipvs.encode(&ops);
    let encode_time = started.elapsed();
    let started = Instant::now();
    for batch in &batches {
        let refused = ipvs.send(batch).map_err(|e| e.to_string())?;
        if let Some((i, errno)) = refused.first() {
            return Err(format!(
                "{} of a batch of {} writes refused, the first (#{i}) with errno {errno}",
                refused.len(),
                batch.len()
            ));
        }
    }
    let time = started.elapsed();
    let sent: usize = batches.iter().map(|b| b.len()).sum();
    if sent != rule_count {
        return Err(format!("sent {sent} writes, not {rule_count}"));
    }
    check_holds(&mut ipvs, &desired, "the floor")?;
    println!(
        "(d) floor: the same {sent} writes pre-encoded ({} batches, {:.1} MiB) sent in {:.2} s, {:.1} us/rule; apart: diff {:.3} s, encoding {:.3} s",
        batches.len(),
        batches.iter().map(|b| b.bytes()).sum::<usize>() as f64 / f64::from(1 << 20),
        time.as_secs_f64(),
        per_rule(time, rule_count) * 1e6,
        diff_time.as_secs_f64(),
        encode_time.as_secs_f64()
    );
    clear()?;
    Ok(Measured {
        time,
        rules: rule_count,
    })
}

/// (b) One `ipvsadm` process per rule, on a sample.
fn naive() -> Result<Measured, String> {
    let sample = rules(&table(NAIVE_SERVICES));
    let started = Instant::now();
    for rule in &sample {
        let status = Command::new("ipvsadm")
            .args(rule.split_whitespace())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("ipvsadm {rule} failed"));
        }
    }
    let time = started.elapsed();
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    check_holds(&mut ipvs, &table(NAIVE_SERVICES), "one ipvsadm per rule")?;
    println!(
        "(b) one ipvsadm per rule: {} rules in {:.2} s, {:.2} ms/rule",
        sample.len(),
        time.as_secs_f64(),
        per_rule(time, sample.len()) * 1e3
    );
    clear()?;
    Ok(Measured {
        time,
        rules: sample.len(),
    })
}

/// (c) `ipvsadm -R` with every rule.
fn restore() -> Result<Measured, String> {
    let desired = table(SERVICES);
    let all = rules(&desired);
    let input = all.join("\n") + "\n";
    let started = Instant::now();
    let mut child = Command::new("ipvsadm")
        .arg("-R")
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let time = started.elapsed();
    if !status.success() {
        return Err("ipvsadm -R failed".to_owned());
    }
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    check_holds(&mut ipvs, &desired, "ipvsadm -R")?;
    println!(
        "(c) ipvsadm -R: {} rules in {:.2} s, {:.1} us/rule",
        all.len(),
        time.as_secs_f64(),
        per_rule(time, all.len()) * 1e6
    );
    clear()?;
    Ok(Measured {
        time,
        rules: all.len(),
    })
}
