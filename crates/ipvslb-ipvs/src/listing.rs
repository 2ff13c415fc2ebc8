//! A table printed exactly as `ipvsadm -L -n` prints the kernel's, so that the two can be
//! compared byte for byte and read by people who know that layout.

use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    DestKey, Family, ServiceEntry, ServiceFlags, ServiceKey, SocketDisplay, Stats, Table,
};

/// The listing of a table in the layout of `ipvsadm -L -n` (ipvsadm 1.31), through [`Display`].
///
/// Services come in ipvsadm's order (address services before firewall marks; then family,
/// protocol number, address, port), destinations in address and port order. Like ipvsadm, the
/// columns of a destination line are padded, so lines end in spaces. The header reports the
/// kernel's IPVS version 1.2.1 and the default connection table size, 4096, as a table in memory
/// has neither. Active and inactive connection counts come from the destination's counters,
/// 0 when the table has none.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, Copy)]
pub struct Listing<'a>(pub &'a Table);

impl Table {
    /// This table as `ipvsadm -L -n` lists it; see [`Listing`].
    pub fn listing(&self) -> Listing<'_> {
        Listing(self)
    }
}

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IP Virtual Server version 1.2.1 (size=4096)\n")?;
        f.write_str("Prot LocalAddress:Port Scheduler Flags\n")?;
        f.write_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")?;
        let mut entries: Vec<&ServiceEntry> = self.0.services.values().collect();
        entries.sort_by(|a, b| ipvsadm_order(&a.service.key, &b.service.key));
        for entry in entries {
            service_line(f, entry)?;
            // Destination keys already sort as ipvsadm sorts them: address, then port.
            for (key, dest) in &entry.destinations {
                let stats = entry
                    .destination_stats
                    .get(key)
                    .copied()
                    .unwrap_or_default();
                dest_line(f, key, dest.forwarding.ipvsadm_name(), dest.weight, &stats)?;
            }
        }
        Ok(())
    }
}

/// `libipvs`'s `ipvs_cmp_services`: firewall mark (0 for address services), family, protocol
/// number, address, port.
fn ipvsadm_order(a: &ServiceKey, b: &ServiceKey) -> Ordering {
    fn rank(key: &ServiceKey) -> (u32, Family, u16, Option<IpAddr>, u16) {
        match key {
            ServiceKey::Addr {
                address,
                protocol,
                port,
            } => (
                0,
                Family::of(address),
                protocol.number(),
                Some(*address),
                *port,
            ),
            ServiceKey::FwMark { family, mark } => (*mark, *family, 0, None, 0),
        }
    }
    rank(a).cmp(&rank(b))
}

fn service_line(f: &mut fmt::Formatter<'_>, entry: &ServiceEntry) -> fmt::Result {
    let service = &entry.service;
    let family = match service.key {
        ServiceKey::Addr {
            address,
            protocol,
            port,
        } => {
            // `%-4s %s`: TCP and UDP get two spaces, SCTP one, as ipvsadm 1.31 prints them.
            write!(
                f,
                "{:<4} {}",
                protocol.to_string(),
                SocketDisplay(address, port)
            )?;
            Family::of(&address)
        }
        ServiceKey::FwMark { family, mark } => {
            // ipvsadm prints the mark with `%d`: a mark above 2^31 comes out negative there.
            write!(f, "FWM  {}", mark as i32)?;
            if family == Family::Inet6 {
                f.write_str(" IPv6")?;
            }
            family
        }
    };
    write!(f, " {}", service.scheduler)?;
    sched_flags(f, service.scheduler.name(), service.flags)?;
    if service.flags.contains(ServiceFlags::PERSISTENT) {
        write!(f, " persistent {}", service.timeout)?;
        match family {
            Family::Inet if service.netmask < 32 => {
                write!(f, " mask {}", ipv4_mask(service.netmask))?;
            }
            Family::Inet6 if service.netmask != 128 => write!(f, " mask {}", service.netmask)?,
            Family::Inet | Family::Inet6 => {}
        }
        // ipvsadm's list mode shows `ops` only inside the persistence block, so a one-packet
        // service that is not persistent lists without it.
        if service.flags.contains(ServiceFlags::ONEPACKET) {
            f.write_str(" ops")?;
        }
    }
    f.write_str("\n")
}

/// ipvsadm's `print_sched_flags`: the scheduler flag bits under the names `sh` and `mh` give
/// them, comma-separated in parentheses (checked against ipvsadm 1.31 in the kernel VM).
fn sched_flags(f: &mut fmt::Formatter<'_>, scheduler: &str, flags: ServiceFlags) -> fmt::Result {
    let names: [&str; 3] = match scheduler {
        "sh" => ["sh-fallback", "sh-port", "flag-3"],
        "mh" => ["mh-fallback", "mh-port", "flag-3"],
        _ => ["flag-1", "flag-2", "flag-3"],
    };
    let bits = [
        ServiceFlags::SCHED1,
        ServiceFlags::SCHED2,
        ServiceFlags::SCHED3,
    ];
    let set: Vec<&str> = bits
        .into_iter()
        .zip(names)
        .filter(|(bit, _)| flags.contains(*bit))
        .map(|(_, name)| name)
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    write!(f, " ({})", set.join(","))
}

/// The dotted IPv4 netmask of a prefix length.
fn ipv4_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

/// ipvsadm's `"  -> %-28s %-7s %-6d %-10u %-10u\n"`.
fn dest_line(
    f: &mut fmt::Formatter<'_>,
    key: &DestKey,
    forward: &str,
    weight: u32,
    stats: &Stats,
) -> fmt::Result {
    // `%-28s` pads through a string; `{:<28}` on the Display itself would be ignored.
    let address = key.to_string();
    writeln!(
        f,
        "  -> {address:<28} {forward:<7} {weight:<6} {:<10} {:<10}",
        stats.active_connections, stats.inactive_connections
    )
}
