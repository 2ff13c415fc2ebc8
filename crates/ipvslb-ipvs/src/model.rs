//! The IPVS table as plain data. Names follow `include/uapi/linux/ip_vs.h`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::consts;

/// Transport protocol of a virtual service (`IPVS_SVC_ATTR_PROTOCOL`, an `IPPROTO_*` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// `IPPROTO_TCP`
    Tcp,
    /// `IPPROTO_UDP`
    Udp,
    /// `IPPROTO_SCTP`
    Sctp,
}

impl Protocol {
    /// The kernel's `IPPROTO_*` number.
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => consts::IPPROTO_TCP,
            Protocol::Udp => consts::IPPROTO_UDP,
            Protocol::Sctp => consts::IPPROTO_SCTP,
        }
    }

    /// The protocol for an `IPPROTO_*` number, if IPVS supports it.
    pub fn from_number(n: u16) -> Option<Self> {
        match n {
            consts::IPPROTO_TCP => Some(Protocol::Tcp),
            consts::IPPROTO_UDP => Some(Protocol::Udp),
            consts::IPPROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Address family of a firewall-mark service (`IPVS_SVC_ATTR_AF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    /// `AF_INET`
    Inet,
    /// `AF_INET6`
    Inet6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Inet,
            IpAddr::V6(_) => Family::Inet6,
        }
    }
}

/// What identifies a virtual service in the kernel: either `address:port` for one protocol, or a
/// firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServiceKey {
    /// A service on `address:port` for `protocol`.
    Addr {
        /// The virtual address (the VIP).
        address: IpAddr,
        /// The transport protocol.
        protocol: Protocol,
        /// The virtual port.
        port: u16,
    },
    /// A service matching packets with firewall mark `mark` (`IPVS_SVC_ATTR_FWMARK`).
    FwMark {
        /// The address family of the service.
        family: Family,
        /// The firewall mark.
        mark: u32,
    },
}

impl ServiceKey {
    /// Shorthand for an address service key.
    pub fn addr(address: IpAddr, protocol: Protocol, port: u16) -> Self {
        ServiceKey::Addr {
            address,
            protocol,
            port,
        }
    }

    /// The virtual address, for address services.
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            ServiceKey::Addr { address, .. } => Some(*address),
            ServiceKey::FwMark { .. } => None,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Addr {
                address,
                protocol,
                port,
            } => write!(f, "{protocol} {}", SocketDisplay(*address, *port)),
            ServiceKey::FwMark { family, mark } => match family {
                Family::Inet => write!(f, "FWM {mark}"),
                Family::Inet6 => write!(f, "FWM {mark} IPv6"),
            },
        }
    }
}

/// `address:port`, with IPv6 addresses in brackets as `ipvsadm -L -n` prints them.
#[derive(Debug, Clone, Copy)]
pub struct SocketDisplay(pub IpAddr, pub u16);

impl fmt::Display for SocketDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// A scheduling algorithm (`IPVS_SVC_ATTR_SCHED_NAME`); each lives in a kernel module `ip_vs_<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connection.
    Lc,
    /// Weighted least connection (the kernel's default).
    Wlc,
    /// Locality-based least connection.
    Lblc,
    /// Locality-based least connection with replication.
    Lblcr,
    /// Destination hashing.
    Dh,
    /// Source hashing.
    Sh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Weighted failover.
    Fo,
    /// Weighted overflow.
    Ovf,
    /// Maglev hashing.
    Mh,
    /// Twos (random of two) — present in newer kernels.
    Twos,
    /// A scheduler this library does not know by name, kept as the kernel reported it.
    #[serde(untagged)]
    Other(String),
}

impl Scheduler {
    /// The name the kernel uses (`ip_vs_<name>` is its module).
    pub fn name(&self) -> &str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Lblc => "lblc",
            Scheduler::Lblcr => "lblcr",
            Scheduler::Dh => "dh",
            Scheduler::Sh => "sh",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
            Scheduler::Fo => "fo",
            Scheduler::Ovf => "ovf",
            Scheduler::Mh => "mh",
            Scheduler::Twos => "twos",
            Scheduler::Other(name) => name,
        }
    }

    /// Whether the scheduler builds its lookup table by walking the service's destination list
    /// in order (`mh`, `sh`, `dh`): then two directors with the same destinations choose the
    /// same one for a flow only if their lists are in the same order. The kernel adds each
    /// destination at the head of the list, so the order is the history of additions.
    pub fn depends_on_list_order(&self) -> bool {
        matches!(self, Scheduler::Mh | Scheduler::Sh | Scheduler::Dh)
    }

    /// Every scheduler known by name.
    pub const KNOWN: [Scheduler; 14] = [
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Lblc,
        Scheduler::Lblcr,
        Scheduler::Dh,
        Scheduler::Sh,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Fo,
        Scheduler::Ovf,
        Scheduler::Mh,
        Scheduler::Twos,
    ];
}

