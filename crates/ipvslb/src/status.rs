//! `ipvslb status`: this host's director as `cilium status` shows Cilium's agent. The running
//! director serves what it wants at `/status` on its metrics address ([`HostState`]); the command
//! reads that, dumps the kernel's IPVS table and addresses itself, and says whether the two
//! agree, VIP by VIP and virtual service by virtual service.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipvslb_api::Announce;
use ipvslb_ipvs::{OwnsAll, Removal, ServiceKey, Table};
use serde::{Deserialize, Serialize};

/// What a running director wants and knows, as `/status` serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostState {
    /// The director's name.
    pub director: String,
    /// Whether a full pass has programmed the kernel (and no stop or failed pass closed it).
    pub ready: bool,
    /// Its VIP interface (`--interface`).
    pub interface: String,
    /// Its announcement mode.
    pub announce: Announce,
    /// The interface it announces on, if any.
    pub announce_interface: Option<String>,
    /// The table it wants in the kernel, as planned from its caches now.
    #[serde(with = "as_list")]
    pub desired: Table,
    /// The VIPs it announces.
    pub announced: BTreeSet<IpAddr>,
    /// Each VIP it wants, with its pool's mode and, in L2 mode, the director elected for it.
    pub vips: Vec<VipState>,
    /// The live directors (L2 mode).
    pub live: Vec<String>,
    /// The backends whose health check fails now (`address:port`).
    pub backends_down: Vec<String>,
}

/// One VIP as the director sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VipState {
    /// The VIP.
    pub vip: IpAddr,
    /// Its pool's announcement mode.
    pub mode: Announce,
    /// In L2 mode, the director elected to answer for it (`None`: no director is live).
    pub elected: Option<String>,
}

/// Where the metrics server finds the director's [`HostState`]: set by a running director.
#[derive(Default)]
pub struct Board(Mutex<Option<Provider>>);

type Provider = Arc<dyn Fn() -> Option<HostState> + Send + Sync>;

impl Board {
    /// Serves what `provider` says from now on.
    pub fn set(&self, provider: Provider) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(provider);
        }
    }

    /// The state as JSON, or `None` when no director runs in this process.
    pub fn render(&self) -> Option<String> {
        let provider = self.0.lock().ok()?.clone()?;
        serde_json::to_string(&provider()?).ok()
    }
}

/// `ipvslb status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The director's metrics address (its `--metrics-addr`, on this host).
    #[arg(long, default_value = "127.0.0.1:9090")]
    addr: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// How `ipvslb status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON object for scripts.
    Json,
}

/// What the kernel holds, next to what the director wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The director's own account.
    pub host: HostState,
    /// The kernel's table: the virtual services on the director's VIPs.
    #[serde(with = "as_list")]
    pub kernel: Table,
    /// The addresses on the VIP interface.
    pub interface_addresses: BTreeSet<IpAddr>,
    /// The VIPs on the announce interface, as the kernel holds them.
    pub announced_in_kernel: BTreeSet<IpAddr>,
    /// Whether the kernel holds exactly what the director wants.
    pub in_sync: bool,
    /// The kernel writes that would make it so, as a full pass would make them.
    pub differences: Vec<String>,
}

/// Why `ipvslb status` could not report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The director did not answer.
    #[error(
        "asking the director at http://{addr}/status: {message} (is `ipvslb run` with the director role running here, with --metrics-addr {addr}?)"
    )]
    Director {
        /// Where it was asked.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// Reading the kernel failed.
    #[error("reading the kernel: {0}")]
    Kernel(String),
}

/// Runs `ipvslb status`; returns what to print.
pub async fn status(args: StatusArgs) -> Result<String, Error> {
    let host = fetch(args.addr).await?;
    let report = tokio::task::spawn_blocking(move || read_kernel(host))
        .await
        .map_err(|e| Error::Kernel(e.to_string()))??;
    Ok(match args.output {
        Output::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        Output::Text => report.to_text(),
    })
}

