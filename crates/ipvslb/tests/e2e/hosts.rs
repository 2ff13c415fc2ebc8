//! The test hosts: network namespaces inside the VM, their links and addresses, and the
//! processes that run in them.
//!
//! ```text
//!                      remote 192.0.2.11 ── 192.0.2.1 ┐
//!                                                     director (root namespace, 10.240.0.6)
//!  client 10.240.0.11 ──┐                             │ ipvslb run, VIPs on ipvslb0
//!                       br0 10.240.0.0/24, fd00:240::/64 (the write-up's segment)
//!          node1 10.240.0.101 ──┘        └── node2 10.240.0.102      (kube-proxy each)
//!          cbr0 10.32.1.1/24                 cbr0 10.32.2.1/24
//!          whoami-1, whoami-3                whoami-2                 (pods)
//! ```
//!
//! `client` sits on the nodes' segment, as `master1` does in the write-up, so that direct routing
//! and tunnelling answer it straight from the node. `remote` is beyond the director, as
//! masquerading needs: the nodes' answers to it go back through the director, their gateway.

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The director's addresses on the nodes' segment.
pub const DIRECTOR_V4: &str = "10.240.0.6";
pub const DIRECTOR_V6: &str = "fd00:240::6";

/// A node: its namespace, addresses on the segment, and pod subnet number.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub name: &'static str,
    pub v4: &'static str,
    pub v6: &'static str,
    /// `n` of the pod subnets `10.32.n.0/24` and `fd00:10:32:n::/64`.
    pub pod_net: u8,
}

pub const NODES: [Node; 2] = [
    Node {
        name: "node1",
        v4: "10.240.0.101",
        v6: "fd00:240::101",
        pod_net: 1,
    },
    Node {
        name: "node2",
        v4: "10.240.0.102",
        v6: "fd00:240::102",
        pod_net: 2,
    },
];

/// A pod: a namespace behind a node, serving whoami on port 80.
#[derive(Debug, Clone, Copy)]
pub struct Pod {
    pub name: &'static str,
    pub node: usize,
    /// The host part of its addresses in the node's pod subnets.
    pub host: u8,
}

/// The Deployment's three replicas: two on node1, one on node2.
pub const PODS: [Pod; 3] = [
    Pod {
        name: "whoami-1",
        node: 0,
        host: 2,
    },
    Pod {
        name: "whoami-2",
        node: 1,
        host: 2,
    },
    Pod {
        name: "whoami-3",
        node: 0,
        host: 3,
    },
];

impl Pod {
    pub fn v4(&self) -> String {
        format!("10.32.{}.{}", NODES[self.node].pod_net, self.host)
    }
    pub fn v6(&self) -> String {
        format!("fd00:10:32:{}::{}", NODES[self.node].pod_net, self.host)
    }
}

/// The client on the segment and the one beyond the director.
pub const CLIENT: &str = "client";
pub const CLIENT_V4: &str = "10.240.0.11";
pub const CLIENT_V6: &str = "fd00:240::11";
pub const REMOTE: &str = "remote";
pub const REMOTE_V4: &str = "192.0.2.11";

/// The node whose addresses `addr` is: a node answers from its segment address, or from its
/// pod bridge when kube-proxy masquerades towards one of its own pods.
pub fn node_of(addr: IpAddr) -> Option<&'static str> {
    NODES.iter().find_map(|node| {
        let own = [
            node.v4.to_owned(),
            node.v6.to_owned(),
            format!("10.32.{}.1", node.pod_net),
            format!("fd00:10:32:{}::1", node.pod_net),
        ];
        own.iter()
            .any(|a| a.parse::<IpAddr>().ok() == Some(addr))
            .then_some(node.name)
    })
}