impl FromStr for Scheduler {
    type Err = std::convert::Infallible;

    /// Never fails: an unknown name becomes [`Scheduler::Other`], as a kernel dump may hold one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Scheduler::KNOWN
            .iter()
            .find(|k| k.name() == s)
            .cloned()
            .unwrap_or_else(|| Scheduler::Other(s.to_owned())))
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Service flags (`IPVS_SVC_ATTR_FLAGS`, the `IP_VS_SVC_F_*` bits).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// `IP_VS_SVC_F_PERSISTENT`: persistent port (set by the kernel when a timeout is given).
    pub const PERSISTENT: Self = Self(consts::IP_VS_SVC_F_PERSISTENT);
    /// `IP_VS_SVC_F_HASHED`: set by the kernel on every hashed service; never part of a desired table.
    pub const HASHED: Self = Self(consts::IP_VS_SVC_F_HASHED);
    /// `IP_VS_SVC_F_ONEPACKET`: schedule each UDP datagram on its own.
    pub const ONEPACKET: Self = Self(consts::IP_VS_SVC_F_ONEPACKET);
    /// `IP_VS_SVC_F_SCHED1`: `sh-fallback` for `sh`, `mh-fallback` for `mh`.
    pub const SCHED1: Self = Self(consts::IP_VS_SVC_F_SCHED1);
    /// `IP_VS_SVC_F_SCHED2`: `sh-port` for `sh`, `mh-port` for `mh`.
    pub const SCHED2: Self = Self(consts::IP_VS_SVC_F_SCHED2);
    /// `IP_VS_SVC_F_SCHED3`.
    pub const SCHED3: Self = Self(consts::IP_VS_SVC_F_SCHED3);

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Whether all bits of `other` are set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of bits.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The flags with `other`'s bits cleared.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

/// A virtual service: its key and the settings the kernel stores for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualService {
    /// What identifies it.
    pub key: ServiceKey,
    /// The scheduling algorithm.
    pub scheduler: Scheduler,
    /// `IP_VS_SVC_F_*` flags, without [`ServiceFlags::HASHED`] (kernel bookkeeping).
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds; `0` means not persistent.
    pub timeout: u32,
    /// Persistence netmask (`IPVS_SVC_ATTR_NETMASK`): a prefix length, 32 or 128 for none.
    pub netmask: u8,
}

impl VirtualService {
    /// A non-persistent service with `scheduler` and no flags.
    pub fn new(key: ServiceKey, scheduler: Scheduler) -> Self {
        let netmask = match key {
            ServiceKey::Addr { address, .. } => host_prefix(&address),
            ServiceKey::FwMark {
                family: Family::Inet,
                ..
            } => 32,
            ServiceKey::FwMark {
                family: Family::Inet6,
                ..
            } => 128,
        };
        Self {
            key,
            scheduler,
            flags: ServiceFlags::empty(),
            timeout: 0,
            netmask,
        }
    }
}

/// The prefix length of a single host of `address`'s family.
pub fn host_prefix(address: &IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// How packets reach a destination (`IPVS_DEST_ATTR_FWD_METHOD`, the `IP_VS_CONN_F_*` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ForwardingMethod {
    /// `IP_VS_CONN_F_MASQ`: NAT; the destination port may differ from the virtual port.
    Masquerade,
    /// `IP_VS_CONN_F_LOCALNODE`: delivered to the director itself.
    Local,
    /// `IP_VS_CONN_F_TUNNEL`: IP-in-IP encapsulation.
    Tunnel,
    /// `IP_VS_CONN_F_DROUTE`: direct routing (LVS-DR); the destination accepts the VIP itself.
    Route,
    /// `IP_VS_CONN_F_BYPASS`: cache-cluster bypass.
    Bypass,
}

