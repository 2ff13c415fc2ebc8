//! `cargo xtask e2e`: the write-up's demo as one run, with every part real.
//!
//! The host runs the API server harness (etcd + kube-apiserver on loopback). The kernel VM boots
//! with qemu's user network in `restrict=on` mode, so the guest reaches nothing but the one
//! forwarded address `10.0.2.100:6443`, which qemu hands, connection by connection, to
//! `xtask relay` and so to the API server on the host's loopback. Inside the VM the orchestrator
//! (`crates/ipvslb/tests/e2e/`) builds the test hosts as network namespaces, starts
//! `ipvslb run`, a real `kube-proxy` on each node, and the pods, and runs the steps.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use xtask::apiserver::{build, server};

use crate::vm::{boot, initramfs, install_missing, kernel};

/// The address and port the guest dials for the API server (qemu's `guestfwd`; the guest's
/// relay, `tests/e2e/relay.rs`, dials the same).
const GUEST_API: &str = "10.0.2.100:6443";

/// The director's address on the nodes' segment (`hosts::DIRECTOR_V4` in the guest), where the
/// guest's relay listens for the nodes' kube-proxy.
const DIRECTOR_API: &str = "10.240.0.6:6443";

/// Modules the run needs beyond IPVS: the virtual network card, IP-in-IP for the tunnel step
/// (which loads it as a node's operator would), netem for the lossy link of the health step.
const MODULES: [&str; 4] = ["virtio_net", "virtio_pci", "ipip", "sch_netem"];

/// The modules `/init` loads before the run: the network card's.
const LOADED: [&str; 2] = ["virtio_pci", "virtio_net"];

/// Module folders taken whole: every netfilter module kube-proxy's rules may load.
const MODULE_DIRS: [&str; 3] = ["net/netfilter", "net/ipv4/netfilter", "net/ipv6/netfilter"];

/// The commands `xtables-legacy-multi` answers to, linked in the VM as kube-proxy calls them.
const IPTABLES_COMMANDS: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// BIRD 2, the routing daemon the director tier's step runs with `deploy/bird/`.
const BIRD: &str = "/usr/sbin/bird";

/// Where Debian's iptables looks for its extensions (compiled in, so the same path in the VM).
const XTABLES_LIBDIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// `cargo xtask e2e`: every step, in order (each builds on the one before).
pub fn run(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!("cargo xtask e2e takes no arguments, got {args:?}"));
    }
    let started = Instant::now();
    let versions = build::Versions::from_env();
    let bins = build::ensure_kube_proxy(&versions)?;
    crate::vm::host_tools()?;
    install_missing(
        "e2e",
        &[
            ("/usr/sbin/xtables-legacy-multi", "iptables"),
            ("/usr/bin/strip", "binutils"),
            (BIRD, "bird2"),
        ],
    )?;
    let cache = xtask::cache_root().join("vm");
    std::fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let kernel = kernel::fetch(&cache)?;
    let built = build_binaries()?;

    let work = cache.join("e2e");
    let _ = std::fs::remove_dir_all(&work);
    let guest = work.join("guest");
    std::fs::create_dir_all(&guest).map_err(|e| format!("creating {}: {e}", guest.display()))?;
    let mut options = server::Options::new(&work.join("apiserver"), bins.clone());
    // Dual-stack Services (the IPv6 step) need a ClusterIP range of each family.
    options.extra_apiserver_args = vec![format!(
        "--service-cluster-ip-range={},fd00:10:96::/112",
        server::SERVICE_CLUSTER_IP_RANGE
    )];
    let api = server::start(&options)?;
    eprintln!(
        "e2e: API server at {} after {:.1?}",
        api.url,
        started.elapsed()
    );

    let outcome = boot_guest(&kernel, &cache, &guest, &api, &bins, &built);
    // The API server stops whatever the VM did; its logs stay when the run failed.
    let stopped = match &outcome {
        Ok(o) if o.status == 0 => api.stop(),
        _ => {
            eprintln!("e2e: the API server's logs stay in {}", api.dir.display());
            api.stop_keeping_logs()
        }
    };
    let outcome = outcome?;
    stopped?;

    let summary: Vec<&String> = outcome
        .lines
        .iter()
        .filter(|l| {
            [
                "ok ",
                "FAILED ",
                "e2e: ",
                "round robin: ",
                "detection = ",
                "recovery = ",
                "flaps = ",
                "withdrawal = ",
                "flows broken = ",
                "flow share = ",
                "l2 failover = ",
                "l2 graceful failover = ",
                "l2 ipv6 failover = ",
                "double announcers = ",
                "skipped ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
                || l.contains(" passed, ")
        })
        .collect();
    println!("== e2e summary (whole run {:.1?})", started.elapsed());
    for line in summary {
        println!("{line}");
    }
    if outcome.status == 0 {
        Ok(())
    } else {
        Err(format!(
            "the end-to-end run failed (exit status {}); the VM's output is above",
            outcome.status
        ))
    }
}

