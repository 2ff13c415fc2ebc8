//! What the kernel says, read with the independent tools: `ipvsadm` for the director's table
//! and counters, `iptables-save` for kube-proxy's rules on a node, `ip` for the VIPs.

use std::collections::BTreeMap;

use crate::hosts::{in_ns, sh};

/// A virtual service as `ipvsadm -L -n` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `TCP 10.240.0.210:80`.
    pub key: String,
    pub scheduler: String,
    pub destinations: Vec<Destination>,
}

/// A destination line: `10.240.0.101:80 Route 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub addr: String,
    pub forward: String,
    pub weight: u32,
}

/// The director's table.
pub fn table() -> Result<Vec<Service>, String> {
    Ok(parse_table(&sh("ipvsadm", &["-L", "-n"])?))
}

/// The virtual service `key` (`TCP 10.240.0.210:80`), if the kernel has it.
pub fn service(key: &str) -> Result<Option<Service>, String> {
    Ok(table()?.into_iter().find(|s| s.key == key))
}

fn parse_table(text: &str) -> Vec<Service> {
    let mut services: Vec<Service> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["->", addr, forward, weight, ..] => {
                // The header line has no number where the weight goes.
                if let (Some(service), Ok(weight)) = (services.last_mut(), weight.parse()) {
                    service.destinations.push(Destination {
                        addr: (*addr).to_owned(),
                        forward: (*forward).to_owned(),
                        weight,
                    });
                }
            }
            [
                protocol @ ("TCP" | "UDP" | "SCTP" | "FWM"),
                addr,
                scheduler,
                ..,
            ] => services.push(Service {
                key: format!("{protocol} {addr}"),
                scheduler: (*scheduler).to_owned(),
                destinations: Vec::new(),
            }),
            _ => {}
        }
    }
    services
}

/// Counters of a virtual service or destination: connections, and packets out (IPVS counts the
/// answers it sees, which only masquerading shows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub conns: u64,
    pub out_pkts: u64,
}

/// Counters by `TCP 10.240.0.210:80` for services and `TCP 10.240.0.210:80 -> 10.240.0.101:80`
/// for their destinations, once every packet so far is in them: this kernel sums its per-CPU
/// counters into the totals it reports only on its 2-second estimation timer, so they are read
/// until two readings a timer period apart agree.
pub fn stats() -> Result<BTreeMap<String, Counters>, String> {
    let read = || -> Result<_, String> {
        Ok(parse_stats(&sh(
            "ipvsadm",
            &["-L", "-n", "--stats", "--exact"],
        )?))
    };
    let mut last = read()?;
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(2200));
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Err("ipvsadm's counters did not settle within 11 s".to_owned())
}

fn parse_stats(text: &str) -> BTreeMap<String, Counters> {
    let mut all = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let numbers = |rest: &[&str]| -> Option<Counters> {
            Some(Counters {
                conns: rest.first()?.parse().ok()?,
                out_pkts: rest.get(2)?.parse().ok()?,
            })
        };
        match words.as_slice() {
            ["->", addr, rest @ ..] => {
                if let Some(counters) = numbers(rest) {
                    all.insert(format!("{current} -> {addr}"), counters);
                }
            }
            [protocol @ ("TCP" | "UDP" | "SCTP"), addr, rest @ ..] => {
                current = format!("{protocol} {addr}");
                if let Some(counters) = numbers(rest) {
                    all.insert(current.clone(), counters);
                }
            }
            _ => {}
        }
    }
    all
}

/// The change of each counter of `key` from `before` to `after`; an error when either reading
/// lacks it or a counter went down (the entry was replaced in between).
pub fn delta(
    before: &BTreeMap<String, Counters>,
    after: &BTreeMap<String, Counters>,
    key: &str,
) -> Result<Counters, String> {
    let (Some(b), Some(a)) = (before.get(key), after.get(key)) else {
        return Err(format!("ipvsadm --stats has no {key} in both readings"));
    };
    match (
        a.conns.checked_sub(b.conns),
        a.out_pkts.checked_sub(b.out_pkts),
    ) {
        (Some(conns), Some(out_pkts)) => Ok(Counters { conns, out_pkts }),
        _ => Err(format!("the counters of {key} went down: {b:?} then {a:?}")),
    }
}

