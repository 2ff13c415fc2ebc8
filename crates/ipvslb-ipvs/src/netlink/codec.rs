//! The IPVS generic netlink attributes, to and from the model. No socket here.
//!
//! Byte order is handled in this file only: ports are big endian on the wire, the IPv4 netmask is
//! a big-endian mask and the IPv6 one a prefix length, every other integer is in host order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::consts::*;
use crate::model::{
    Destination, Family, ForwardingMethod, Protocol, ServiceFlags, ServiceKey, Stats, SyncDaemon,
    SyncRole, VirtualService,
};

/// A reply the codec could not make sense of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// Netlink attributes and messages are aligned to 4 bytes.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Generic netlink requests written one after the other into one byte buffer, ready for one
/// `sendmsg`. Writing allocates nothing per message or attribute: a batch of 128 writes costs
/// one buffer, reused from batch to batch.
#[derive(Debug, Default, Clone)]
pub struct Requests {
    bytes: Vec<u8>,
}

impl Requests {
    /// An empty buffer with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    /// The requests written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes one request: a `nlmsghdr` of type `family` (with `NLM_F_REQUEST` added to
    /// `flags`), a `genlmsghdr` of `cmd`, then the attributes `body` writes.
    pub fn push(
        &mut self,
        family: u16,
        flags: u16,
        seq: u32,
        cmd: u8,
        version: u8,
        body: impl FnOnce(&mut AttrWriter<'_>),
    ) {
        let start = self.bytes.len();
        // `nlmsghdr` (its `nlmsg_len` set below, `nlmsg_pid` 0: the kernel fills it in), then
        // `genlmsghdr`, in one copy.
        let mut header = [0u8; NLMSG_HDRLEN + GENL_HDRLEN];
        header[4..6].copy_from_slice(&family.to_ne_bytes());
        header[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        header[8..12].copy_from_slice(&seq.to_ne_bytes());
        header[16] = cmd;
        header[17] = version;
        self.bytes.extend_from_slice(&header);
        body(&mut AttrWriter {
            bytes: &mut self.bytes,
        });
        let len = (self.bytes.len() - start) as u32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Writes attributes at the end of a [`Requests`] buffer.
#[derive(Debug)]
pub struct AttrWriter<'a> {
    bytes: &'a mut Vec<u8>,
}

impl AttrWriter<'_> {
    /// One attribute of type `kind` with `payload` as its bytes, padded to 4.
    pub fn put(&mut self, kind: u16, payload: &[u8]) {
        self.header(NLA_HDRLEN + payload.len(), kind);
        self.bytes.extend_from_slice(payload);
        self.pad();
    }

    /// A string attribute: `text` and a NUL.
    pub fn put_str(&mut self, kind: u16, text: &str) {
        self.header(NLA_HDRLEN + text.len() + 1, kind);
        self.bytes.extend_from_slice(text.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    /// An `nlattr` header, in one copy.
    fn header(&mut self, len: usize, kind: u16) {
        // Every attribute of IPVS is far below the 64 KiB an `nla_len` can say.
        let [l0, l1] = (len as u16).to_ne_bytes();
        let [k0, k1] = kind.to_ne_bytes();
        self.bytes.extend_from_slice(&[l0, l1, k0, k1]);
    }

    /// Zeros up to the next multiple of 4.
    fn pad(&mut self) {
        let len = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 3][..align(len) - len]);
    }

    /// An attribute of type `kind`, flagged nested, holding the attributes `children` writes.
    pub fn nested(&mut self, kind: u16, children: impl FnOnce(&mut AttrWriter<'_>)) {
        let start = self.bytes.len();
        self.header(0, kind | NLA_F_NESTED); // nla_len, set below
        children(&mut AttrWriter { bytes: self.bytes });
        let len = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One attribute, borrowed from the bytes it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Its type without the nested and byte-order bits.
    pub kind: u16,
    /// Its payload, without padding.
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The attributes nested in this one.
    pub fn children(&self) -> Attrs<'a> {
        attrs(self.payload)
    }
}

/// The attributes in `bytes` (the attributes of a message, or the payload of a nested
/// attribute), read in place: nothing is copied.
pub fn attrs(bytes: &[u8]) -> Attrs<'_> {
    Attrs { rest: bytes }
}

/// An iterator over attributes read in place; see [`attrs`].
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = self.rest.get(..NLA_HDRLEN);
        let len = header.map(|h| usize::from(u16::from_ne_bytes([h[0], h[1]])));
        let Some((header, len)) = header
            .zip(len)
            .filter(|(_, len)| (NLA_HDRLEN..=self.rest.len()).contains(len))
        else {
            let left = self.rest.len();
            self.rest = &[];
            return Some(Err(bad(format!(
                "a truncated attribute ({left} bytes left)"
            ))));
        };
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let payload = &self.rest[NLA_HDRLEN..len];
        self.rest = self.rest.get(align(len)..).unwrap_or_default();
        Some(Ok(Attr { kind, payload }))
    }
}