/// The binaries built from this workspace for the VM.
struct Built {
    /// The orchestrator.
    e2e: PathBuf,
    /// The product.
    ipvslb: PathBuf,
}

fn build_binaries() -> Result<Built, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let executables = crate::vm::executables(
        Command::new(cargo)
            .args([
                "test",
                // The whole workspace, as `cargo test --workspace` resolves it, so that the
                // dependencies' features unify the same way and nothing is compiled twice.
                "--workspace",
                "--features",
                "ipvslb/e2e-tests",
                "--locked",
            ])
            .args(["--test", "e2e", "--no-run", "--message-format=json"]),
        "the end-to-end binaries",
    )?;
    let named = |prefix: &str| {
        executables
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == prefix || n.starts_with(&format!("{prefix}-")))
            })
            .cloned()
            .ok_or_else(|| format!("cargo built no {prefix} executable"))
    };
    Ok(Built {
        e2e: named("e2e")?,
        ipvslb: named("ipvslb")?,
    })
}

fn boot_guest(
    kernel: &kernel::Kernel,
    cache: &Path,
    guest: &Path,
    api: &server::Server,
    bins: &build::Binaries,
    built: &Built,
) -> Result<boot::Outcome, String> {
    let admin = std::fs::read_to_string(&api.kubeconfig)
        .map_err(|e| format!("reading {}: {e}", api.kubeconfig.display()))?;
    let port = api.url.rsplit(':').next().unwrap_or_default().to_owned();
    // The director dials its own relay on loopback, the nodes the relay on the director's
    // address; the certificate names 127.0.0.1, so the nodes say which name to check.
    write(
        &guest.join("kubeconfig"),
        &retarget(&admin, &api.url, "https://127.0.0.1:6443", None)?,
    )?;
    write(
        &guest.join("kubeconfig-node"),
        &retarget(
            &admin,
            &api.url,
            &format!("https://{DIRECTOR_API}"),
            Some("127.0.0.1"),
        )?,
    )?;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let contents = initramfs::Contents {
        name: "e2e".to_owned(),
        tests: vec![built.e2e.clone(), built.ipvslb.clone()],
        programs: vec![
            (bins.kubectl.clone(), "/bin/kubectl".to_owned()),
            (bins.kube_proxy.clone(), "/bin/kube-proxy".to_owned()),
            (
                PathBuf::from("/usr/sbin/xtables-legacy-multi"),
                "/sbin/xtables-legacy-multi".to_owned(),
            ),
            (PathBuf::from("/usr/sbin/tc"), "/sbin/tc".to_owned()),
            // The routing daemon of the director tier's step, from Debian's bird2.
            (PathBuf::from(BIRD), "/sbin/bird".to_owned()),
            (PathBuf::from("/usr/sbin/birdc"), "/sbin/birdc".to_owned()),
        ],
        files: vec![
            (PathBuf::from(XTABLES_LIBDIR), XTABLES_LIBDIR.to_owned()),
            (root.join("crds"), "/e2e/crds".to_owned()),
            (root.join("examples"), "/e2e/examples".to_owned()),
            (root.join("deploy/bird"), "/e2e/deploy/bird".to_owned()),
            (guest.join("kubeconfig"), "/e2e/kubeconfig".to_owned()),
            (
                guest.join("kubeconfig-node"),
                "/e2e/kubeconfig-node".to_owned(),
            ),
        ],
        links: IPTABLES_COMMANDS
            .iter()
            .map(|c| (format!("/sbin/{c}"), "xtables-legacy-multi".to_owned()))
            .collect(),
        modules: MODULES.iter().map(|m| (*m).to_owned()).collect(),
        module_dirs: MODULE_DIRS.iter().map(|d| (*d).to_owned()).collect(),
        run: format!(
            "for m in {}; do modprobe $m || echo \"vm: modprobe $m failed\"; done\n{}/tests/e2e run || status=$?\n",
            LOADED.join(" "),
            chosen_steps()?
        ),
    };
    let initrd = initramfs::build(cache, kernel, &contents)?;

    // qemu starts the relay once per connection: from a copy of this very binary, since cargo
    // may have replaced the file it was started from (`cargo test --workspace` rebuilds it when
    // the workspace's features unify otherwise), and the kernel then calls its path deleted.
    let xtask = guest.join("xtask-relay");
    std::fs::copy("/proc/self/exe", &xtask)
        .map_err(|e| format!("copying xtask itself to {}: {e}", xtask.display()))?;
    let (guest_ip, guest_port) = GUEST_API.split_once(':').unwrap_or_default();
    if xtask.to_string_lossy().contains([',', ' ']) {
        return Err(format!(
            "qemu's -nic option cannot carry the path {} (a comma or space in it)",
            xtask.display()
        ));
    }
    let machine = boot::Machine {
        memory_mib: 3072,
        cpus: 2,
        // restrict=on: no packet of the guest leaves except through the forwarding below.
        nic: Some(format!(
            "user,model=virtio-net-pci,restrict=on,guestfwd=tcp:{guest_ip}:{guest_port}-cmd:{} relay 127.0.0.1:{port}",
            xtask.display()
        )),
    };
    let timeout = std::env::var("IPVSLB_VM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    boot::run(&kernel.vmlinuz, &initrd, &machine, timeout)
}

/// `IPVSLB_E2E_STEPS` (some steps only, while working on them) carried into the guest's run.
fn chosen_steps() -> Result<String, String> {
    const VAR: &str = "IPVSLB_E2E_STEPS";
    match std::env::var(VAR) {
        Err(_) => Ok(String::new()),
        Ok(list) if list.is_empty() => Ok(String::new()),
        Ok(list)
            if list
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == ',') =>
        {
            Ok(format!("export {VAR}={list}\n"))
        }
        Ok(list) => Err(format!(
            "{VAR}={list:?}: step names separated by commas only"
        )),
    }
}

