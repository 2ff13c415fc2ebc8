//! The IPVS generic netlink attributes, to and from the model. No socket here.
//!
//! Byte order is handled in this file only: ports are big endian on the wire, the IPv4 netmask is
//! a big-endian mask and the IPv6 one a prefix length, every other integer is in host order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use neli::attr::Attribute;
use neli::genl::{AttrTypeBuilder, Nlattr, NlattrBuilder};
use neli::types::{Buffer, GenlBuffer};

use crate::consts::*;
use crate::model::{
    Destination, Family, ForwardingMethod, Protocol, ServiceFlags, ServiceKey, Stats,
    VirtualService,
};

/// A reply the codec could not make sense of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// Attributes as the kernel nests them.
pub type Attrs = GenlBuffer<u16, Buffer>;

/// One attribute with `payload` as its bytes.
pub fn attr(kind: u16, payload: &[u8]) -> Result<Nlattr<u16, Buffer>, DecodeError> {
    let nla_type = AttrTypeBuilder::default()
        .nla_type(kind)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    NlattrBuilder::default()
        .nla_type(nla_type)
        .nla_payload(Buffer::from(payload))
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// An attribute holding `children`, flagged nested.
pub fn nested(kind: u16, children: &Attrs) -> Result<Nlattr<u16, Buffer>, DecodeError> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    neli::ToBytes::to_bytes(children, &mut bytes).map_err(|e| bad(e.to_string()))?;
    let nla_type = AttrTypeBuilder::default()
        .nla_type(kind)
        .nla_nested(true)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    NlattrBuilder::default()
        .nla_type(nla_type)
        .nla_payload(Buffer::from(bytes.into_inner()))
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// The attributes nested in `attr`.
pub fn children(attr: &Nlattr<u16, Buffer>) -> Result<Attrs, DecodeError> {
    let payload = attr.payload().as_ref();
    neli::FromBytesWithInput::from_bytes_with_input(
        &mut std::io::Cursor::new(payload),
        payload.len(),
    )
    .map_err(|e| bad(format!("nested attribute {}: {e}", kind(attr))))
}

/// An attribute's type without the nested and byte-order bits.
pub fn kind(attr: &Nlattr<u16, Buffer>) -> u16 {
    *attr.nla_type().nla_type()
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

fn u32_of(bytes: &[u8], what: &str) -> Result<u32, DecodeError> {
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
pub fn service_key_attrs(key: &ServiceKey) -> Result<Attrs, DecodeError> {
    let mut attrs = Attrs::new();
    attrs.push(attr(
        IPVS_SVC_ATTR_AF,
        &family_number(family_of_key(key)).to_ne_bytes(),
    )?);
    match key {
        ServiceKey::Addr {
            address,
            protocol,
            port,
        } => {
            attrs.push(attr(
                IPVS_SVC_ATTR_PROTOCOL,
                &protocol.number().to_ne_bytes(),
            )?);
            attrs.push(attr(IPVS_SVC_ATTR_ADDR, &addr_bytes(address))?);
            attrs.push(attr(IPVS_SVC_ATTR_PORT, &port.to_be_bytes())?);
        }
        ServiceKey::FwMark { mark, .. } => {
            attrs.push(attr(IPVS_SVC_ATTR_FWMARK, &mark.to_ne_bytes())?);
        }
    }
    Ok(attrs)
}

/// `IPVS_CMD_ATTR_SERVICE` naming `key` only.
pub fn service_key(key: &ServiceKey) -> Result<Nlattr<u16, Buffer>, DecodeError> {
    nested(IPVS_CMD_ATTR_SERVICE, &service_key_attrs(key)?)
}

/// `IPVS_CMD_ATTR_SERVICE` with every setting of `service`, as `NEW_SERVICE` and `SET_SERVICE`
/// need.
pub fn service(service: &VirtualService) -> Result<Nlattr<u16, Buffer>, DecodeError> {
    let mut attrs = service_key_attrs(&service.key)?;
    let mut name = service.scheduler.name().as_bytes().to_vec();
    name.push(0);
    attrs.push(attr(IPVS_SVC_ATTR_SCHED_NAME, &name)?);
    let flags = service.flags.without(ServiceFlags::HASHED).0;
    let mut flags_bytes = flags.to_ne_bytes().to_vec();
    flags_bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
    attrs.push(attr(IPVS_SVC_ATTR_FLAGS, &flags_bytes)?);
    attrs.push(attr(IPVS_SVC_ATTR_TIMEOUT, &service.timeout.to_ne_bytes())?);
    attrs.push(attr(
        IPVS_SVC_ATTR_NETMASK,
        &netmask_bytes(family_of_key(&service.key), service.netmask),
    )?);
    nested(IPVS_CMD_ATTR_SERVICE, &attrs)
}

/// `IPVS_CMD_ATTR_DEST` with every setting of `dest`.
pub fn destination(dest: &Destination) -> Result<Nlattr<u16, Buffer>, DecodeError> {
    let mut attrs = Attrs::new();
    attrs.push(attr(
        IPVS_DEST_ATTR_ADDR_FAMILY,
        &family_number(Family::of(&dest.address)).to_ne_bytes(),
    )?);
    attrs.push(attr(IPVS_DEST_ATTR_ADDR, &addr_bytes(&dest.address))?);
    attrs.push(attr(IPVS_DEST_ATTR_PORT, &dest.port.to_be_bytes())?);
    attrs.push(attr(
        IPVS_DEST_ATTR_FWD_METHOD,
        &dest.forwarding.value().to_ne_bytes(),
    )?);
    attrs.push(attr(IPVS_DEST_ATTR_WEIGHT, &dest.weight.to_ne_bytes())?);
    attrs.push(attr(
        IPVS_DEST_ATTR_U_THRESH,
        &dest.upper_threshold.to_ne_bytes(),
    )?);
    attrs.push(attr(
        IPVS_DEST_ATTR_L_THRESH,
        &dest.lower_threshold.to_ne_bytes(),
    )?);
    nested(IPVS_CMD_ATTR_DEST, &attrs)
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
pub fn decode_service(attrs: &Attrs) -> Result<Option<DecodedService>, DecodeError> {
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
    for a in attrs.iter() {
        let bytes = a.payload().as_ref();
        match kind(a) {
            IPVS_SVC_ATTR_AF => af = Some(family_of_number(u16_of(bytes, "af")?)?),
            IPVS_SVC_ATTR_PROTOCOL => protocol = Some(u16_of(bytes, "protocol")?),
            IPVS_SVC_ATTR_ADDR => address = Some(bytes.to_vec()),
            IPVS_SVC_ATTR_PORT => port = be16_of(bytes, "port")?,
            IPVS_SVC_ATTR_FWMARK => mark = u32_of(bytes, "fwmark")?,
            IPVS_SVC_ATTR_SCHED_NAME => {
                let name = bytes.split(|b| *b == 0).next().unwrap_or_default();
                let name = std::str::from_utf8(name).map_err(|_| bad("scheduler name"))?;
                scheduler = name.parse().ok();
            }
            IPVS_SVC_ATTR_FLAGS => flags = u32_of(bytes, "flags")?,
            IPVS_SVC_ATTR_TIMEOUT => timeout = u32_of(bytes, "timeout")?,
            IPVS_SVC_ATTR_NETMASK => netmask = Some(bytes.to_vec()),
            IPVS_SVC_ATTR_STATS => stats = decode_stats(&children(a)?, false)?,
            IPVS_SVC_ATTR_STATS64 => stats64 = Some(decode_stats(&children(a)?, true)?),
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
            address: addr_of_bytes(family, &bytes)?,
            protocol,
            port,
        }
    };
    let netmask = match netmask {
        Some(bytes) => netmask_of_bytes(family, &bytes)?,
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
    attrs: &Attrs,
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
    for a in attrs.iter() {
        let bytes = a.payload().as_ref();
        match kind(a) {
            IPVS_DEST_ATTR_ADDR_FAMILY => af = Some(family_of_number(u16_of(bytes, "af")?)?),
            IPVS_DEST_ATTR_ADDR => address = Some(bytes.to_vec()),
            IPVS_DEST_ATTR_PORT => port = be16_of(bytes, "port")?,
            IPVS_DEST_ATTR_FWD_METHOD => forwarding = u32_of(bytes, "forwarding method")?,
            IPVS_DEST_ATTR_WEIGHT => weight = u32_of(bytes, "weight")?,
            IPVS_DEST_ATTR_U_THRESH => upper = u32_of(bytes, "upper threshold")?,
            IPVS_DEST_ATTR_L_THRESH => lower = u32_of(bytes, "lower threshold")?,
            IPVS_DEST_ATTR_ACTIVE_CONNS => active = u32_of(bytes, "active connections")?,
            IPVS_DEST_ATTR_INACT_CONNS => inactive = u32_of(bytes, "inactive connections")?,
            IPVS_DEST_ATTR_STATS => stats = decode_stats(&children(a)?, false)?,
            IPVS_DEST_ATTR_STATS64 => stats64 = Some(decode_stats(&children(a)?, true)?),
            _ => {}
        }
    }
    let family = af.unwrap_or(family);
    let bytes = address.ok_or_else(|| bad("destination without address"))?;
    let dest = Destination {
        address: addr_of_bytes(family, &bytes)?,
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

fn decode_stats(attrs: &Attrs, wide: bool) -> Result<Stats, DecodeError> {
    let mut stats = Stats::default();
    for a in attrs.iter() {
        let bytes = a.payload().as_ref();
        let value = |what| {
            if wide {
                u64_of(bytes, what)
            } else {
                u32_of(bytes, what).map(u64::from)
            }
        };
        match kind(a) {
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

    /// Serializes `attr` and reads its nested attributes back from the bytes alone.
    fn through_bytes(attr: &Nlattr<u16, Buffer>) -> Attrs {
        let mut bytes = std::io::Cursor::new(Vec::new());
        neli::ToBytes::to_bytes(attr, &mut bytes).unwrap();
        let bytes = bytes.into_inner();
        let parsed: Nlattr<u16, Buffer> =
            neli::FromBytes::from_bytes(&mut std::io::Cursor::new(&bytes[..])).unwrap();
        assert!(parsed.nla_type().nla_nested());
        children(&parsed).unwrap()
    }

    fn round_trip_service(service: VirtualService) {
        let attrs = through_bytes(&super::service(&service).unwrap());
        let decoded = decode_service(&attrs).unwrap().unwrap();
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
        let attrs = through_bytes(&super::service(&service).unwrap());
        let payload = |k| {
            attrs
                .iter()
                .find(|a| kind(a) == k)
                .map(|a| a.payload().as_ref().to_vec())
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
            let attrs = through_bytes(&destination(&dest).unwrap());
            let (decoded, stats) = decode_destination(&attrs, Family::of(&dest.address)).unwrap();
            assert_eq!(decoded, dest);
            assert_eq!(stats, Stats::default());
        }
    }

    #[test]
    fn the_hashed_flag_is_not_read_into_the_model() {
        let mut attrs = service_key_attrs(&ServiceKey::addr(
            "10.0.0.1".parse().unwrap(),
            Protocol::Tcp,
            80,
        ))
        .unwrap();
        attrs.push(attr(IPVS_SVC_ATTR_SCHED_NAME, b"wlc\0").unwrap());
        attrs.push(
            attr(
                IPVS_SVC_ATTR_FLAGS,
                &[
                    (IP_VS_SVC_F_HASHED | IP_VS_SVC_F_ONEPACKET).to_ne_bytes(),
                    u32::MAX.to_ne_bytes(),
                ]
                .concat(),
            )
            .unwrap(),
        );
        attrs.push(attr(99, b"future").unwrap());
        let decoded = decode_service(&attrs).unwrap().unwrap();
        assert_eq!(decoded.service.flags, ServiceFlags::ONEPACKET);
        assert_eq!(decoded.service.netmask, 32);
        assert_eq!(decoded.unknown, vec![99]);
    }

    #[test]
    fn truncated_attributes_are_errors_not_panics() {
        let mut attrs = Attrs::new();
        attrs.push(attr(IPVS_SVC_ATTR_AF, &[2]).unwrap());
        assert!(decode_service(&attrs).is_err());
        let mut attrs = Attrs::new();
        attrs.push(attr(IPVS_DEST_ATTR_ADDR, &[10, 0]).unwrap());
        assert!(decode_destination(&attrs, Family::Inet).is_err());
    }

    #[test]
    fn a_service_of_a_protocol_the_model_lacks_is_skipped() {
        let mut attrs = Attrs::new();
        attrs.push(attr(IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes()).unwrap());
        attrs.push(attr(IPVS_SVC_ATTR_PROTOCOL, &51u16.to_ne_bytes()).unwrap());
        attrs.push(attr(IPVS_SVC_ATTR_ADDR, &[10, 0, 0, 1]).unwrap());
        attrs.push(attr(IPVS_SVC_ATTR_SCHED_NAME, b"rr\0").unwrap());
        assert_eq!(decode_service(&attrs).unwrap(), None);
    }
}