impl ForwardingMethod {
    /// The kernel value.
    pub fn value(self) -> u32 {
        match self {
            ForwardingMethod::Masquerade => consts::IP_VS_CONN_F_MASQ,
            ForwardingMethod::Local => consts::IP_VS_CONN_F_LOCALNODE,
            ForwardingMethod::Tunnel => consts::IP_VS_CONN_F_TUNNEL,
            ForwardingMethod::Route => consts::IP_VS_CONN_F_DROUTE,
            ForwardingMethod::Bypass => consts::IP_VS_CONN_F_BYPASS,
        }
    }

    /// The method for a kernel value (only the `IP_VS_CONN_F_FWD_MASK` bits are looked at).
    pub fn from_value(v: u32) -> Option<Self> {
        match v & consts::IP_VS_CONN_F_FWD_MASK {
            consts::IP_VS_CONN_F_MASQ => Some(ForwardingMethod::Masquerade),
            consts::IP_VS_CONN_F_LOCALNODE => Some(ForwardingMethod::Local),
            consts::IP_VS_CONN_F_TUNNEL => Some(ForwardingMethod::Tunnel),
            consts::IP_VS_CONN_F_DROUTE => Some(ForwardingMethod::Route),
            consts::IP_VS_CONN_F_BYPASS => Some(ForwardingMethod::Bypass),
            _ => None,
        }
    }

    /// The name `ipvsadm -L -n` prints in its `Forward` column.
    pub fn ipvsadm_name(self) -> &'static str {
        match self {
            ForwardingMethod::Masquerade => "Masq",
            ForwardingMethod::Local => "Local",
            ForwardingMethod::Tunnel => "Tunnel",
            ForwardingMethod::Route => "Route",
            ForwardingMethod::Bypass => "Bypass",
        }
    }
}

impl fmt::Display for ForwardingMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ipvsadm_name())
    }
}

/// What identifies a destination within its virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DestKey {
    /// The real server's address.
    pub address: IpAddr,
    /// The real server's port.
    pub port: u16,
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketDisplay(self.address, self.port).fmt(f)
    }
}

/// A destination (real server) of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// The real server's address.
    pub address: IpAddr,
    /// The real server's port.
    pub port: u16,
    /// How packets reach it.
    pub forwarding: ForwardingMethod,
    /// Its weight; `0` takes no new connections (draining). The kernel stores a `u32`.
    pub weight: u32,
    /// Upper connection threshold (`0`: none).
    pub upper_threshold: u32,
    /// Lower connection threshold (`0`: none).
    pub lower_threshold: u32,
}

impl Destination {
    /// A destination with `weight` and no thresholds.
    pub fn new(address: IpAddr, port: u16, forwarding: ForwardingMethod, weight: u32) -> Self {
        Self {
            address,
            port,
            forwarding,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }

    /// Its key within the service.
    pub fn key(&self) -> DestKey {
        DestKey {
            address: self.address,
            port: self.port,
        }
    }
}

/// Counters the kernel keeps for a service or destination. Kept for metrics; never compared by
/// [`crate::diff`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Connections scheduled.
    pub connections: u64,
    /// Packets in.
    pub in_packets: u64,
    /// Packets out.
    pub out_packets: u64,
    /// Bytes in.
    pub in_bytes: u64,
    /// Bytes out.
    pub out_bytes: u64,
    /// Active connections (destinations only).
    pub active_connections: u32,
    /// Inactive connections (destinations only).
    pub inactive_connections: u32,
}

/// The order of a service's destinations in the kernel's list (`svc->destinations`), head
/// first: the order the `mh`, `sh` and `dh` schedulers build their tables from, and the order
/// of a dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ListOrder {
    /// The order ipvslb gives a new service: destinations added in ascending key order, each at
    /// the head, so the list runs in descending key order from its head.
    #[default]
    Canonical,
    /// As the kernel listed them, or as an in-memory table's history left them.
    Listed(Vec<DestKey>),
}

/// A virtual service with its destinations.
// Equality leaves out `order`: two tables are the same when they hold the same settings, as
// far as every scheduler but the order-dependent ones is concerned; [`ServiceEntry::list_order`]
// is compared where the order matters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The service's settings.
    pub service: VirtualService,
    /// Its destinations, by key.
    pub destinations: BTreeMap<DestKey, Destination>,
    /// The service's counters, when the table was read from the kernel.
    // Counters live beside the settings, not inside them, so that operations and comparisons of
    // settings never carry values that change with every packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Counters per destination, when the table was read from the kernel; a destination without
    /// an entry here counts as all zeros.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destination_stats: BTreeMap<DestKey, Stats>,
    /// The order of `destinations` in the kernel's list.
    #[serde(skip)]
    pub order: ListOrder,
}

