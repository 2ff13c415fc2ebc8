//! What the director needs of a host's data plane, behind one trait: the kernel (IPVS over
//! netlink, VIP addresses over rtnetlink) on a real director, an in-memory table elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ipvslb_api::Announce;
use ipvslb_ipvs::{Op, ServiceEntry, ServiceKey, Table};

use crate::converge::Owned;

/// A data-plane operation that failed. Kernel errors arrive as their own typed errors and are
/// kept here as text with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the table or one service failed.
    #[error("reading the IPVS table: {0}")]
    Read(String),
    /// Some operations were refused; every other one took effect.
    #[error("{} of {total} IPVS changes failed; the first: {}", .failures.len(), .failures.first().map(|f| f.message.as_str()).unwrap_or_default())]
    Apply {
        /// How many operations were tried.
        total: usize,
        /// The refused ones, in the order of the operations.
        failures: Vec<OpFailure>,
    },
    /// Sending operations failed: which of them took effect is unknown.
    #[error("writing IPVS changes: {0}")]
    Write(String),
    /// Reading or changing the VIP addresses failed.
    #[error("VIP address {address:?}: {message}")]
    Address {
        /// The address, when one was concerned.
        address: Option<IpAddr>,
        /// What failed.
        message: String,
    },
    /// The in-memory state was poisoned by a panic elsewhere.
    #[error("data plane state is unusable after an earlier failure")]
    Poisoned,
    /// Writing an IPVS setting under `/proc/sys/net/ipv4/vs` failed.
    #[error("setting net.ipv4.vs.{name}: {message}")]
    Sysctl {
        /// The setting.
        name: &'static str,
        /// What failed.
        message: String,
    },
}

/// The IPVS settings draining needs, and why each is 1:
///
/// - `expire_nodest_conn`: a connection whose destination was deleted is dropped at its next
///   packet instead of black-holing until it times out, so the client retries elsewhere;
/// - `expire_quiescent_template`: a persistence template pointing at a destination at weight 0
///   (draining, failed its check) expires, so persistent clients move on;
/// - `conn_reuse_mode`: a new connection that reuses the ports of an old one is scheduled
///   afresh rather than sent to the old (perhaps draining) destination.
pub const IPVS_SYSCTLS: [(&str, &str); 3] = [
    ("expire_nodest_conn", "1"),
    ("expire_quiescent_template", "1"),
    ("conn_reuse_mode", "1"),
];

/// The IPVS settings that let a director take over mid-connection a flow another director
/// started (ECMP moved it after a director was lost or added): without them IPVS schedules a
/// TCP or SCTP flow only from its first packet, and answers the others with a reset. With the
/// `mh` scheduler and the canonical destination order, the director that takes over picks the
/// destination the first one picked.
pub const SLOPPY_SYSCTLS: [(&str, &str); 2] = [("sloppy_tcp", "1"), ("sloppy_sctp", "1")];

/// Writes [`IPVS_SYSCTLS`] (the `ip_vs` module must be loaded, as opening the data plane does).
pub fn set_ipvs_sysctls() -> Result<(), Error> {
    set_sysctls(&IPVS_SYSCTLS)
}

/// Writes each `(name, value)` under `/proc/sys/net/ipv4/vs`, in this network namespace.
pub fn set_sysctls(settings: &[(&'static str, &str)]) -> Result<(), Error> {
    for &(name, value) in settings {
        let path = format!("/proc/sys/net/ipv4/vs/{name}");
        std::fs::write(&path, value).map_err(|e| Error::Sysctl {
            name,
            message: format!("writing {value} to {path}: {e}"),
        })?;
    }
    Ok(())
}

/// One operation the data plane refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFailure {
    /// Its index in the operations applied.
    pub index: usize,
    /// Why.
    pub message: String,
}

/// The director's view of one host's data plane. Calls may block (netlink): async callers run
/// them on a blocking thread.
pub trait Dataplane: Send + Sync + 'static {
    /// The IPVS table: every service, with the destinations of at least the `owned` ones.
    fn dump(&self, owned: &Owned) -> Result<Table, Error>;
    /// One virtual service and its destinations, or `None` if the kernel has no such service.
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error>;
    /// Applies `ops` in order; a refused operation does not stop the ones after it.
    fn apply(&self, ops: &[Op]) -> Result<(), Error>;
    /// The VIP addresses on the director's own interface.
    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error>;
    /// Adds a VIP address to the director's own interface.
    fn add_address(&self, address: IpAddr) -> Result<(), Error>;
    /// Removes a VIP address from the director's own interface.
    fn del_address(&self, address: IpAddr) -> Result<(), Error>;
    /// How this data plane announces VIPs: `BGP` (an announce interface the host's routing
    /// daemon exports), `L2` (ARP and NDP on a segment) or `None`.
    fn announces(&self) -> Announce;
    /// The VIPs announced: the VIP addresses on the announce interface. `None` when this data
    /// plane announces nothing.
    fn announced(&self) -> Result<Option<BTreeSet<IpAddr>>, Error>;
    /// Announces a VIP (it stays on the director's own interface either way).
    fn announce(&self, address: IpAddr) -> Result<(), Error>;
    /// Withdraws a VIP's announcement.
    fn withdraw(&self, address: IpAddr) -> Result<(), Error>;
    /// Until when this director may announce in L2 mode (its Lease's deadline; `None`: not
    /// at all): past it, the data plane withdraws by itself, whatever else is stuck.
    fn hold_until(&self, _until: Option<std::time::Instant>) {}
    /// How many write requests were sent so far (to prove idempotence: a repeated sync adds 0).
    fn writes(&self) -> u64;
}

