//! Kernel test: directors with the same destinations send a flow to the same one, whatever the
//! history of their tables, and a director picks up mid-connection a flow another one started
//! (`cargo xtask vm-test`).
//!
//! Namespaces hang off a bridge in namespace `mlan` (10.9.0.0/24): `mclient`, three directors
//! `mdir1`..`mdir3` and five backends `mnode1`..`mnode5`. Each director has its own IPVS table
//! with one `mh` service on the VIP (hashing the source port too, `mh-port`), direct routing to
//! the backends, which hold the VIP on their loopback as in classic LVS-DR. The client reaches
//! the VIP through whichever director its route names.
//!
//! - `mdir1` went straight to the five backends; `mdir2` saw them come and go one at a time;
//!   both were converged by this crate's diff. `mdir3` had them added by hand in another order:
//!   the control, which shows that the order is what decides.
//! - The same 5-tuples sent through `mdir1` and `mdir2` reach the same backends.
//! - A TCP connection opened through one director goes on through another once the client's
//!   route moves, when the other has `sloppy_tcp` on; with it off, the control, it breaks; with
//!   it off but the kernel's connection sync daemons running on both, it goes on.
//!
//! This binary is also the backends' server (`serve NAME`), the client (`ask FIRST_PORT COUNT`,
//! `talk`) and the directors' programmer (`program HISTORY`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use common::sh;
use ipvslb_ipvs::netlink::Ipvs;
use ipvslb_ipvs::{
    Destination, ForwardingMethod, Op, Protocol, Removal, Scheduler, ServiceFlags, ServiceKey,
    SyncDaemon, SyncRole, Table, VirtualService,
};

const VIP: &str = "10.9.9.9";
const UDP_PORT: u16 = 53;
const TCP_PORT: u16 = 80;
const DIRECTORS: [(&str, &str); 3] = [
    ("mdir1", "10.9.0.11"),
    ("mdir2", "10.9.0.12"),
    ("mdir3", "10.9.0.13"),
];
const BACKENDS: [(&str, &str); 5] = [
    ("mnode1", "10.9.0.101"),
    ("mnode2", "10.9.0.102"),
    ("mnode3", "10.9.0.103"),
    ("mnode4", "10.9.0.104"),
    ("mnode5", "10.9.0.105"),
];
/// How many UDP flows (source ports) compare the directors. The order decides only the slots
/// where two destinations' permutations first meet at a free one: with the kernel's table of
/// 4093 slots and five destinations, about one in 350, so a few hundred flows can miss all.
const FLOWS: u16 = 4096;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]),
        Some("ask") => ask(&args[2..]),
        Some("talk") => talk(),
        Some("program") => program(&args[2..]),
        // Anything else (such as the test harness's `--test-threads=1`): run the scenarios.
        _ => scenarios(),
    };
    common::exit("kernel_maglev", result)
}

/// `serve NAME`: answers NAME to each UDP datagram on the VIP, and to each line of each TCP
/// connection.
fn serve(args: &[String]) -> Result<(), String> {
    let name = args.first().ok_or("serve NAME")?.clone();
    let udp = UdpSocket::bind((ip(VIP), UDP_PORT)).map_err(|e| format!("udp: {e}"))?;
    let tcp = TcpListener::bind((ip(VIP), TCP_PORT)).map_err(|e| format!("tcp: {e}"))?;
    let answer = format!("{name}\n");
    let tcp_answer = answer.clone();
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let answer = tcp_answer.clone();
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                for line in BufReader::new(stream).lines() {
                    if line.is_err() || writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    println!("ready");
    let mut buf = [0; 1500];
    while let Ok((_, from)) = udp.recv_from(&mut buf) {
        let _ = udp.send_to(answer.as_bytes(), from);
    }
    Ok(())
}

/// `ask FIRST_PORT COUNT`: one datagram to the VIP from each source port, printing
/// `PORT NAME` per answer.
fn ask(args: &[String]) -> Result<(), String> {
    let [first, count] = args else {
        return Err("ask FIRST_PORT COUNT".to_owned());
    };
    let first: u16 = first.parse().map_err(|e| format!("{first}: {e}"))?;
    let count: u16 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    for port in first..first + count {
        let socket = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("{port}: {e}"))?;
        socket
            .connect((ip(VIP), UDP_PORT))
            .map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(Duration::from_secs(2))).ok();
        socket.send(b"who?").map_err(|e| e.to_string())?;
        let mut buf = [0; 64];
        let answer = match socket.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
            Err(_) => "-".to_owned(),
        };
        println!("{port} {answer}");
    }
    Ok(())
}