/// `ipvsadm -S -n` lines that mention `vip` (the table as rules, for comparing two moments).
pub fn saved(vip: &str) -> Result<Vec<String>, String> {
    let text = sh("ipvsadm", &["-S", "-n"])?;
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains(vip))
        .map(str::to_owned)
        .collect();
    lines.sort();
    Ok(lines)
}

/// The addresses on the director's interface `dev`.
pub fn addresses(dev: &str) -> Result<Vec<String>, String> {
    let text = sh("ip", &["-o", "addr", "show", "dev", dev])?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            Some(words.next()?.split('/').next()?.to_owned())
        })
        .collect())
}

/// The comment of the counting rules the run adds.
const FORWARDED: &str = "e2e-forwarded";
const TO_CLIENT: &str = "e2e-to-client";

/// Counting rules (no target: they only count) for telling the paths apart: every packet the
/// director forwards through its IP stack, and every packet a node sends to `client` on its
/// segment. kube-proxy leaves built-in chains' other rules alone.
pub fn add_path_counters(nodes: &[&str], client: (&str, &str)) -> Result<(), String> {
    for tool in ["iptables", "ip6tables"] {
        sh(
            tool,
            &["-A", "FORWARD", "-m", "comment", "--comment", FORWARDED],
        )?;
    }
    for node in nodes {
        for (tool, addr) in [("iptables", client.0), ("ip6tables", client.1)] {
            in_ns(
                node,
                &[
                    tool,
                    "-t",
                    "mangle",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    "eth0",
                    "-d",
                    addr,
                    "-m",
                    "comment",
                    "--comment",
                    TO_CLIENT,
                ],
            )?;
        }
    }
    Ok(())
}

/// Packets the director has forwarded through its IP stack (both families).
pub fn forwarded() -> Result<u64, String> {
    let mut total = 0;
    for tool in ["iptables-save", "ip6tables-save"] {
        total += rule_hits(&sh(tool, &["-c", "-t", "filter"])?, FORWARDED, "");
    }
    Ok(total)
}

/// Packets `node` has sent straight to the client (both families).
pub fn sent_to_client(node: &str) -> Result<u64, String> {
    let mut total = 0;
    for tool in ["iptables-save", "ip6tables-save"] {
        total += rule_hits(&in_ns(node, &[tool, "-c", "-t", "mangle"])?, TO_CLIENT, "");
    }
    Ok(total)
}

/// Packets counted by kube-proxy's NAT rules on `node` that match `vip` and `port`: rules of
/// the `nat` table see the first packet of each connection, so this counts connections.
pub fn kube_proxy_hits(node: &str, vip: &str, port: u16) -> Result<u64, String> {
    let text = in_ns(node, &["iptables-save", "-c", "-t", "nat"])?;
    Ok(rule_hits(
        &text,
        &format!("-d {vip}/32"),
        &format!("--dport {port} "),
    ))
}

fn rule_hits(text: &str, dest: &str, port: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains(dest) && l.contains(port))
        .filter_map(|l| {
            let counters = l.strip_prefix('[')?.split(']').next()?;
            counters.split(':').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The value of one series (`name{labels}`) of the director's `/metrics`; `None` when it has
/// no such series.
pub fn metric(series: &str) -> Result<Option<u64>, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect("127.0.0.1:9090")
        .map_err(|e| format!("connecting to the director's /metrics: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("asking for /metrics: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading /metrics: {e}"))?;
    let prefix = format!("{series} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok()))
}

/// The director's counter of health transitions of `address:port` to `state` (0 before the
/// first).
pub fn transitions(address: &str, port: u16, state: &str) -> Result<u64, String> {
    Ok(metric(&format!(
        "ipvslb_backend_transitions_total{{address=\"{address}\",port=\"{port}\",state=\"{state}\"}}"
    ))?
    .unwrap_or(0))
}

/// Adds `loss` percent packet loss to everything `node` sends.
pub fn lossy(node: &str, loss: u32) -> Result<(), String> {
    let loss = format!("{loss}%");
    in_ns(
        node,
        &[
            "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", &loss,
        ],
    )
    .map(drop)
}

/// Takes the loss off again.
pub fn lossless(node: &str) -> Result<(), String> {
    in_ns(node, &["tc", "qdisc", "del", "dev", "eth0", "root"]).map(drop)
}