/// A data plane in memory: the same semantics as the kernel's table (adding an existing service
/// fails, and so on), for hosts without IPVS and for controller tests.
#[derive(Debug, Default)]
pub struct Memory {
    table: Mutex<Table>,
    addresses: Mutex<BTreeSet<IpAddr>>,
    writes: AtomicU64,
    /// Writes to these virtual services fail with this message, as the kernel refuses a
    /// scheduler it has no module for.
    refused: Mutex<BTreeMap<ServiceKey, String>>,
    /// The announced VIPs, when this data plane announces.
    announced: Mutex<Option<BTreeSet<IpAddr>>>,
    /// Announcing these fails, as the kernel refuses an IPv6 address on a host without IPv6.
    unannounceable: Mutex<BTreeSet<IpAddr>>,
    /// How it announces.
    mode: Announce,
}

impl Memory {
    /// A data plane in memory that announces VIPs over BGP, as one with an announce interface
    /// does.
    pub fn announcing() -> Self {
        Self::announcing_in(Announce::Bgp)
    }

    /// A data plane in memory that announces VIPs in `mode` (`None`: announces nothing).
    pub fn announcing_in(mode: Announce) -> Self {
        Self {
            announced: Mutex::new((mode != Announce::None).then(BTreeSet::new)),
            mode,
            ..Self::default()
        }
    }

    /// Makes every later write to `key` fail with `message`.
    pub fn refuse_writes_to(&self, key: ServiceKey, message: &str) -> Result<(), Error> {
        self.refused
            .lock()
            .map_err(|_| Error::Poisoned)?
            .insert(key, message.to_owned());
        Ok(())
    }

    /// Makes every later announcement of `address` fail.
    pub fn refuse_to_announce(&self, address: IpAddr) -> Result<(), Error> {
        self.unannounceable
            .lock()
            .map_err(|_| Error::Poisoned)?
            .insert(address);
        Ok(())
    }

    /// Sets the connection counts of a destination, as the kernel would report them.
    pub fn set_connections(
        &self,
        key: ServiceKey,
        destination: ipvslb_ipvs::DestKey,
        active: u32,
        inactive: u32,
    ) -> Result<(), Error> {
        let mut table = self.table.lock().map_err(|_| Error::Poisoned)?;
        if let Some(entry) = table.services.get_mut(&key) {
            let stats = entry.destination_stats.entry(destination).or_default();
            stats.active_connections = active;
            stats.inactive_connections = inactive;
        }
        Ok(())
    }

    /// A snapshot of the table.
    pub fn table(&self) -> Result<Table, Error> {
        self.table
            .lock()
            .map(|t| t.clone())
            .map_err(|_| Error::Poisoned)
    }
}