/// `talk`: one TCP connection to the VIP; for each line read from stdin, sends a line and
/// prints the answer, or `broken: WHY` once the connection fails.
fn talk() -> Result<(), String> {
    let remote: SocketAddr = (ip(VIP), TCP_PORT).into();
    let stream = TcpStream::connect_timeout(&remote, Duration::from_secs(3))
        .map_err(|e| format!("connecting: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    for _ in std::io::stdin().lines() {
        let mut answer = String::new();
        let outcome = writer
            .write_all(b"hi\n")
            .and_then(|()| reader.read_line(&mut answer));
        match outcome {
            Ok(n) if n > 0 => println!("{}", answer.trim()),
            Ok(_) => println!("broken: closed"),
            Err(e) => println!("broken: {e}"),
        }
    }
    Ok(())
}

/// `program HISTORY`, in a director's namespace: its table goes through the history, then the
/// list order is printed. `straight` and `one-by-one` converge with the diff; `by-hand` adds
/// the destinations with raw operations, as another program would.
fn program(args: &[String]) -> Result<(), String> {
    let history = args.first().ok_or("program HISTORY")?;
    let mut ipvs = Ipvs::open().map_err(|e| e.to_string())?;
    let owner = |k: &ServiceKey| k.address() == Some(ip(VIP));
    let mut converge = |backends: &[usize]| {
        ipvs.sync(&owner, &table(backends), Removal::Delete)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    match history.as_str() {
        "straight" => converge(&[0, 1, 2, 3, 4])?,
        "one-by-one" => {
            for step in [
                &[4][..],
                &[4, 1],
                &[4, 1, 3],
                &[1, 3],
                &[0, 1, 3],
                &[0, 1, 2, 3],
                &[0, 1, 2, 3, 4],
            ] {
                converge(step)?;
            }
        }
        "by-hand" => {
            let wanted = table(&[0, 1, 2, 3, 4]);
            let mut ops = Vec::new();
            for entry in wanted.services.values() {
                ops.push(Op::AddService(entry.service.clone()));
                // Ascending from the head: the reverse of the canonical order.
                for dest in entry.destinations.values().rev() {
                    ops.push(Op::AddDest(entry.service.key, dest.clone()));
                }
            }
            let failures = ipvs.apply_each(&ops).map_err(|e| e.to_string())?;
            if let Some((_, e)) = failures.first() {
                return Err(e.to_string());
            }
        }
        "sync" => {
            // Both roles on every director: each sends its own connections and takes in the
            // others'.
            let wanted = [SyncRole::Master, SyncRole::Backup].map(|role| SyncDaemon {
                role,
                interface: "eth0".to_owned(),
                sync_id: 7,
            });
            let nowhere = SyncDaemon {
                interface: "nosuch0".to_owned(),
                ..wanted[0].clone()
            };
            let refused = match ipvs.ensure_sync_daemons(&[nowhere]) {
                Ok(_) => "not refused".to_owned(),
                Err(e) => e.to_string(),
            };
            let first = ipvs
                .ensure_sync_daemons(&wanted)
                .map_err(|e| e.to_string())?;
            let again = ipvs
                .ensure_sync_daemons(&wanted)
                .map_err(|e| e.to_string())?;
            let other_tier = SyncDaemon {
                sync_id: 8,
                ..wanted[0].clone()
            };
            let kept = match ipvs.ensure_sync_daemons(&[other_tier]) {
                Ok(_) => "replaced".to_owned(),
                Err(e) => e.to_string(),
            };
            let running = ipvs.sync_daemons().map_err(|e| e.to_string())?;
            let running: Vec<String> = running.iter().map(ToString::to_string).collect();
            println!(
                "started {} then {}; running: {}; refused: {refused}; kept: {kept}",
                first.len(),
                again.len(),
                running.join(", ")
            );
            return Ok(());
        }
        other => return Err(format!("no history {other}")),
    }
    let dumped = ipvs.dump().map_err(|e| e.to_string())?;
    let key = ServiceKey::addr(ip(VIP), Protocol::Udp, UDP_PORT);
    let order: Vec<String> = dumped
        .services
        .get(&key)
        .map(|e| {
            e.list_order()
                .iter()
                .map(|d| d.address.to_string())
                .collect()
        })
        .unwrap_or_default();
    println!("{}", order.join(" "));
    Ok(())
}

/// The VIP's UDP and TCP services, `mh` with `mh-port`, over the backends `which`.
fn table(which: &[usize]) -> Table {
    let mut table = Table::new();
    for (protocol, port) in [(Protocol::Udp, UDP_PORT), (Protocol::Tcp, TCP_PORT)] {
        let mut service =
            VirtualService::new(ServiceKey::addr(ip(VIP), protocol, port), Scheduler::Mh);
        service.flags = ServiceFlags::SCHED2;
        let dests = which
            .iter()
            .map(|i| Destination::new(ip(BACKENDS[*i].1), port, ForwardingMethod::Route, 1));
        table.insert(service, dests);
    }
    table
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// Runs `line` (split on spaces) in the network namespace `ns`.
fn in_ns(ns: &str, line: &str) -> Result<String, String> {
    let args: Vec<&str> = line.split_whitespace().collect();
    common::in_ns(ns, &args)
}

fn exe() -> Result<String, String> {
    std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| e.to_string())
}

fn topology() -> Result<(), String> {
    sh("ip", &["netns", "add", "mlan"])?;
    in_ns("mlan", "ip link add br0 type bridge")?;
    in_ns("mlan", "ip link set br0 up")?;
    let hosts = [("mclient", "10.9.0.2")]
        .into_iter()
        .chain(DIRECTORS)
        .chain(BACKENDS);
    for (i, (ns, addr)) in hosts.enumerate() {
        sh("ip", &["netns", "add", ns])?;
        in_ns(ns, "ip link set lo up")?;
        in_ns(
            "mlan",
            &format!("ip link add v{i} type veth peer name eth0 netns {ns}"),
        )?;
        in_ns("mlan", &format!("ip link set v{i} master br0 up"))?;
        in_ns(ns, &format!("ip addr add {addr}/24 dev eth0"))?;
        in_ns(ns, "ip link set eth0 up")?;
    }
    for (ns, _) in DIRECTORS {
        // IPVS takes what is addressed to the director itself.
        in_ns(ns, &format!("ip addr add {VIP}/32 dev lo"))?;
    }
    for (ns, _) in BACKENDS {
        // LVS-DR: the backend accepts the VIP but never answers ARP for it.
        in_ns(ns, &format!("ip addr add {VIP}/32 dev lo"))?;
        in_ns(ns, "sysctl -q -w net.ipv4.conf.all.arp_ignore=1")?;
        in_ns(ns, "sysctl -q -w net.ipv4.conf.all.arp_announce=2")?;
    }
    Ok(())
}

/// Starts each backend's server; they end when the children are killed.
fn servers() -> Result<Vec<Child>, String> {
    let exe = exe()?;
    let mut children = Vec::new();
    for (ns, _) in BACKENDS {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args([exe.as_str(), "serve", ns])
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

/// Points the client's route for the VIP at `director`.
fn route_via(director: &str) -> Result<(), String> {
    in_ns(
        "mclient",
        &format!("ip route replace {VIP}/32 via {director}"),
    )
    .map(drop)
}

/// Which backend answers each of the [`FLOWS`] source ports, through `director`.
fn flows_through(director: &str) -> Result<BTreeMap<u16, String>, String> {
    route_via(director)?;
    let out = in_ns("mclient", &format!("{} ask 40000 {FLOWS}", exe()?))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(port, name)| Some((port.parse().ok()?, name.to_owned())))
        .collect())
}

/// One TCP conversation of the client's, answered line by line.
struct Talk {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Talk {
    fn open() -> Result<Self, String> {
        let mut child = Command::new("nsenter")
            .arg("--net=/run/netns/mclient")
            .args([exe()?.as_str(), "talk"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the client: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the client's pipes".to_owned());
        };
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Sends a line; the answer, or `broken: WHY`.
    fn say(&mut self) -> Result<String, String> {
        self.stdin.write_all(b"\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_owned())
    }
}

impl Drop for Talk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection opened through `mdir1` and moved to `mdir2`: the backends that answered before
/// and after the move.
fn moved_connection(sloppy: bool, settle: Duration) -> Result<(String, String), String> {
    in_ns(
        "mdir2",
        &format!("sysctl -q -w net.ipv4.vs.sloppy_tcp={}", u8::from(sloppy)),
    )?;
    route_via(DIRECTORS[0].1)?;
    let mut talk = Talk::open()?;
    let before = talk.say()?;
    std::thread::sleep(settle);
    route_via(DIRECTORS[1].1)?;
    let after = talk.say()?;
    Ok((before, after))
}

fn scenarios() -> Result<(), String> {
    topology()?;
    let mut children = servers()?;
    let result = checks();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn checks() -> Result<(), String> {
    let exe = exe()?;
    let mut orders = Vec::new();
    for ((ns, _), history) in DIRECTORS.iter().zip(["straight", "one-by-one", "by-hand"]) {
        let order = in_ns(ns, &format!("{exe} program {history}"))?;
        println!("vm: {ns} ({history}) lists {}", order.trim());
        orders.push(order.trim().to_owned());
    }
    let mut flows = Vec::new();
    for (_, addr) in DIRECTORS {
        flows.push(flows_through(addr)?);
    }

    let mut failures = Vec::new();
    let mut check = |name: &str, outcome: Result<String, String>| match outcome {
        Ok(shown) => println!("test {name} ... ok {shown}"),
        Err(e) => {
            println!("test {name} ... FAILED: {e}");
            failures.push(name.to_owned());
        }
    };
    check(
        "directors_with_different_histories_list_their_destinations_alike",
        if orders[0] == orders[1] && orders[0] != orders[2] {
            Ok(format!("{:?}", orders[0]))
        } else {
            Err(format!("orders {orders:?}"))
        },
    );
    let reached: BTreeSet<&String> = flows[0].values().collect();
    check(
        "the_same_flows_reach_the_same_backends_through_either_director",
        if flows[0].len() == usize::from(FLOWS)
            && flows[0] == flows[1]
            && reached.len() >= 4
            && !reached.contains(&"-".to_owned())
        {
            Ok(format!("{} flows over {reached:?}", flows[0].len()))
        } else {
            Err(format!(
                "through mdir1 {:?}, through mdir2 {:?}",
                flows[0], flows[1]
            ))
        },
    );
    let differ = flows[0]
        .iter()
        .filter(|(port, name)| flows[2].get(port) != Some(name))
        .count();
    check(
        "a_director_whose_list_is_in_another_order_sends_flows_elsewhere",
        if differ > 0 {
            Ok(format!("{differ} of {FLOWS} flows differ through mdir3"))
        } else {
            Err("mdir3 sent every flow where mdir1 did: the order would not matter".to_owned())
        },
    );
    check(
        "with_sloppy_tcp_a_connection_moved_to_another_director_goes_on",
        moved_connection(true, Duration::ZERO).and_then(|(before, after)| {
            if before.starts_with("mnode") && before == after {
                Ok(format!("{before} before and after the move"))
            } else {
                Err(format!("{before} before the move, {after} after"))
            }
        }),
    );
    check(
        "without_sloppy_tcp_a_moved_connection_breaks",
        moved_connection(false, Duration::ZERO).and_then(|(before, after)| {
            if before.starts_with("mnode") && after.starts_with("broken") {
                Ok(format!("{before} before the move, {after} after"))
            } else {
                Err(format!(
                    "{before} before the move, {after} after: the control did not break"
                ))
            }
        }),
    );
    let mut daemons = Vec::new();
    for (ns, _) in &DIRECTORS[..2] {
        daemons.push(in_ns(ns, &format!("{exe} program sync"))?.trim().to_owned());
    }
    check(
        "the_sync_daemons_start_once_are_listed_and_a_bad_interface_is_refused",
        if daemons.iter().all(|d| {
            d.starts_with("started 2 then 0; running: master sync daemon on eth0 (sync id 7), backup sync daemon on eth0 (sync id 7); refused: starting the master sync daemon on nosuch0 (sync id 7): ")
                && d.contains("no such interface")
                && d.contains("; kept: master sync daemon on eth0 (sync id 7) already runs, not the master sync daemon on eth0 (sync id 8) asked for")
        }) {
            Ok(daemons[0].clone())
        } else {
            Err(format!("{daemons:?}"))
        },
    );
    // The master multicasts a connection once it has seen a few of its packets, and flushes
    // its buffer every second or two.
    check(
        "with_the_sync_daemons_a_moved_connection_goes_on_without_sloppy_tcp",
        moved_connection(false, Duration::from_secs(3)).and_then(|(before, after)| {
            if before.starts_with("mnode") && before == after {
                Ok(format!("{before} before and after the move"))
            } else {
                Err(format!("{before} before the move, {after} after"))
            }
        }),
    );
    if failures.is_empty() {
        println!("maglev: all passed");
        Ok(())
    } else {
        Err(format!("failed: {failures:?}"))
    }
}