fn family_number(family: Family) -> u16 {
    match family {
        Family::Inet => AF_INET,
        Family::Inet6 => AF_INET6,
    }
}

fn family_of_number(af: u16) -> Result<Family, DecodeError> {
    match af {
        AF_INET => Ok(Family::Inet),
        AF_INET6 => Ok(Family::Inet6),
        other => Err(bad(format!("address family {other}"))),
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
fn addr_bytes(address: &IpAddr) -> [u8; 16] {
    let mut bytes = [0; 16];
    match address {
        IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => bytes = a.octets(),
    }
    bytes
}

fn addr_of_bytes(family: Family, bytes: &[u8]) -> Result<IpAddr, DecodeError> {
    match family {
        Family::Inet => {
            let octets: [u8; 4] = bytes
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(format!("IPv4 address of {} bytes", bytes.len())))?;
            Ok(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        Family::Inet6 => {
            let octets: [u8; 16] = bytes
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(format!("IPv6 address of {} bytes", bytes.len())))?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
    }
}

pub fn u16_of(bytes: &[u8], what: &str) -> Result<u16, DecodeError> {
    bytes
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| bad(format!("{what}: {} bytes", bytes.len())))
}

fn be16_of(bytes: &[u8], what: &str) -> Result<u16, DecodeError> {
    u16_of(bytes, what).map(u16::from_be)
}

pub fn u32_of(bytes: &[u8], what: &str) -> Result<u32, DecodeError> {
    bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| bad(format!("{what}: {} bytes", bytes.len())))
}

fn u64_of(bytes: &[u8], what: &str) -> Result<u64, DecodeError> {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .ok_or_else(|| bad(format!("{what}: {} bytes", bytes.len())))
}

/// `IPVS_SVC_ATTR_NETMASK` for a prefix length of `family`.
fn netmask_bytes(family: Family, prefix: u8) -> [u8; 4] {
    match family {
        Family::Inet => {
            let mask = match prefix {
                0 => 0,
                p => u32::MAX << (32 - u32::from(p.min(32))),
            };
            mask.to_be_bytes()
        }
        Family::Inet6 => u32::from(prefix).to_ne_bytes(),
    }
}

fn netmask_of_bytes(family: Family, bytes: &[u8]) -> Result<u8, DecodeError> {
    match family {
        Family::Inet => {
            let mask = u32::from_be(u32_of(bytes, "netmask")?);
            // Leading ones: a mask with holes cannot be set through this codec anyway.
            Ok(mask.leading_ones() as u8)
        }
        Family::Inet6 => {
            let prefix = u32_of(bytes, "netmask")?;
            u8::try_from(prefix).map_err(|_| bad(format!("IPv6 prefix length {prefix}")))
        }
    }
}

fn family_of_key(key: &ServiceKey) -> Family {
    match key {
        ServiceKey::Addr { address, .. } => Family::of(address),
        ServiceKey::FwMark { family, .. } => *family,
    }
}

/// The attributes naming a service: family and either protocol, address and port, or the mark.
fn put_service_key_attrs(w: &mut AttrWriter<'_>, key: &ServiceKey) {
    w.put(
        IPVS_SVC_ATTR_AF,
        &family_number(family_of_key(key)).to_ne_bytes(),
    );
    match key {
        ServiceKey::Addr {
            address,
            protocol,
            port,
        } => {
            w.put(IPVS_SVC_ATTR_PROTOCOL, &protocol.number().to_ne_bytes());
            w.put(IPVS_SVC_ATTR_ADDR, &addr_bytes(address));
            w.put(IPVS_SVC_ATTR_PORT, &port.to_be_bytes());
        }
        ServiceKey::FwMark { mark, .. } => {
            w.put(IPVS_SVC_ATTR_FWMARK, &mark.to_ne_bytes());
        }
    }
}

/// `IPVS_CMD_ATTR_SERVICE` naming `key` only.
pub fn put_service_key(w: &mut AttrWriter<'_>, key: &ServiceKey) {
    w.nested(IPVS_CMD_ATTR_SERVICE, |w| put_service_key_attrs(w, key));
}

/// `IPVS_CMD_ATTR_SERVICE` with every setting of `service`, as `NEW_SERVICE` and `SET_SERVICE`
/// need.
pub fn put_service(w: &mut AttrWriter<'_>, service: &VirtualService) {
    w.nested(IPVS_CMD_ATTR_SERVICE, |w| {
        put_service_key_attrs(w, &service.key);
        w.put_str(IPVS_SVC_ATTR_SCHED_NAME, service.scheduler.name());
        // `struct ip_vs_flags`: the flags, then the mask of those to set (all of them).
        let flags = service.flags.without(ServiceFlags::HASHED).0;
        let mut flags_bytes = [0u8; 8];
        flags_bytes[..4].copy_from_slice(&flags.to_ne_bytes());
        flags_bytes[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
        w.put(IPVS_SVC_ATTR_FLAGS, &flags_bytes);
        w.put(IPVS_SVC_ATTR_TIMEOUT, &service.timeout.to_ne_bytes());
        w.put(
            IPVS_SVC_ATTR_NETMASK,
            &netmask_bytes(family_of_key(&service.key), service.netmask),
        );
    });
}

/// `IPVS_CMD_ATTR_DAEMON` with `daemon`'s settings, as `NEW_DAEMON` needs them.
pub fn put_sync_daemon(w: &mut AttrWriter<'_>, daemon: &SyncDaemon) {
    w.nested(IPVS_CMD_ATTR_DAEMON, |w| {
        w.put(IPVS_DAEMON_ATTR_STATE, &daemon.role.value().to_ne_bytes());
        w.put_str(IPVS_DAEMON_ATTR_MCAST_IFN, &daemon.interface);
        w.put(
            IPVS_DAEMON_ATTR_SYNC_ID,
            &u32::from(daemon.sync_id).to_ne_bytes(),
        );
    });
}

/// `IPVS_CMD_ATTR_DAEMON` naming only `role`, as `DEL_DAEMON` needs it.
pub fn put_sync_role(w: &mut AttrWriter<'_>, role: SyncRole) {
    w.nested(IPVS_CMD_ATTR_DAEMON, |w| {
        w.put(IPVS_DAEMON_ATTR_STATE, &role.value().to_ne_bytes());
    });
}

/// A daemon of an `IPVS_CMD_GET_DAEMON` reply (the children of its `IPVS_CMD_ATTR_DAEMON`).
pub fn decode_sync_daemon(attrs: Attrs<'_>) -> Result<SyncDaemon, DecodeError> {
    let (mut role, mut interface, mut sync_id) = (None, None, None);
    for attr in attrs {
        let attr = attr?;
        match attr.kind {
            IPVS_DAEMON_ATTR_STATE => {
                let value = u32_of(attr.payload, "sync daemon state")?;
                role = Some(SyncRole::from_value(value).ok_or_else(|| {
                    DecodeError(format!(
                        "sync daemon state {value} is neither master nor backup"
                    ))
                })?);
            }
            IPVS_DAEMON_ATTR_MCAST_IFN => {
                let name = attr.payload.split(|b| *b == 0).next().unwrap_or_default();
                let name = std::str::from_utf8(name)
                    .map_err(|_| DecodeError("sync daemon interface is not UTF-8".to_owned()))?;
                interface = Some(name.to_owned());
            }
            IPVS_DAEMON_ATTR_SYNC_ID => {
                // The kernel stores 8 bits; it reports them in a u32.
                sync_id = Some(u32_of(attr.payload, "sync id")? as u8);
            }
            _ => {}
        }
    }
    match (role, interface, sync_id) {
        (Some(role), Some(interface), Some(sync_id)) => Ok(SyncDaemon {
            role,
            interface,
            sync_id,
        }),
        _ => Err(DecodeError(
            "a sync daemon without its state, interface or sync id".to_owned(),
        )),
    }
}

/// `IPVS_CMD_ATTR_DEST` with every setting of `dest`.
pub fn put_destination(w: &mut AttrWriter<'_>, dest: &Destination) {
    w.nested(IPVS_CMD_ATTR_DEST, |w| {
        w.put(
            IPVS_DEST_ATTR_ADDR_FAMILY,
            &family_number(Family::of(&dest.address)).to_ne_bytes(),
        );
        w.put(IPVS_DEST_ATTR_ADDR, &addr_bytes(&dest.address));
        w.put(IPVS_DEST_ATTR_PORT, &dest.port.to_be_bytes());
        w.put(
            IPVS_DEST_ATTR_FWD_METHOD,
            &dest.forwarding.value().to_ne_bytes(),
        );
        w.put(IPVS_DEST_ATTR_WEIGHT, &dest.weight.to_ne_bytes());
        w.put(IPVS_DEST_ATTR_U_THRESH, &dest.upper_threshold.to_ne_bytes());
        w.put(IPVS_DEST_ATTR_L_THRESH, &dest.lower_threshold.to_ne_bytes());
    });
}

/// A service as the kernel reports it (the payload of `IPVS_CMD_ATTR_SERVICE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedService {
    /// Its settings, [`ServiceFlags::HASHED`] removed.
    pub service: VirtualService,
    /// Its counters.
    pub stats: Stats,
    /// Attribute types this codec does not read (kept so that nothing vanishes unseen).
    pub unknown: Vec<u16>,
}

/// Reads a service from the attributes nested in `IPVS_CMD_ATTR_SERVICE`.
///
/// `Ok(None)` for a service the model cannot hold (a protocol other than TCP, UDP and SCTP).
pub fn decode_service(attrs: Attrs<'_>) -> Result<Option<DecodedService>, DecodeError> {
    let mut af = None;
    let mut protocol = None;
    let mut address = None;
    let mut port = 0;
    let mut mark = 0;
    let mut scheduler = None;
    let mut flags = 0;
    let mut timeout = 0;
    let mut netmask = None;
    let mut stats = Stats::default();
    let mut stats64 = None;
    let mut unknown = Vec::new();
    for a in attrs {
        let a = a?;
        let bytes = a.payload;
        match a.kind {
            IPVS_SVC_ATTR_AF => af = Some(family_of_number(u16_of(bytes, "af")?)?),
            IPVS_SVC_ATTR_PROTOCOL => protocol = Some(u16_of(bytes, "protocol")?),
            IPVS_SVC_ATTR_ADDR => address = Some(bytes),
            IPVS_SVC_ATTR_PORT => port = be16_of(bytes, "port")?,
            IPVS_SVC_ATTR_FWMARK => mark = u32_of(bytes, "fwmark")?,
            IPVS_SVC_ATTR_SCHED_NAME => {
                let name = bytes.split(|b| *b == 0).next().unwrap_or_default();
                let name = std::str::from_utf8(name).map_err(|_| bad("scheduler name"))?;
                scheduler = name.parse().ok();
            }
            IPVS_SVC_ATTR_FLAGS => flags = u32_of(bytes, "flags")?,
            IPVS_SVC_ATTR_TIMEOUT => timeout = u32_of(bytes, "timeout")?,
            IPVS_SVC_ATTR_NETMASK => netmask = Some(bytes),
            IPVS_SVC_ATTR_STATS => stats = decode_stats(a.children(), false)?,
            IPVS_SVC_ATTR_STATS64 => stats64 = Some(decode_stats(a.children(), true)?),
            IPVS_SVC_ATTR_PE_NAME => {}
            other => unknown.push(other),
        }
    }
    let family = af.ok_or_else(|| bad("service without IPVS_SVC_ATTR_AF"))?;
    let key = if mark != 0 {
        ServiceKey::FwMark { family, mark }
    } else {
        let number = protocol.ok_or_else(|| bad("service without protocol or fwmark"))?;
        let Some(protocol) = Protocol::from_number(number) else {
            return Ok(None);
        };
        let bytes = address.ok_or_else(|| bad("service without address"))?;
        ServiceKey::Addr {
            address: addr_of_bytes(family, bytes)?,
            protocol,
            port,
        }
    };
    let netmask = match netmask {
        Some(bytes) => netmask_of_bytes(family, bytes)?,
        None => match family {
            Family::Inet => 32,
            Family::Inet6 => 128,
        },
    };
    Ok(Some(DecodedService {
        service: VirtualService {
            key,
            scheduler: scheduler.ok_or_else(|| bad("service without scheduler"))?,
            flags: ServiceFlags(flags).without(ServiceFlags::HASHED),
            timeout,
            netmask,
        },
        stats: stats64.unwrap_or(stats),
        unknown,
    }))
}

/// Reads a destination from the attributes nested in `IPVS_CMD_ATTR_DEST`; `family` is the
/// service's, used when the kernel does not say the destination's own.
pub fn decode_destination(
    attrs: Attrs<'_>,
    family: Family,
) -> Result<(Destination, Stats), DecodeError> {
    let mut af = None;
    let mut address = None;
    let mut port = 0;
    let mut forwarding = 0;
    let mut weight = 0;
    let mut upper = 0;
    let mut lower = 0;
    let mut stats = Stats::default();
    let mut stats64 = None;
    let mut active = 0;
    let mut inactive = 0;
    for a in attrs {
        let a = a?;
        let bytes = a.payload;
        match a.kind {
            IPVS_DEST_ATTR_ADDR_FAMILY => af = Some(family_of_number(u16_of(bytes, "af")?)?),
            IPVS_DEST_ATTR_ADDR => address = Some(bytes),
            IPVS_DEST_ATTR_PORT => port = be16_of(bytes, "port")?,
            IPVS_DEST_ATTR_FWD_METHOD => forwarding = u32_of(bytes, "forwarding method")?,
            IPVS_DEST_ATTR_WEIGHT => weight = u32_of(bytes, "weight")?,
            IPVS_DEST_ATTR_U_THRESH => upper = u32_of(bytes, "upper threshold")?,
            IPVS_DEST_ATTR_L_THRESH => lower = u32_of(bytes, "lower threshold")?,
            IPVS_DEST_ATTR_ACTIVE_CONNS => active = u32_of(bytes, "active connections")?,
            IPVS_DEST_ATTR_INACT_CONNS => inactive = u32_of(bytes, "inactive connections")?,
            IPVS_DEST_ATTR_STATS => stats = decode_stats(a.children(), false)?,
            IPVS_DEST_ATTR_STATS64 => stats64 = Some(decode_stats(a.children(), true)?),
            _ => {}
        }
    }
    let family = af.unwrap_or(family);
    let bytes = address.ok_or_else(|| bad("destination without address"))?;
    let dest = Destination {
        address: addr_of_bytes(family, bytes)?,
        port,
        forwarding: ForwardingMethod::from_value(forwarding)
            .ok_or_else(|| bad(format!("forwarding method {forwarding}")))?,
        weight,
        upper_threshold: upper,
        lower_threshold: lower,
    };
    let mut stats = stats64.unwrap_or(stats);
    stats.active_connections = active;
    stats.inactive_connections = inactive;
    Ok((dest, stats))
}

fn decode_stats(attrs: Attrs<'_>, wide: bool) -> Result<Stats, DecodeError> {
    let mut stats = Stats::default();
    for a in attrs {
        let a = a?;
        let bytes = a.payload;
        let value = |what| {
            if wide {
                u64_of(bytes, what)
            } else {
                u32_of(bytes, what).map(u64::from)
            }
        };
        match a.kind {
            IPVS_STATS_ATTR_CONNS => stats.connections = value("connections")?,
            IPVS_STATS_ATTR_INPKTS => stats.in_packets = value("packets in")?,
            IPVS_STATS_ATTR_OUTPKTS => stats.out_packets = value("packets out")?,
            // Byte counters are 64 bits wide in both forms.
            IPVS_STATS_ATTR_INBYTES => stats.in_bytes = u64_of(bytes, "bytes in")?,
            IPVS_STATS_ATTR_OUTBYTES => stats.out_bytes = u64_of(bytes, "bytes out")?,
            _ => {}
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheduler;

    /// The bytes of the attributes `write` writes.
    fn written(write: impl FnOnce(&mut AttrWriter<'_>)) -> Vec<u8> {
        let mut bytes = Vec::new();
        write(&mut AttrWriter { bytes: &mut bytes });
        bytes
    }

    /// The one attribute of `bytes`, which must be nested, with its children read back.
    fn nested_children(bytes: &[u8]) -> Attrs<'_> {
        let flags = u16::from_ne_bytes([bytes[2], bytes[3]]);
        assert_ne!(flags & NLA_F_NESTED, 0, "not flagged nested");
        let mut all = attrs(bytes);
        let only = all.next().unwrap().unwrap();
        assert!(all.next().is_none());
        only.children()
    }

    fn round_trip_service(service: VirtualService) {
        let bytes = written(|w| put_service(w, &service));
        let decoded = decode_service(nested_children(&bytes)).unwrap().unwrap();
        assert_eq!(decoded.service, service);
        assert!(decoded.unknown.is_empty());
    }

    #[test]
    fn services_of_every_kind_survive_the_trip_through_bytes() {
        let v4: IpAddr = "10.240.0.10".parse().unwrap();
        let v6: IpAddr = "fd00:240::10".parse().unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            round_trip_service(VirtualService::new(
                ServiceKey::addr(v4, protocol, 80),
                Scheduler::Rr,
            ));
            round_trip_service(VirtualService::new(
                ServiceKey::addr(v6, protocol, 65535),
                Scheduler::Wlc,
            ));
        }
        round_trip_service(VirtualService::new(
            ServiceKey::FwMark {
                family: Family::Inet6,
                mark: 7,
            },
            Scheduler::Sh,
        ));
        round_trip_service(VirtualService {
            key: ServiceKey::addr(v4, Protocol::Tcp, 443),
            scheduler: Scheduler::Mh,
            flags: ServiceFlags::PERSISTENT
                .union(ServiceFlags::SCHED1)
                .union(ServiceFlags::SCHED2),
            timeout: 300,
            netmask: 24,
        });
        round_trip_service(VirtualService {
            netmask: 64,
            timeout: 60,
            flags: ServiceFlags::PERSISTENT,
            ..VirtualService::new(ServiceKey::addr(v6, Protocol::Udp, 53), Scheduler::Rr)
        });
    }

    #[test]
    fn ports_and_the_ipv4_netmask_are_big_endian_on_the_wire() {
        let service = VirtualService {
            netmask: 24,
            ..VirtualService::new(
                ServiceKey::addr("10.0.0.1".parse().unwrap(), Protocol::Tcp, 0x1234),
                Scheduler::Rr,
            )
        };
        let bytes = written(|w| put_service(w, &service));
        let payload = |k| {
            nested_children(&bytes)
                .map(Result::unwrap)
                .find(|a| a.kind == k)
                .map(|a| a.payload.to_vec())
                .unwrap()
        };
        assert_eq!(payload(IPVS_SVC_ATTR_PORT), vec![0x12, 0x34]);
        assert_eq!(payload(IPVS_SVC_ATTR_NETMASK), vec![255, 255, 255, 0]);
        assert_eq!(payload(IPVS_SVC_ATTR_ADDR)[..4], [10, 0, 0, 1]);
        assert_eq!(payload(IPVS_SVC_ATTR_SCHED_NAME), b"rr\0".to_vec());
        assert_eq!(
            payload(IPVS_SVC_ATTR_FLAGS),
            [0u32.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat()
        );
    }

    #[test]
    fn destinations_survive_the_trip_through_bytes() {
        for dest in [
            Destination::new(
                "192.168.1.7".parse().unwrap(),
                30080,
                ForwardingMethod::Masquerade,
                1,
            ),
            Destination {
                upper_threshold: 100,
                lower_threshold: 10,
                ..Destination::new(
                    "fd00::7".parse().unwrap(),
                    80,
                    ForwardingMethod::Route,
                    i32::MAX as u32,
                )
            },
            Destination::new("10.0.0.9".parse().unwrap(), 0, ForwardingMethod::Tunnel, 0),
        ] {
            let bytes = written(|w| put_destination(w, &dest));
            let (decoded, stats) =
                decode_destination(nested_children(&bytes), Family::of(&dest.address)).unwrap();
            assert_eq!(decoded, dest);
            assert_eq!(stats, Stats::default());
        }
    }

    #[test]
    fn sync_daemons_survive_the_trip_through_bytes_and_a_bad_state_is_refused() {
        for daemon in [
            SyncDaemon {
                role: SyncRole::Master,
                interface: "eth1".to_owned(),
                sync_id: 7,
            },
            SyncDaemon {
                role: SyncRole::Backup,
                interface: "bond0.100".to_owned(),
                sync_id: 255,
            },
        ] {
            let bytes = written(|w| put_sync_daemon(w, &daemon));
            assert_eq!(decode_sync_daemon(nested_children(&bytes)), Ok(daemon));
        }
        let only_role = written(|w| put_sync_role(w, SyncRole::Backup));
        assert!(decode_sync_daemon(nested_children(&only_role)).is_err());
        let bad = written(|w| {
            w.nested(IPVS_CMD_ATTR_DAEMON, |w| {
                w.put(IPVS_DAEMON_ATTR_STATE, &3u32.to_ne_bytes());
                w.put_str(IPVS_DAEMON_ATTR_MCAST_IFN, "eth1");
                w.put(IPVS_DAEMON_ATTR_SYNC_ID, &1u32.to_ne_bytes());
            })
        });
        let error = decode_sync_daemon(nested_children(&bad)).unwrap_err();
        assert!(error.0.contains("state 3"), "{error}");
    }

    #[test]
    fn a_request_is_framed_as_neli_reads_a_generic_netlink_message() {
        use neli::FromBytes;
        use neli::genl::Genlmsghdr;
        use neli::nl::{NlPayload, Nlmsghdr};

        let key = ServiceKey::addr("10.0.0.1".parse().unwrap(), Protocol::Udp, 53);
        let dest = Destination::new("10.0.0.2".parse().unwrap(), 53, ForwardingMethod::Route, 3);
        let mut requests = Requests::default();
        requests.push(0x25, NLM_F_ACK, 7, IPVS_CMD_NEW_DEST, 1, |w| {
            put_service_key(w, &key);
            put_destination(w, &dest);
        });
        requests.push(0x25, NLM_F_DUMP, 8, IPVS_CMD_GET_SERVICE, 1, |_| {});
        let bytes = requests.bytes();
        let mut cursor = std::io::Cursor::new(bytes);
        let first = Nlmsghdr::<u16, Genlmsghdr<u8, u16>>::from_bytes(&mut cursor).unwrap();
        assert_eq!(*first.nl_type(), 0x25);
        assert_eq!(*first.nl_seq(), 7);
        assert_eq!(u16::from(*first.nl_flags()), NLM_F_REQUEST | NLM_F_ACK);
        let NlPayload::Payload(genl) = first.nl_payload() else {
            panic!("no payload");
        };
        assert_eq!(*genl.cmd(), IPVS_CMD_NEW_DEST);
        let kinds: Vec<u16> = genl
            .attrs()
            .iter()
            .map(|a| *a.nla_type().nla_type())
            .collect();
        assert_eq!(kinds, [IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_DEST]);
        assert!(genl.attrs().iter().all(|a| *a.nla_type().nla_nested()));
        let second = Nlmsghdr::<u16, Genlmsghdr<u8, u16>>::from_bytes(&mut cursor).unwrap();
        assert_eq!(*second.nl_seq(), 8);
        assert_eq!(cursor.position() as usize, bytes.len());
    }

    #[test]
    fn the_hashed_flag_is_not_read_into_the_model() {
        let bytes = written(|w| {
            put_service_key_attrs(
                w,
                &ServiceKey::addr("10.0.0.1".parse().unwrap(), Protocol::Tcp, 80),
            );
            w.put(IPVS_SVC_ATTR_SCHED_NAME, b"wlc\0");
            w.put(
                IPVS_SVC_ATTR_FLAGS,
                &[
                    (IP_VS_SVC_F_HASHED | IP_VS_SVC_F_ONEPACKET).to_ne_bytes(),
                    u32::MAX.to_ne_bytes(),
                ]
                .concat(),
            );
            w.put(99, b"future");
        });
        let decoded = decode_service(attrs(&bytes)).unwrap().unwrap();
        assert_eq!(decoded.service.flags, ServiceFlags::ONEPACKET);
        assert_eq!(decoded.service.netmask, 32);
        assert_eq!(decoded.unknown, vec![99]);
    }

    #[test]
    fn truncated_attributes_are_errors_not_panics() {
        let bytes = written(|w| w.put(IPVS_SVC_ATTR_AF, &[2]));
        assert!(decode_service(attrs(&bytes)).is_err());
        let bytes = written(|w| w.put(IPVS_DEST_ATTR_ADDR, &[10, 0]));
        assert!(decode_destination(attrs(&bytes), Family::Inet).is_err());
        // An attribute claiming more bytes than there are, and a stray byte after the last.
        let mut bytes = written(|w| w.put(IPVS_SVC_ATTR_PORT, &[0, 80]));
        bytes[0] = 200;
        assert!(attrs(&bytes).any(|a| a.is_err()));
        let mut bytes = written(|w| w.put(IPVS_SVC_ATTR_PORT, &[0, 80]));
        bytes.push(1);
        assert!(attrs(&bytes).any(|a| a.is_err()));
    }

    #[test]
    fn a_service_of_a_protocol_the_model_lacks_is_skipped() {
        let bytes = written(|w| {
            w.put(IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
            w.put(IPVS_SVC_ATTR_PROTOCOL, &51u16.to_ne_bytes());
            w.put(IPVS_SVC_ATTR_ADDR, &[10, 0, 0, 1]);
            w.put(IPVS_SVC_ATTR_SCHED_NAME, b"rr\0");
        });
        assert_eq!(decode_service(attrs(&bytes)).unwrap(), None);
    }
}
