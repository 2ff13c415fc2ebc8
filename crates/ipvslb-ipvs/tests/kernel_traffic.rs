//! Kernel test: real TCP and UDP traffic through virtual services programmed by this crate, in
//! the test VM (`cargo xtask vm-test`).
//!
//! The root network namespace is the director. Namespaces `client`, `node1` and `node2` hang off
//! a bridge `br0` (10.0.0.0/24) in the director; the client also has its own link to the director
//! (10.0.1.0/24), which it uses for the masquerade VIP so that the nodes' answers go back through
//! the director, as masquerading needs. Direct routing uses the bridge, with the VIP on the nodes'
//! loopback and `arp_ignore`/`arp_announce` set, as in classic LVS-DR: answers go from node to
//! client directly.
//!
//! This binary is also its own server and client: `serve NAME ADDR:PORT...` answers NAME over
//! TCP and UDP on each address; `ask tcp|udp ADDR:PORT` prints one answer. The scenarios run them
//! in the namespaces with `nsenter`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use common::{in_ns, sh};
use ipvslb_ipvs::netlink::{Ipvs, Vips};
use ipvslb_ipvs::{
    Destination, ForwardingMethod, Protocol, Removal, Scheduler, ServiceKey, Table, VirtualService,
};

const MASQ_VIP: &str = "10.240.0.210";
const DR_VIP: &str = "10.240.0.211";
const NODES: [(&str, &str); 2] = [("node1", "10.0.0.11"), ("node2", "10.0.0.12")];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]),
        Some("ask") => ask(&args[2..]),
        // Anything else (such as the test harness's `--test-threads=1`): run the scenarios.
        _ => scenarios(),
    };
    common::exit("kernel_traffic", result)
}