impl PartialEq for ServiceEntry {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && self.destinations == other.destinations
            && self.stats == other.stats
            && self.destination_stats == other.destination_stats
    }
}

impl Eq for ServiceEntry {}

impl ServiceEntry {
    /// `service` without destinations and without counters.
    pub fn new(service: VirtualService) -> Self {
        Self {
            service,
            destinations: BTreeMap::new(),
            stats: None,
            destination_stats: BTreeMap::new(),
            order: ListOrder::Canonical,
        }
    }

    /// The destinations' keys in the kernel's list order, head first.
    pub fn list_order(&self) -> Vec<DestKey> {
        match &self.order {
            ListOrder::Canonical => self.destinations.keys().rev().copied().collect(),
            // A key listed but not held, or held but not listed, cannot come from the kernel;
            // the order is still one of exactly the held keys, the unlisted ones first.
            ListOrder::Listed(keys) => {
                let listed: std::collections::BTreeSet<&DestKey> = keys.iter().collect();
                let unlisted = self
                    .destinations
                    .keys()
                    .rev()
                    .filter(|k| !listed.contains(k));
                unlisted
                    .chain(keys.iter().filter(|k| self.destinations.contains_key(k)))
                    .copied()
                    .collect()
            }
        }
    }

    /// Whether the list is in the order ipvslb gives it: descending by key from the head.
    pub fn in_canonical_order(&self) -> bool {
        match &self.order {
            ListOrder::Canonical => true,
            ListOrder::Listed(_) => self.list_order().windows(2).all(|w| w[0] > w[1]),
        }
    }
}

/// A whole IPVS table: the services, ordered by key, each with its destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// The services by key.
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) `service` with `destinations`.
    pub fn insert(
        &mut self,
        service: VirtualService,
        destinations: impl IntoIterator<Item = Destination>,
    ) {
        let mut entry = ServiceEntry::new(service);
        entry.destinations = destinations.into_iter().map(|d| (d.key(), d)).collect();
        self.services.insert(entry.service.key, entry);
    }

    /// The number of virtual services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The number of destinations over all services.
    pub fn destination_count(&self) -> usize {
        self.services.values().map(|e| e.destinations.len()).sum()
    }
}

/// What a connection synchronisation daemon does (`IPVS_DAEMON_ATTR_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SyncRole {
    /// `IP_VS_STATE_MASTER`: multicasts this director's connections.
    Master,
    /// `IP_VS_STATE_BACKUP`: takes in the connections other directors multicast.
    Backup,
}

impl SyncRole {
    /// The kernel value.
    pub fn value(self) -> u32 {
        match self {
            SyncRole::Master => consts::IP_VS_STATE_MASTER,
            SyncRole::Backup => consts::IP_VS_STATE_BACKUP,
        }
    }

    /// The role of a kernel value.
    pub fn from_value(value: u32) -> Option<Self> {
        match value {
            consts::IP_VS_STATE_MASTER => Some(SyncRole::Master),
            consts::IP_VS_STATE_BACKUP => Some(SyncRole::Backup),
            _ => None,
        }
    }
}

impl fmt::Display for SyncRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncRole::Master => "master",
            SyncRole::Backup => "backup",
        })
    }
}

/// An IPVS connection synchronisation daemon: the kernel's own, started and stopped over
/// netlink. Directors that share a sync id and a segment hand each other their connections, so
/// a flow that moves to another director finds its connection already there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SyncDaemon {
    /// Whether it sends or receives.
    pub role: SyncRole,
    /// The interface it multicasts on or listens on (`IPVS_DAEMON_ATTR_MCAST_IFN`).
    pub interface: String,
    /// Which group of directors it belongs to (`IPVS_DAEMON_ATTR_SYNC_ID`; the kernel keeps
    /// 8 bits).
    pub sync_id: u8,
}

impl fmt::Display for SyncDaemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sync daemon on {} (sync id {})",
            self.role, self.interface, self.sync_id
        )
    }
}
