//! Benchmark in the test VM (`cargo xtask vm-bench`): programming 10,000 virtual services x 10
//! destinations from an empty kernel and converging a 1% change, with
//! (a) this crate's batched netlink sync,
//! (b) one `ipvsadm` process per rule (the naive controller), on a sample of the rules,
//! (c) `ipvsadm -R` with the same rules,
//! all measured in the same run. Ends with the per-rule ratios `naive/ipvslb` and
//! `restore/ipvslb`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipvslb_ipvs::netlink::Ipvs;
use ipvslb_ipvs::{
    Destination, ForwardingMethod, OwnsAll, Protocol, Removal, Scheduler, ServiceKey, Table,
    VirtualService,
};

const SERVICES: u32 = 10_000;
const DESTINATIONS: u32 = 10;
/// Services programmed by the naive approach: 200 x (1 + 10) = 2,200 rules.
const NAIVE_SERVICES: u32 = 200;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kernel_bench: {message}");
            ExitCode::FAILURE
        }
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
    let status = Command::new("ipvsadm")
        .arg("-C")
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err("ipvsadm -C failed".to_owned())
    }
}

fn per_rule(time: Duration, rules: usize) -> f64 {
    time.as_secs_f64() / rules.max(1) as f64
}

fn bench() -> Result<(), String> {
    let desired = table(SERVICES);
    let rule_count = desired.service_count() + desired.destination_count();
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;

    // (a) this crate, from an empty kernel.
    clear()?;
    let started = Instant::now();
    let report = ipvs
        .sync(&OwnsAll, &desired, Removal::Delete)
        .map_err(|e| e.to_string())?;
    let ours = started.elapsed();
    if report.total() != rule_count {
        return Err(format!(
            "sync made {} changes, not {rule_count}",
            report.total()
        ));
    }
    let dump_started = Instant::now();
    let dumped = ipvs.dump().map_err(|e| e.to_string())?;
    let dump_time = dump_started.elapsed();
    if dumped.service_count() != desired.service_count()
        || dumped.destination_count() != desired.destination_count()
    {
        return Err("the kernel does not hold the desired table".to_owned());
    }
    println!(
        "(a) ipvslb sync: {rule_count} rules in {:.2} s, {:.1} us/rule ({} writes)",
        ours.as_secs_f64(),
        per_rule(ours, rule_count) * 1e6,
        report.writes
    );
    println!(
        "    full dump of {} services and {} destinations: {:.2} s",
        dumped.service_count(),
        dumped.destination_count(),
        dump_time.as_secs_f64()
    );

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

    // (b) one ipvsadm process per rule, on a sample.
    clear()?;
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
    let naive = started.elapsed();
    println!(
        "(b) one ipvsadm per rule: {} rules in {:.2} s, {:.2} ms/rule",
        sample.len(),
        naive.as_secs_f64(),
        per_rule(naive, sample.len()) * 1e3
    );

    // (c) ipvsadm -R with every rule.
    clear()?;
    let all = rules(&desired).join("\n") + "\n";
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
        .write_all(all.as_bytes())
        .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let restore = started.elapsed();
    if !status.success() {
        return Err("ipvsadm -R failed".to_owned());
    }
    let restored = ipvs.dump().map_err(|e| e.to_string())?;
    if restored.destination_count() != desired.destination_count() {
        return Err("ipvsadm -R left a different table".to_owned());
    }
    println!(
        "(c) ipvsadm -R: {rule_count} rules in {:.2} s, {:.1} us/rule",
        restore.as_secs_f64(),
        per_rule(restore, rule_count) * 1e6
    );
    clear()?;

    let ours_per_rule = per_rule(ours, rule_count);
    println!(
        "naive/ipvslb = {:.0}",
        per_rule(naive, sample.len()) / ours_per_rule
    );
    println!(
        "restore/ipvslb = {:.1}",
        per_rule(restore, rule_count) / ours_per_rule
    );
    Ok(())
}