/// `serve NAME ADDR:PORT...`: answers NAME to every TCP connection and UDP datagram.
fn serve(args: &[String]) -> Result<(), String> {
    let (name, addrs) = args.split_first().ok_or("serve NAME ADDR:PORT...")?;
    let mut threads = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let tcp = TcpListener::bind(addr).map_err(|e| format!("tcp {addr}: {e}"))?;
        let udp = UdpSocket::bind(addr).map_err(|e| format!("udp {addr}: {e}"))?;
        let answer = format!("{name}\n");
        let tcp_answer = answer.clone();
        threads.push(std::thread::spawn(move || {
            for mut stream in tcp.incoming().flatten() {
                let _ = stream.write_all(tcp_answer.as_bytes());
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0; 1500];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(answer.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// `ask tcp|udp ADDR:PORT SOURCE_PORT`: prints the one-line answer (UDP from `SOURCE_PORT`).
fn ask(args: &[String]) -> Result<(), String> {
    let [protocol, addr, source] = args else {
        return Err("ask tcp|udp ADDR:PORT SOURCE_PORT".to_owned());
    };
    let source: u16 = source.parse().map_err(|e| format!("{source}: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let timeout = Duration::from_secs(3);
    let mut answer = String::new();
    match protocol.as_str() {
        "tcp" => {
            let mut stream =
                TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
            stream.set_read_timeout(Some(timeout)).ok();
            stream
                .read_to_string(&mut answer)
                .map_err(|e| format!("reading from {addr}: {e}"))?;
        }
        "udp" => {
            let socket = UdpSocket::bind(("0.0.0.0", source)).map_err(|e| e.to_string())?;
            // Connected: an answer from any other address than the VIP is not taken.
            socket.connect(addr).map_err(|e| format!("{addr}: {e}"))?;
            socket.set_read_timeout(Some(timeout)).ok();
            socket.send(b"who?").map_err(|e| format!("{addr}: {e}"))?;
            let mut buf = [0; 1500];
            let n = socket
                .recv(&mut buf)
                .map_err(|e| format!("no UDP answer from {addr}: {e}"))?;
            answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        other => return Err(format!("protocol {other}")),
    }
    print!("{}", answer.trim());
    Ok(())
}

fn topology() -> Result<(), String> {
    for ns in ["client", "node1", "node2"] {
        sh("ip", &["netns", "add", ns])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
    }
    sh("ip", &["link", "add", "br0", "type", "bridge"])?;
    sh("ip", &["addr", "add", "10.0.0.1/24", "dev", "br0"])?;
    sh("ip", &["link", "set", "br0", "up"])?;
    let on_bridge = [("client", "10.0.0.2"), NODES[0], NODES[1]];
    for (i, (ns, addr)) in on_bridge.iter().enumerate() {
        let outer = format!("vb{i}");
        sh(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        sh("ip", &["link", "set", &outer, "master", "br0", "up"])?;
        let cidr = format!("{addr}/24");
        in_ns(ns, &["ip", "addr", "add", &cidr, "dev", "eth0"])?;
        in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
    }
    // The client's own link to the director, for the masquerade VIP.
    sh(
        "ip",
        &[
            "link", "add", "vc", "type", "veth", "peer", "name", "eth1", "netns", "client",
        ],
    )?;
    sh("ip", &["addr", "add", "10.0.1.1/24", "dev", "vc"])?;
    sh("ip", &["link", "set", "vc", "up"])?;
    in_ns(
        "client",
        &["ip", "addr", "add", "10.0.1.2/24", "dev", "eth1"],
    )?;
    in_ns("client", &["ip", "link", "set", "eth1", "up"])?;
    in_ns(
        "client",
        &[
            "ip",
            "route",
            "add",
            &format!("{MASQ_VIP}/32"),
            "via",
            "10.0.1.1",
        ],
    )?;
    in_ns(
        "client",
        &[
            "ip",
            "route",
            "add",
            &format!("{DR_VIP}/32"),
            "via",
            "10.0.0.1",
        ],
    )?;
    for (ns, _) in NODES {
        in_ns(ns, &["ip", "route", "add", "default", "via", "10.0.0.1"])?;
        // LVS-DR: the node accepts the VIP but never answers ARP for it.
        in_ns(
            ns,
            &["ip", "addr", "add", &format!("{DR_VIP}/32"), "dev", "lo"],
        )?;
        in_ns(
            ns,
            &["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1"],
        )?;
        in_ns(
            ns,
            &["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_announce=2"],
        )?;
    }
    sh("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
    Ok(())
}

/// Starts the server of each node; they end when the returned children are killed.
fn servers() -> Result<Vec<Child>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let exe = exe.to_string_lossy().into_owned();
    let mut children = Vec::new();
    for (ns, _) in NODES {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args([exe.as_str(), "serve", ns, "0.0.0.0:8080", "0.0.0.0:5353"])
            .arg(format!("{DR_VIP}:80"))
            .arg(format!("{DR_VIP}:53"))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the server in {ns}: {e}"))?;
        let mut ready = [0; 6];
        if let Some(out) = child.stdout.as_mut() {
            out.read_exact(&mut ready)
                .map_err(|e| format!("the server in {ns} did not start: {e}"))?;
        }
        children.push(child);
    }
    Ok(children)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// The director's table: rr over both nodes, masquerade (to other ports) and direct routing,
/// TCP and UDP.
fn desired() -> Table {
    let mut table = Table::new();
    for (vip, forwarding, tcp_port, udp_port) in [
        (MASQ_VIP, ForwardingMethod::Masquerade, 8080, 5353),
        (DR_VIP, ForwardingMethod::Route, 80, 53),
    ] {
        for (protocol, port, node_port) in
            [(Protocol::Tcp, 80, tcp_port), (Protocol::Udp, 53, udp_port)]
        {
            let key = ServiceKey::addr(ip(vip), protocol, port);
            let dests = NODES
                .iter()
                .map(|(_, addr)| Destination::new(ip(addr), node_port, forwarding, 1));
            table.insert(VirtualService::new(key, Scheduler::Rr), dests);
        }
    }
    table
}

/// The first of the client's source ports for UDP: each request its own, so each is a new
/// flow to IPVS. A port the kernel picks may repeat one an earlier request used, and IPVS
/// then keeps that datagram on its flow's node (seen once: 3 connections for 4 requests).
const FIRST_UDP_SOURCE_PORT: usize = 41000;

/// Asks `vip:port` `times` times from the client and returns the answers.
fn answers(protocol: &str, vip: &str, port: u16, times: usize) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let exe = exe.to_string_lossy().into_owned();
    let target = format!("{vip}:{port}");
    (0..times)
        .map(|i| {
            let source = (FIRST_UDP_SOURCE_PORT + i).to_string();
            in_ns("client", &[&exe, "ask", protocol, &target, &source])
        })
        .collect()
}

fn scenarios() -> Result<(), String> {
    topology()?;
    let mut children = servers()?;
    let result = programmed_traffic();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn programmed_traffic() -> Result<(), String> {
    let mut vips = Vips::open("ipvslb0").map_err(|e| e.to_string())?;
    let wanted: BTreeSet<IpAddr> = [ip(MASQ_VIP), ip(DR_VIP)].into_iter().collect();
    vips.sync(&wanted).map_err(|e| e.to_string())?;
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    let owner = |k: &ServiceKey| k.address().is_some_and(|a| wanted.contains(&a));
    ipvs.sync(&owner, &desired(), Removal::Delete)
        .map_err(|e| e.to_string())?;

    let mut failures = Vec::new();
    for (name, protocol, vip, port) in [
        (
            "tcp_through_a_masquerade_vip_alternates_between_the_nodes",
            "tcp",
            MASQ_VIP,
            80,
        ),
        (
            "udp_through_a_masquerade_vip_alternates_between_the_nodes",
            "udp",
            MASQ_VIP,
            53,
        ),
        (
            "tcp_through_a_direct_routing_vip_alternates_between_the_nodes",
            "tcp",
            DR_VIP,
            80,
        ),
        (
            "udp_through_a_direct_routing_vip_alternates_between_the_nodes",
            "udp",
            DR_VIP,
            53,
        ),
    ] {
        let outcome = answers(protocol, vip, port, 4).and_then(|got| {
            let alternates = got.windows(2).all(|w| w[0] != w[1]);
            let both: BTreeSet<&str> = got.iter().map(String::as_str).collect();
            if alternates && both == BTreeSet::from(["node1", "node2"]) {
                Ok(got)
            } else {
                Err(format!("answers {got:?}"))
            }
        });
        match outcome {
            Ok(got) => println!("test {name} ... ok {got:?}"),
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failures.push(name);
            }
        }
    }

    // The kernel counted the connections on every destination, and our dump reads them. The
    // counters are summed from per-CPU counters by the kernel's estimator every 2 seconds.
    std::thread::sleep(Duration::from_secs(3));
    let table = ipvs.dump().map_err(|e| e.to_string())?;
    let mut counted = BTreeMap::new();
    for (key, entry) in table.services.iter().filter(|(k, _)| owner(k)) {
        for (dest, stats) in &entry.destination_stats {
            counted.insert(format!("{key} -> {dest}"), stats.connections);
        }
    }
    let uncounted: Vec<&String> = counted
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| k)
        .collect();
    if counted.len() == 8 && uncounted.is_empty() {
        println!("test every_destination_counted_its_connections ... ok {counted:?}");
    } else {
        println!("test every_destination_counted_its_connections ... FAILED: {counted:?}");
        failures.push("every_destination_counted_its_connections");
    }

    if failures.is_empty() {
        println!("traffic: all passed");
        Ok(())
    } else {
        Err(format!("failed: {failures:?}"))
    }
}