/// `kubeconfig` with its server `from` replaced by `to`, and a `tls-server-name` when given.
fn retarget(kubeconfig: &str, from: &str, to: &str, name: Option<&str>) -> Result<String, String> {
    let line = format!("server: {from}");
    if !kubeconfig.contains(&line) {
        return Err(format!("the kubeconfig names no {line}"));
    }
    let replacement = match name {
        Some(name) => format!("server: {to}\n    tls-server-name: {name}"),
        None => format!("server: {to}"),
    };
    Ok(kubeconfig.replace(&line, &replacement))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `cargo xtask relay ADDR`: copies standard input to a TCP connection to `ADDR` and the
/// connection's answers to standard output; qemu runs one per connection of the guest.
pub fn relay(args: &[String]) -> Result<(), String> {
    let [addr] = args else {
        return Err("usage: cargo xtask relay HOST:PORT".to_owned());
    };
    let upstream = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let mut down = upstream
        .try_clone()
        .map_err(|e| format!("cloning the connection to {addr}: {e}"))?;
    // The thread ends with the process: it may sit in a read of standard input after the API
    // server has closed its side.
    std::thread::spawn(move || {
        let mut up = &upstream;
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0; 64 * 1024];
    let mut out = std::io::stdout().lock();
    loop {
        match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::retarget;

    #[test]
    fn a_kubeconfig_is_pointed_at_the_guest_side_relay() {
        let text = "clusters:\n- cluster:\n    server: https://127.0.0.1:41234\n";
        assert_eq!(
            retarget(
                text,
                "https://127.0.0.1:41234",
                "https://10.240.0.6:6443",
                Some("127.0.0.1")
            )
            .unwrap(),
            "clusters:\n- cluster:\n    server: https://10.240.0.6:6443\n    tls-server-name: 127.0.0.1\n"
        );
        assert!(retarget(text, "https://127.0.0.1:1", "x", None).is_err());
    }
}