impl Dataplane for Memory {
    fn dump(&self, _owned: &Owned) -> Result<Table, Error> {
        self.table()
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error> {
        let table = self.table.lock().map_err(|_| Error::Poisoned)?;
        Ok(table.services.get(key).cloned())
    }

    fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        let mut table = self.table.lock().map_err(|_| Error::Poisoned)?;
        let refused = self.refused.lock().map_err(|_| Error::Poisoned)?;
        let mut failures = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            let result = match refused.get(op.service_key()) {
                Some(message) => Err(message.clone()),
                None => table.apply(op).map_err(|e| e.to_string()),
            };
            if let Err(message) = result {
                failures.push(OpFailure { index, message });
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Apply {
                total: ops.len(),
                failures,
            })
        }
    }

    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        self.addresses
            .lock()
            .map(|a| a.clone())
            .map_err(|_| Error::Poisoned)
    }

    fn add_address(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut addresses = self.addresses.lock().map_err(|_| Error::Poisoned)?;
        addresses.insert(address);
        Ok(())
    }

    fn del_address(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut addresses = self.addresses.lock().map_err(|_| Error::Poisoned)?;
        addresses.remove(&address);
        Ok(())
    }

    fn announces(&self) -> Announce {
        self.mode
    }

    fn announced(&self) -> Result<Option<BTreeSet<IpAddr>>, Error> {
        self.announced
            .lock()
            .map(|a| a.clone())
            .map_err(|_| Error::Poisoned)
    }

    fn announce(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self
            .unannounceable
            .lock()
            .map_err(|_| Error::Poisoned)?
            .contains(&address)
        {
            return Err(Error::Address {
                address: Some(address),
                message: "announcing: refused".to_owned(),
            });
        }
        let mut announced = self.announced.lock().map_err(|_| Error::Poisoned)?;
        if let Some(set) = announced.as_mut() {
            set.insert(address);
        }
        Ok(())
    }

    fn withdraw(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut announced = self.announced.lock().map_err(|_| Error::Poisoned)?;
        if let Some(set) = announced.as_mut() {
            set.remove(&address);
        }
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// A shared data plane is a data plane: tests keep a handle on the one the director writes to.
impl<D: Dataplane> Dataplane for std::sync::Arc<D> {
    fn dump(&self, owned: &Owned) -> Result<Table, Error> {
        (**self).dump(owned)
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error> {
        (**self).service(key)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        (**self).apply(ops)
    }

    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        (**self).addresses()
    }

    fn add_address(&self, address: IpAddr) -> Result<(), Error> {
        (**self).add_address(address)
    }

    fn del_address(&self, address: IpAddr) -> Result<(), Error> {
        (**self).del_address(address)
    }

    fn announces(&self) -> Announce {
        (**self).announces()
    }

    fn hold_until(&self, until: Option<std::time::Instant>) {
        (**self).hold_until(until);
    }

    fn announced(&self) -> Result<Option<BTreeSet<IpAddr>>, Error> {
        (**self).announced()
    }

    fn announce(&self, address: IpAddr) -> Result<(), Error> {
        (**self).announce(address)
    }

    fn withdraw(&self, address: IpAddr) -> Result<(), Error> {
        (**self).withdraw(address)
    }

    fn writes(&self) -> u64 {
        (**self).writes()
    }
}

/// The kernel: IPVS over generic netlink, VIPs on a dummy interface over rtnetlink. Both
/// sockets are used by one thread at a time.
#[cfg(target_os = "linux")]
pub struct Kernel {
    ipvs: Mutex<ipvslb_ipvs::netlink::Ipvs>,
    vips: Mutex<ipvslb_ipvs::netlink::Vips>,
    /// Where the VIPs are announced, if anywhere.
    announce: Option<Channel>,
    address_writes: AtomicU64,
}

/// How a kernel data plane announces its VIPs.
#[cfg(target_os = "linux")]
enum Channel {
    /// On a dummy interface of ipvslb's, which the host's routing daemon exports (`BGP`).
    Routed(Mutex<ipvslb_ipvs::netlink::Vips>),
    /// On the host's interface on the segment, which then answers ARP and NDP for them (`L2`).
    Segment(crate::segment::Segment),
}

/// The interface of kube-proxy's IPVS mode.
pub const KUBE_PROXY_INTERFACE: &str = "kube-ipvs0";

#[cfg(target_os = "linux")]
impl Kernel {
    /// Opens IPVS and the VIP interface `interface` (created if absent; refused if it exists
    /// and ipvslb did not create it), and warns of what else on the host programs the same
    /// kernel objects.
    pub fn open(interface: &str) -> Result<Self, Error> {
        Self::open_with(interface, ipvslb_ipvs::netlink::Vips::open)
    }

    /// As [`Kernel::open`], but an absent interface is an error, not created.
    pub fn open_existing(interface: &str) -> Result<Self, Error> {
        Self::open_with(interface, ipvslb_ipvs::netlink::Vips::open_existing)
    }

    fn open_with(
        interface: &str,
        open: fn(&str) -> ipvslb_ipvs::netlink::Result<ipvslb_ipvs::netlink::Vips>,
    ) -> Result<Self, Error> {
        let ipvs = ipvslb_ipvs::netlink::Ipvs::open().map_err(|e| Error::Read(e.to_string()))?;
        let vips = open(interface).map_err(|e| Error::Address {
            address: None,
            message: format!("interface {interface}: {e}"),
        })?;
        let kernel = Self {
            ipvs: Mutex::new(ipvs),
            vips: Mutex::new(vips),
            announce: None,
            address_writes: AtomicU64::new(0),
        };
        for conflict in kernel.conflicts()? {
            tracing::warn!(%conflict, "another program on this host programs what the director programs");
        }
        Ok(kernel)
    }

    /// Also keeps the VIPs this director announces on `interface` (created if absent; refused
    /// if it exists and ipvslb did not create it), for the host's routing daemon to export.
    pub fn announcing_on(self, interface: &str) -> Result<Self, Error> {
        self.announcing_with(interface, ipvslb_ipvs::netlink::Vips::open)
    }

    /// As [`Kernel::announcing_on`], but an absent interface is an error, not created.
    pub fn announcing_on_existing(self, interface: &str) -> Result<Self, Error> {
        self.announcing_with(interface, ipvslb_ipvs::netlink::Vips::open_existing)
    }

    fn announcing_with(
        mut self,
        interface: &str,
        open: fn(&str) -> ipvslb_ipvs::netlink::Result<ipvslb_ipvs::netlink::Vips>,
    ) -> Result<Self, Error> {
        let vips = open(interface).map_err(|e| Error::Address {
            address: None,
            message: format!("announce interface {interface}: {e}"),
        })?;
        self.announce = Some(Channel::Routed(Mutex::new(vips)));
        Ok(self)
    }

    /// Announces the VIPs this director is elected for on the host's interface `interface`,
    /// which must exist: it answers ARP and NDP for them there, and for no other VIP (see
    /// [`crate::segment`]).
    pub fn announcing_l2_on(mut self, interface: &str) -> Result<Self, Error> {
        self.announce = Some(Channel::Segment(crate::segment::Segment::open(interface)?));
        Ok(self)
    }

    /// Makes the kernel's connection sync daemons run as `wanted` says (see
    /// [`ipvslb_ipvs::netlink::Ipvs::ensure_sync_daemons`]); returns those started.
    pub fn ensure_sync_daemons(
        &self,
        wanted: &[ipvslb_ipvs::SyncDaemon],
    ) -> Result<Vec<ipvslb_ipvs::SyncDaemon>, Error> {
        let mut ipvs = self.ipvs.lock().map_err(|_| Error::Poisoned)?;
        ipvs.ensure_sync_daemons(wanted)
            .map_err(|e| Error::Write(e.to_string()))
    }

    /// What else on this host programs the kernel objects the director programs, said so an
    /// operator can act on it.
    pub fn conflicts(&self) -> Result<Vec<String>, Error> {
        let mut vips = self.vips.lock().map_err(|_| Error::Poisoned)?;
        let kube_proxy = vips
            .link_exists(KUBE_PROXY_INTERFACE)
            .map_err(|e| Error::Address {
                address: None,
                message: format!("looking for interface {KUBE_PROXY_INTERFACE}: {e}"),
            })?;
        Ok(if kube_proxy {
            vec![format!(
                "interface {KUBE_PROXY_INTERFACE} exists, so kube-proxy runs in IPVS mode here: it creates an IPVS virtual service for each LoadBalancer IP (the same VIP:port entries this director programs, with other destinations) and puts those IPs on {KUBE_PROXY_INTERFACE}; the two rewrite each other's entries. Run the director on a host without kube-proxy's IPVS mode."
            )]
        } else {
            Vec::new()
        })
    }
}

#[cfg(target_os = "linux")]
impl Dataplane for Kernel {
    fn dump(&self, owned: &Owned) -> Result<Table, Error> {
        let mut ipvs = self.ipvs.lock().map_err(|_| Error::Poisoned)?;
        // Destinations of foreign services are never diffed: reading them would only cost a
        // kernel round trip per service.
        ipvs.dump_with_destinations_of(&|k: &ServiceKey| owned.owns(k))
            .map_err(|e| Error::Read(e.to_string()))
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error> {
        let mut ipvs = self.ipvs.lock().map_err(|_| Error::Poisoned)?;
        ipvs.service(key).map_err(|e| Error::Read(e.to_string()))
    }

    fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        let mut ipvs = self.ipvs.lock().map_err(|_| Error::Poisoned)?;
        let failures = ipvs
            .apply_each(ops)
            .map_err(|e| Error::Write(e.to_string()))?;
        if failures.is_empty() {
            return Ok(());
        }
        Err(Error::Apply {
            total: ops.len(),
            failures: failures
                .into_iter()
                .map(|(index, e)| OpFailure {
                    index,
                    message: e.to_string(),
                })
                .collect(),
        })
    }

    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        list_on(&self.vips, "")
    }

    fn add_address(&self, address: IpAddr) -> Result<(), Error> {
        self.change(&self.vips, Change::Add, address, "")
    }

    fn del_address(&self, address: IpAddr) -> Result<(), Error> {
        self.change(&self.vips, Change::Remove, address, "")
    }

    fn announces(&self) -> Announce {
        match &self.announce {
            None => Announce::None,
            Some(Channel::Routed(_)) => Announce::Bgp,
            Some(Channel::Segment(_)) => Announce::L2,
        }
    }

    fn announced(&self) -> Result<Option<BTreeSet<IpAddr>>, Error> {
        match &self.announce {
            None => Ok(None),
            Some(Channel::Routed(vips)) => list_on(vips, "announce interface: ").map(Some),
            // The segment's host addresses that are VIPs of this director (on its own
            // interface, or claimed by this process and perhaps removed from there since):
            // the others are the host's own, never touched.
            Some(Channel::Segment(segment)) => {
                let on = list_on(segment.addresses(), "l2 interface: ")?;
                let mut ours = self.addresses()?;
                ours.extend(segment.held());
                Ok(Some(on.intersection(&ours).copied().collect()))
            }
        }
    }

    fn announce(&self, address: IpAddr) -> Result<(), Error> {
        match &self.announce {
            None => Ok(()),
            Some(Channel::Routed(vips)) => self.change(vips, Change::Add, address, "announcing: "),
            Some(Channel::Segment(segment)) => {
                self.address_writes.fetch_add(1, Ordering::Relaxed);
                segment.claim(address).map_err(|message| Error::Address {
                    address: Some(address),
                    message: format!("announcing on the segment: {message}"),
                })
            }
        }
    }

    fn withdraw(&self, address: IpAddr) -> Result<(), Error> {
        match &self.announce {
            None => Ok(()),
            Some(Channel::Routed(vips)) => {
                self.change(vips, Change::Remove, address, "withdrawing: ")
            }
            Some(Channel::Segment(segment)) => {
                self.address_writes.fetch_add(1, Ordering::Relaxed);
                segment.release(address).map_err(|message| Error::Address {
                    address: Some(address),
                    message: format!("withdrawing from the segment: {message}"),
                })
            }
        }
    }

    fn hold_until(&self, until: Option<std::time::Instant>) {
        if let Some(Channel::Segment(segment)) = &self.announce {
            segment.hold_until(until);
        }
    }

    fn writes(&self) -> u64 {
        let ipvs = self.ipvs.lock().map(|i| i.writes()).unwrap_or(0);
        ipvs + self.address_writes.load(Ordering::Relaxed)
    }
}