async fn fetch(addr: SocketAddr) -> Result<HostState, Error> {
    use http_body_util::BodyExt;
    let failed = |message: String| Error::Director { addr, message };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/status")
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sender.send_request(request),
    )
    .await
    .map_err(|_| failed("no answer within 10 s".to_owned()))?
    .map_err(|e| failed(e.to_string()))?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    if !code.is_success() {
        return Err(failed(format!(
            "{code}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    serde_json::from_slice(&body).map_err(|e| failed(format!("reading its answer: {e}")))
}

#[cfg(target_os = "linux")]
fn read_kernel(host: HostState) -> Result<Report, Error> {
    use ipvslb_ipvs::netlink::{Ipvs, Vips};
    let kernel_error = |e: ipvslb_ipvs::netlink::Error| Error::Kernel(e.to_string());
    let interface_addresses = Vips::open_existing(&host.interface)
        .and_then(|mut v| v.list())
        .map_err(kernel_error)?;
    let announced_in_kernel = match (&host.announce, &host.announce_interface) {
        (Announce::Bgp, Some(interface)) => Vips::open_existing(interface)
            .and_then(|mut v| v.list())
            .map_err(kernel_error)?,
        (Announce::L2, Some(interface)) => Vips::open_shared(interface, crate::segment::LIFETIME)
            .and_then(|(mut v, _)| v.list())
            .map_err(kernel_error)?
            .intersection(&interface_addresses)
            .copied()
            .collect(),
        _ => BTreeSet::new(),
    };
    let wanted: BTreeSet<IpAddr> = host.vips.iter().map(|v| v.vip).collect();
    let ours = |k: &ServiceKey| {
        host.desired.services.contains_key(k)
            || k.address()
                .is_some_and(|a| wanted.contains(&a) || interface_addresses.contains(&a))
    };
    let mut kernel = Ipvs::open()
        .and_then(|mut ipvs| ipvs.dump_with_destinations_of(&ours))
        .map_err(kernel_error)?;
    kernel.services.retain(|k, _| ours(k));
    Ok(compare(
        host,
        kernel,
        interface_addresses,
        announced_in_kernel,
    ))
}

#[cfg(not(target_os = "linux"))]
fn read_kernel(_host: HostState) -> Result<Report, Error> {
    Err(Error::Kernel("IPVS exists on Linux only".to_owned()))
}

/// Sets the kernel next to what the director wants.
pub fn compare(
    host: HostState,
    kernel: Table,
    interface_addresses: BTreeSet<IpAddr>,
    announced_in_kernel: BTreeSet<IpAddr>,
) -> Report {
    let mut differences: Vec<String> = ipvslb_ipvs::diff(
        &kernel,
        &host.desired,
        &OwnsAll,
        // A destination draining at weight 0 is as the director wants it for now.
        Removal::Drain,
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    let wanted: BTreeSet<IpAddr> = host.vips.iter().map(|v| v.vip).collect();
    for vip in wanted.difference(&interface_addresses) {
        differences.push(format!("add address {vip} to {}", host.interface));
    }
    for vip in interface_addresses.difference(&wanted) {
        differences.push(format!("remove address {vip} from {}", host.interface));
    }
    for vip in host.announced.symmetric_difference(&announced_in_kernel) {
        differences.push(format!(
            "announcement of {vip}: the director {} it, the kernel {}",
            if host.announced.contains(vip) {
                "announces"
            } else {
                "does not announce"
            },
            if announced_in_kernel.contains(vip) {
                "holds it"
            } else {
                "does not hold it"
            },
        ));
    }
    Report {
        in_sync: differences.is_empty(),
        host,
        kernel,
        interface_addresses,
        announced_in_kernel,
        differences,
    }
}

impl Report {
    /// The report for people.
    pub fn to_text(&self) -> String {
        let host = &self.host;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Director:       {} ({})",
            host.director,
            if host.ready { "ready" } else { "NOT READY" }
        );
        let announce = match &host.announce_interface {
            Some(interface) => format!("{} on {interface}", host.announce),
            None => host.announce.to_string(),
        };
        let _ = writeln!(out, "Announce:       {announce}");
        if host.announce == Announce::L2 {
            let live = if host.live.is_empty() {
                "none".to_owned()
            } else {
                host.live.join(", ")
            };
            let _ = writeln!(out, "Live directors: {live}");
        }
        let destinations: usize = self
            .kernel
            .services
            .values()
            .map(|e| e.destinations.len())
            .sum();
        let _ = writeln!(
            out,
            "IPVS:           {} ({} virtual services, {destinations} destinations in the kernel)",
            if self.in_sync {
                "in sync".to_owned()
            } else {
                format!("OUT OF SYNC: {} differences", self.differences.len())
            },
            self.kernel.services.len(),
        );
        let down = if host.backends_down.is_empty() {
            "none".to_owned()
        } else {
            host.backends_down.join(", ")
        };
        let _ = writeln!(out, "Backends down:  {down}");
        let _ = writeln!(out, "VIPs:");
        if host.vips.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for vip in &host.vips {
            let on = if self.interface_addresses.contains(&vip.vip) {
                format!("on {}", host.interface)
            } else {
                format!("MISSING from {}", host.interface)
            };
            let here = if self.announced_in_kernel.contains(&vip.vip) {
                "announced here"
            } else {
                "not announced here"
            };
            let elected = match (&vip.mode, &vip.elected) {
                (Announce::L2, Some(director)) => format!(", elected: {director}"),
                (Announce::L2, None) => ", elected: nobody".to_owned(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<40} {on}, {here} ({}{elected})",
                vip.vip, vip.mode
            );
        }
        if !self.differences.is_empty() {
            let _ = writeln!(out, "Differences (what a full pass would write):");
            for difference in &self.differences {
                let _ = writeln!(out, "  {difference}");
            }
        }
        let _ = write!(out, "\nDesired:\n{}", self.host.desired.listing());
        let _ = write!(out, "\nKernel:\n{}", self.kernel.listing());
        out
    }
}

/// A table in JSON: a list of virtual services, each with a list of its destinations (JSON
/// object keys can only be strings).
mod as_list {
    use ipvslb_ipvs::{Destination, Table, VirtualService};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Service {
        service: VirtualService,
        destinations: Vec<Destination>,
    }

    pub fn serialize<S: Serializer>(table: &Table, serializer: S) -> Result<S::Ok, S::Error> {
        let services: Vec<Service> = table
            .services
            .values()
            .map(|entry| Service {
                service: entry.service.clone(),
                destinations: entry.destinations.values().cloned().collect(),
            })
            .collect();
        services.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Table, D::Error> {
        let services = Vec::<Service>::deserialize(deserializer)?;
        let mut table = Table::new();
        for Service {
            service,
            destinations,
        } in services
        {
            table.insert(service, destinations);
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use ipvslb_ipvs::{Destination, ForwardingMethod, Scheduler, VirtualService};

    use super::*;

    fn table(weight: u32) -> Table {
        let mut t = Table::new();
        let key = ServiceKey::Addr {
            protocol: ipvslb_ipvs::Protocol::Tcp,
            address: "10.240.0.210".parse().unwrap(),
            port: 80,
        };
        t.insert(
            VirtualService::new(key, Scheduler::Rr),
            [Destination::new(
                "10.240.0.101".parse().unwrap(),
                80,
                ForwardingMethod::Route,
                weight,
            )],
        );
        t
    }

    fn host() -> HostState {
        HostState {
            director: "dir1".into(),
            ready: true,
            interface: "ipvslb0".into(),
            announce: Announce::L2,
            announce_interface: Some("eth1".into()),
            desired: table(1),
            announced: ["10.240.0.210".parse().unwrap()].into(),
            vips: vec![VipState {
                vip: "10.240.0.210".parse().unwrap(),
                mode: Announce::L2,
                elected: Some("dir1".into()),
            }],
            live: vec!["dir1".into(), "dir2".into()],
            backends_down: vec![],
        }
    }

    #[test]
    fn a_kernel_holding_what_the_director_wants_is_in_sync_and_any_difference_is_named() {
        let vip: BTreeSet<IpAddr> = ["10.240.0.210".parse().unwrap()].into();
        let same = compare(host(), table(1), vip.clone(), vip.clone());
        assert!(same.in_sync, "{:?}", same.differences);
        assert!(same.to_text().contains("in sync"));
        assert!(
            same.to_text()
                .contains("announced here (L2, elected: dir1)")
        );

        let drifted = compare(host(), table(0), BTreeSet::new(), BTreeSet::new());
        assert!(!drifted.in_sync);
        let text = drifted.to_text();
        assert!(text.contains("OUT OF SYNC: 3 differences"), "{text}");
        assert!(
            text.contains("add address 10.240.0.210 to ipvslb0"),
            "{text}"
        );
        assert!(
            text.contains("the director announces it, the kernel does not hold it"),
            "{text}"
        );
        // The JSON round-trips for scripts.
        let json = serde_json::to_string(&drifted).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), drifted);
    }
}