/// Runs a command; its failure is an error with its output.
pub fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` in the network namespace `ns`.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec![net.as_str()];
    all.extend_from_slice(args);
    sh("nsenter", &all)
}

/// `ip ARGS` in `ns`, or in the director's namespace for `None`.
fn ip(ns: Option<&str>, args: &str) -> Result<(), String> {
    let mut all = vec!["ip"];
    all.extend(args.split_whitespace());
    match ns {
        Some(ns) => in_ns(ns, &all).map(drop),
        None => sh(all[0], &all[1..]).map(drop),
    }
}

fn sysctl(ns: Option<&str>, setting: &str) -> Result<(), String> {
    let all = ["sysctl", "-q", "-w", setting];
    match ns {
        Some(ns) => in_ns(ns, &all).map(drop),
        None => sh(all[0], &all[1..]).map(drop),
    }
}

/// A bridge `name` in `ns` with an address of each family, up.
fn bridge(ns: Option<&str>, name: &str, v4: &str, v6: &str) -> Result<(), String> {
    ip(ns, &format!("link add {name} type bridge"))?;
    ip(ns, &format!("addr add {v4} dev {name}"))?;
    // No duplicate address detection: the test hosts are alone on their links.
    ip(ns, &format!("addr add {v6} dev {name} nodad"))?;
    ip(ns, &format!("link set {name} up"))
}

/// Builds every namespace, link, address and route of the picture above.
pub fn build() -> Result<(), String> {
    // qemu's user network: the only way out is the API server's forwarded address. The card
    // appears a moment after its driver loads.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if std::time::Instant::now() > deadline {
            return Err("no eth0: the virtio network card did not appear".to_owned());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ip(None, "link set eth0 up")?;
    ip(None, "addr add 10.0.2.15/24 dev eth0")?;
    bridge(
        None,
        "br0",
        &format!("{DIRECTOR_V4}/24"),
        &format!("{DIRECTOR_V6}/64"),
    )?;
    // Masquerading needs the director to forward the nodes' answers; it must not tell the
    // nodes to go around it.
    sysctl(None, "net.ipv4.ip_forward=1")?;
    sysctl(None, "net.ipv4.conf.all.send_redirects=0")?;

    let mut on_segment: Vec<(&str, &str, &str)> = vec![(CLIENT, CLIENT_V4, CLIENT_V6)];
    on_segment.extend(NODES.iter().map(|n| (n.name, n.v4, n.v6)));
    for (i, (ns, v4, v6)) in on_segment.iter().enumerate() {
        sh("ip", &["netns", "add", ns])?;
        ip(Some(ns), "link set lo up")?;
        ip(
            None,
            &format!("link add vb{i} type veth peer name eth0 netns {ns}"),
        )?;
        ip(None, &format!("link set vb{i} master br0 up"))?;
        ip(Some(ns), &format!("addr add {v4}/24 dev eth0"))?;
        ip(Some(ns), &format!("addr add {v6}/64 dev eth0 nodad"))?;
        ip(Some(ns), "link set eth0 up")?;
    }
    // Without announcement, IPv6 VIPs are reached by a static route to the director (Linux
    // answers neighbour solicitations only for addresses on the asking interface).
    ip(
        Some(CLIENT),
        &format!("-6 route add 2001:db8:240::/64 via {DIRECTOR_V6}"),
    )?;

    sh("ip", &["netns", "add", REMOTE])?;
    ip(Some(REMOTE), "link set lo up")?;
    ip(
        None,
        &format!("link add vr type veth peer name eth0 netns {REMOTE}"),
    )?;
    ip(None, "addr add 192.0.2.1/24 dev vr")?;
    ip(None, "link set vr up")?;
    ip(Some(REMOTE), &format!("addr add {REMOTE_V4}/24 dev eth0"))?;
    ip(Some(REMOTE), "link set eth0 up")?;
    ip(Some(REMOTE), "route add default via 192.0.2.1")?;

    for (i, node) in NODES.iter().enumerate() {
        let ns = Some(node.name);
        let n = node.pod_net;
        ip(ns, &format!("route add default via {DIRECTOR_V4}"))?;
        ip(ns, &format!("-6 route add default via {DIRECTOR_V6}"))?;
        sysctl(ns, "net.ipv4.ip_forward=1")?;
        sysctl(ns, "net.ipv6.conf.all.forwarding=1")?;
        bridge(
            ns,
            "cbr0",
            &format!("10.32.{n}.1/24"),
            &format!("fd00:10:32:{n}::1/64"),
        )?;
        for (j, other) in NODES.iter().enumerate() {
            if i != j {
                let m = other.pod_net;
                ip(ns, &format!("route add 10.32.{m}.0/24 via {}", other.v4))?;
                ip(
                    ns,
                    &format!("-6 route add fd00:10:32:{m}::/64 via {}", other.v6),
                )?;
            }
        }
    }
    for (k, pod) in PODS.iter().enumerate() {
        let node = NODES[pod.node];
        let n = node.pod_net;
        sh("ip", &["netns", "add", pod.name])?;
        ip(Some(pod.name), "link set lo up")?;
        ip(
            Some(node.name),
            &format!("link add vp{k} type veth peer name eth0 netns {}", pod.name),
        )?;
        ip(Some(node.name), &format!("link set vp{k} master cbr0 up"))?;
        ip(
            Some(pod.name),
            &format!("addr add {}/24 dev eth0", pod.v4()),
        )?;
        ip(
            Some(pod.name),
            &format!("addr add {}/64 dev eth0 nodad", pod.v6()),
        )?;
        ip(Some(pod.name), "link set eth0 up")?;
        ip(
            Some(pod.name),
            &format!("route add default via 10.32.{n}.1"),
        )?;
        ip(
            Some(pod.name),
            &format!("-6 route add default via fd00:10:32:{n}::1"),
        )?;
    }
    Ok(())
}

/// What a node needs for IP-in-IP from the director: the fallback tunnel `tunl0` up (the `ipip`
/// module creates one in every namespace) and reverse-path filtering relaxed, because the
/// client's packets arrive on `tunl0` while the route back to the client leaves by `eth0`.
pub fn accept_tunnel(node: &str) -> Result<(), String> {
    sh("modprobe", &["ipip"])?;
    ip(Some(node), "link set tunl0 up")?;
    sysctl(Some(node), "net.ipv4.conf.all.rp_filter=0")?;
    sysctl(Some(node), "net.ipv4.conf.tunl0.rp_filter=0")
}

/// A process started by the run, killed when dropped; its output goes to a log file.
pub struct Background {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Background {
    /// Starts `program args` in `ns` (or the director's namespace), logging to `/tmp/<name>.log`.
    pub fn start(
        name: &str,
        ns: Option<&str>,
        program: &str,
        args: &[&str],
    ) -> Result<Self, String> {
        Self::start_with(name, ns, program, args, &[])
    }

    /// [`Background::start`] with `env` added to its environment.
    pub fn start_with(
        name: &str,
        ns: Option<&str>,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let log = PathBuf::from(format!("/tmp/{name}.log"));
        let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cloning {}: {e}", log.display()))?;
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(program);
                c
            }
            None => Command::new(program),
        };
        let child = command
            .args(args)
            // Plain log lines, for reading back.
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Whether it has ended, with its status.
    pub fn ended(&mut self) -> Option<String> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string())
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills it at once (SIGKILL), as a crash would end it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`) and returns its log.
    pub fn stop(mut self, grace: std::time::Duration) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + grace;
        while self.ended().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