/// Whether an address goes on an interface or off it.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Add,
    Remove,
}

#[cfg(target_os = "linux")]
impl Kernel {
    /// Puts `address` on or takes it off the interface of `vips`, counting the write; errors
    /// start with `what`.
    fn change(
        &self,
        vips: &Mutex<ipvslb_ipvs::netlink::Vips>,
        change: Change,
        address: IpAddr,
        what: &str,
    ) -> Result<(), Error> {
        let mut vips = vips.lock().map_err(|_| Error::Poisoned)?;
        self.address_writes.fetch_add(1, Ordering::Relaxed);
        let done = match change {
            Change::Add => vips.add(address),
            Change::Remove => vips.remove(address),
        };
        done.map(|_| ()).map_err(|e| Error::Address {
            address: Some(address),
            message: format!("{what}{e}"),
        })
    }
}

/// The addresses on the interface of `vips`; errors start with `what`.
#[cfg(target_os = "linux")]
fn list_on(
    vips: &Mutex<ipvslb_ipvs::netlink::Vips>,
    what: &str,
) -> Result<BTreeSet<IpAddr>, Error> {
    let mut vips = vips.lock().map_err(|_| Error::Poisoned)?;
    vips.list().map_err(|e| Error::Address {
        address: None,
        message: format!("{what}{e}"),
    })
}
