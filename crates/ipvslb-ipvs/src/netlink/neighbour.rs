//! [`Announcer`]: the frames a new Layer-2 announcer of a VIP sends so that the hosts on the
//! segment move their neighbour-cache entry for the VIP to its MAC address at once, instead of
//! sending to the old announcer until the entry goes stale.
//!
//! For IPv4 that is an ARP Announcement (RFC 5227 §2.3, the gratuitous ARP of `arping -U`); for
//! IPv6 an unsolicited Neighbor Advertisement to all nodes with the Override flag (RFC 4861
//! §7.2.6). Both are written whole, Ethernet header included, and sent on an `AF_PACKET` socket:
//! the kernel has no call that sends either for an address on demand.
//!
//! Receivers update an entry they have; whether they create one from an unsolicited packet is
//! their choice (Linux: `arp_accept`, `accept_untracked_na`), which is all an announcement needs.

// The socket calls below have no safe wrapper among this crate's dependencies; each `unsafe`
// block is one libc call with its `SAFETY:` argument.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The length of an Ethernet (MAC) address.
const ETH_ALEN: usize = 6;
/// The Ethernet broadcast address, where ARP Announcements go (RFC 5227 §2.3).
const BROADCAST: [u8; ETH_ALEN] = [0xff; ETH_ALEN];
/// The Ethernet multicast address of ff02::1, all nodes: 33:33 and the address's last 32 bits
/// (RFC 2464 §7).
const ALL_NODES_MAC: [u8; ETH_ALEN] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

/// The ethertype of ARP.
const ETHERTYPE_ARP: u16 = 0x0806;
/// The ethertype of IPv4, ARP's protocol type for IPv4 addresses.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// The ethertype of IPv6.
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// ARP's hardware type for Ethernet (`ARPHRD_ETHER`).
const ARPHRD_ETHER: u16 = 1;
/// ARP's request operation (`ARPOP_REQUEST`): an Announcement is a request (RFC 5227 §3 explains
/// why not a reply).
const ARPOP_REQUEST: u16 = 1;

/// The length of an ARP Announcement frame: 14 bytes of Ethernet header and 28 of ARP for
/// Ethernet and IPv4. The driver pads it to the 60-byte minimum.
const ARP_FRAME_LEN: usize = 42;

/// The length of the Ethernet header.
const ETH_HLEN: usize = 14;
/// The length of the IPv6 header.
const IPV6_HLEN: usize = 40;
/// The IPv6 next header number of ICMPv6.
const IPPROTO_ICMPV6: u8 = 58;
/// The hop limit every Neighbor Discovery message carries, and receivers insist on: only an
/// on-link sender can send it (RFC 4861 §7.1.2).
const ND_HOP_LIMIT: u8 = 255;
/// The ICMPv6 type of a Neighbor Advertisement (RFC 4861 §4.4).
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// The Override flag of a Neighbor Advertisement: the receiver replaces the link-layer address
/// it has cached (RFC 4861 §4.4). Router and Solicited stay clear: the sender is no router, and
/// nobody asked (RFC 4861 §7.2.6).
const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
/// The option type of a Target Link-Layer Address (RFC 4861 §4.6.1).
const ND_OPT_TARGET_LINKADDR: u8 = 2;
/// The length of a Neighbor Advertisement with one Target Link-Layer Address option: 4 bytes of
/// type, code and checksum, 4 of flags, 16 of target, 8 of option.
const NA_LEN: usize = 32;
/// The offset of the ICMPv6 checksum in the message.
const ICMPV6_CHECKSUM_AT: usize = 2;

/// A gratuitous ARP frame announcing that `vip` is at `mac`: an ARP request, broadcast, whose
/// sender and target protocol addresses are both `vip` and whose target hardware address is
/// zero. RFC 5227 §2.3 calls it an ARP Announcement; it is what `arping -U` sends. Hosts that
/// have `vip` cached take the sender's addresses (RFC 826's merge step), and, as a request, it
/// asks nobody to answer.
pub fn arp_announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let ip = vip.octets();
    let fields: [&[u8]; 11] = [
        // Ethernet header.
        &BROADCAST,
        &mac,
        &ETHERTYPE_ARP.to_be_bytes(),
        // ARP for Ethernet and IPv4: hardware and protocol types and lengths.
        &ARPHRD_ETHER.to_be_bytes(),
        &ETHERTYPE_IPV4.to_be_bytes(),
        &[ETH_ALEN as u8, 4],
        &ARPOP_REQUEST.to_be_bytes(),
        // Sender hardware and protocol address, target hardware and protocol address.
        &mac,
        &ip,
        &[0; ETH_ALEN],
        &ip,
    ];
    let mut frame = [0; ARP_FRAME_LEN];
    for (byte, value) in frame.iter_mut().zip(fields.into_iter().flatten()) {
        *byte = *value;
    }
    frame
}

/// An unsolicited Neighbor Advertisement frame announcing that `vip` is at `mac`, to all nodes
/// (ff02::1), with Override set and Router and Solicited clear, the form RFC 4861 §7.2.6 gives a
/// node whose link-layer address changed. Its Target Link-Layer Address option carries `mac`;
/// without it the advertisement would update nothing. The source is `vip` itself, an address of
/// the sending interface as §4.4 asks.
pub fn neighbour_advertisement(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let destination = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut message = icmpv6_neighbor_advert(mac, vip);
    let checksum = icmpv6_checksum(vip, destination, &message);
    if let Some(field) = message.get_mut(ICMPV6_CHECKSUM_AT..ICMPV6_CHECKSUM_AT + 2) {
        field.copy_from_slice(&checksum.to_be_bytes());
    }

    let mut frame = Vec::with_capacity(ETH_HLEN + IPV6_HLEN + NA_LEN);
    frame.extend_from_slice(&ALL_NODES_MAC);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&ipv6_header(vip, destination, NA_LEN as u16));
    frame.extend_from_slice(&message);
    frame
}

/// An IPv6 header without extension headers for a Neighbor Discovery message of
/// `payload_len` bytes (RFC 8200 §3): version 6, traffic class and flow label zero.
fn ipv6_header(source: Ipv6Addr, destination: Ipv6Addr, payload_len: u16) -> Vec<u8> {
    let mut header = Vec::with_capacity(IPV6_HLEN);
    header.extend_from_slice(&(6u32 << 28).to_be_bytes());
    header.extend_from_slice(&payload_len.to_be_bytes());
    header.push(IPPROTO_ICMPV6);
    header.push(ND_HOP_LIMIT);
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&destination.octets());
    header
}

/// The ICMPv6 Neighbor Advertisement of `target` at `mac` (RFC 4861 §4.4), checksum zero.
fn icmpv6_neighbor_advert(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut message = Vec::with_capacity(NA_LEN);
    message.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]);
    message.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    message.extend_from_slice(&target.octets());
    // The option's length counts units of 8 bytes, its type and length included (§4.6).
    message.extend_from_slice(&[ND_OPT_TARGET_LINKADDR, 1]);
    message.extend_from_slice(&mac);
    message
}

/// The ICMPv6 checksum of `message` (its checksum field zero) from `source` to `destination`:
/// the one's complement of the one's-complement sum over the IPv6 pseudo-header and the message
/// (RFC 4443 §2.3, pseudo-header of RFC 8200 §8.1, formerly RFC 2460 §8.1).
fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    !ones_complement_sum(&[&pseudo_header(source, destination, message.len()), message])
}

/// The IPv6 pseudo-header of an ICMPv6 message of `len` bytes (RFC 8200 §8.1): source,
/// destination, upper-layer packet length as 32 bits, three zero bytes, next header.
fn pseudo_header(source: Ipv6Addr, destination: Ipv6Addr, len: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(40);
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&destination.octets());
    header.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    header
}

/// The 16-bit one's-complement sum of `parts` taken one after the other as big-endian words,
/// an odd last byte padded with zero (RFC 1071). Every part but the last must be of even length.
fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        for word in part.chunks(2) {
            let high = word.first().copied().unwrap_or(0);
            let low = word.get(1).copied().unwrap_or(0);
            sum += u64::from(u16::from_be_bytes([high, low]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 0xffff.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Sends the announcements of VIPs on one Ethernet interface: one `AF_PACKET` raw socket, bound
/// to no interface and no protocol so that it receives nothing; each frame names its interface.
#[derive(Debug)]
pub struct Announcer {
    socket: OwnedFd,
    interface_index: libc::c_int,
    mac: [u8; 6],
}

impl Announcer {
    /// Opens the socket of announcements from `mac` on the interface of index
    /// `interface_index`. Needs `CAP_NET_RAW`.
    pub fn open(interface_index: u32, mac: [u8; 6]) -> io::Result<Self> {
        let interface_index = libc::c_int::try_from(interface_index).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no interface has index {interface_index}"),
            )
        })?;
        let socket = socket(libc::AF_PACKET, libc::SOCK_RAW)
            .map_err(|e| with_context(e, "opening a packet socket (needs CAP_NET_RAW)"))?;
        Ok(Announcer {
            socket,
            interface_index,
            mac,
        })
    }

    /// Announces that `vip` is at this announcer's MAC address: an ARP Announcement for IPv4, an
    /// unsolicited Neighbor Advertisement for IPv6. Once; RFC 5227 §2.3 and RFC 4861 §7.2.6
    /// suggest a few, spaced, which is the caller's to schedule.
    pub fn announce(&self, vip: IpAddr) -> io::Result<()> {
        let result = match vip {
            IpAddr::V4(v4) => self.send(&arp_announcement(self.mac, v4), ETHERTYPE_ARP, BROADCAST),
            IpAddr::V6(v6) => self.send(
                &neighbour_advertisement(self.mac, v6),
                ETHERTYPE_IPV6,
                ALL_NODES_MAC,
            ),
        };
        result.map_err(|e| {
            with_context(
                e,
                &format!(
                    "announcing {vip} on the interface of index {}",
                    self.interface_index
                ),
            )
        })
    }

    /// Sends the whole Ethernet `frame` of `ethertype` to `destination` on the interface.
    fn send(&self, frame: &[u8], ethertype: u16, destination: [u8; 6]) -> io::Result<()> {
        let mut sll_addr = [0; 8];
        for (byte, value) in sll_addr.iter_mut().zip(destination) {
            *byte = value;
        }
        let address = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as libc::c_ushort,
            sll_protocol: ethertype.to_be(),
            sll_ifindex: self.interface_index,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: ETH_ALEN as u8,
            sll_addr,
        };
        let sent = loop {
            match send_to(&self.socket, frame, &address) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if sent != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of the frame's {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}

/// The Ethernet address of `interface`, asked of the kernel with `SIOCGIFHWADDR` on a throwaway
/// datagram socket (any socket serves for the interface ioctls). An interface that is not
/// Ethernet is an error: its address would not fit the frames of [`Announcer`].
pub fn hardware_address(interface: &str) -> io::Result<[u8; 6]> {
    let context = format!("reading the hardware address of interface {interface}");
    let request = ifreq(interface).map_err(|e| with_context(e, &context))?;
    let socket = socket(libc::AF_INET, libc::SOCK_DGRAM).map_err(|e| with_context(e, &context))?;
    let address = hwaddr_ioctl(&socket, request).map_err(|e| with_context(e, &context))?;
    if address.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{context}: it is not an Ethernet interface (hardware type {})",
                address.sa_family
            ),
        ));
    }
    let mut mac = [0; 6];
    for (byte, value) in mac.iter_mut().zip(address.sa_data) {
        // `c_char` to the byte it holds.
        *byte = value as u8;
    }
    Ok(mac)
}

/// An `ifreq` naming `interface`: at most `IFNAMSIZ - 1` bytes, no NUL, room left for the NUL
/// that ends it.
fn ifreq(interface: &str) -> io::Result<libc::ifreq> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    let mut ifr_name = [0; libc::IFNAMSIZ];
    for (c, byte) in ifr_name.iter_mut().zip(name) {
        *c = *byte as libc::c_char;
    }
    Ok(libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru {
            ifru_hwaddr: libc::sockaddr {
                sa_family: 0,
                sa_data: [0; 14],
            },
        },
    })
}

/// A new socket of `domain` and `kind`, protocol 0, closed on `exec`.
fn socket(domain: libc::c_int, kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `socket` takes no pointers; any arguments are safe to pass.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor `socket` just opened, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sendto` of `frame` to `address` on `socket`: the number of bytes sent.
fn send_to(socket: &OwnedFd, frame: &[u8], address: &libc::sockaddr_ll) -> io::Result<usize> {
    // SAFETY: `frame` is valid for reads of `frame.len()` bytes and `address` for reads of a
    // whole `sockaddr_ll`, the length passed; the kernel reads both during the call only.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (address as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    // Negative (-1) exactly when it failed.
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// `SIOCGIFHWADDR` with `request` on `socket`: the interface's hardware address, its hardware
/// type (`ARPHRD_*`) in `sa_family`.
fn hwaddr_ioctl(socket: &OwnedFd, mut request: libc::ifreq) -> io::Result<libc::sockaddr> {
    // SAFETY: `SIOCGIFHWADDR` reads the NUL-terminated name and writes a `sockaddr` into the
    // `ifreq` it is given, which `request` is, whole and writable, for the call.
    let status = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFHWADDR as libc::Ioctl,
            &mut request as *mut libc::ifreq,
        )
    };
    if status < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every field of the union is plain data; `ifru_hwaddr` is the one written, and was
    // initialised before the call anyway.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr })
}

/// `error` with `context` before its message, of the same kind.
fn with_context(error: io::Error, context: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];

    #[test]
    fn an_arp_announcement_is_a_broadcast_request_from_and_for_the_vip() {
        let frame = arp_announcement(MAC, Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            // Ethernet: broadcast destination, our source, ethertype ARP.
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02, 0x42, 0xac, 0x11, 0x00, 0x02,
            0x08, 0x06,
            // Hardware type Ethernet, protocol type IPv4, lengths 6 and 4, operation request.
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
            // Sender MAC and IP.
            0x02, 0x42, 0xac, 0x11, 0x00, 0x02, 192, 0, 2, 10,
            // Target MAC zero, target IP the VIP again.
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn an_arp_announcement_carries_the_whole_vip() {
        let frame = arp_announcement([0xaa; 6], Ipv4Addr::new(255, 1, 0, 254));
        assert_eq!(frame[6..12], [0xaa; 6]);
        assert_eq!(frame[22..28], [0xaa; 6]);
        assert_eq!(frame[28..32], [255, 1, 0, 254]);
        assert_eq!(frame[32..38], [0; 6]);
        assert_eq!(frame[38..42], [255, 1, 0, 254]);
    }

    /// The RFC 1071 sum, written apart from the module's: all the words of `data` added in a
    /// `u32`, the carries folded in at the end.
    fn folded_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            sum += (u32::from(data[i]) << 8) | u32::from(data[i + 1]);
            i += 2;
        }
        if i < data.len() {
            sum += u32::from(data[i]) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// Whether the ICMPv6 message of an Ethernet + IPv6 `frame` checks: the sum over the
    /// pseudo-header, made from the frame's own IPv6 header, and the message is 0xffff.
    fn icmpv6_checks(frame: &[u8]) -> bool {
        let ip = &frame[ETH_HLEN..ETH_HLEN + IPV6_HLEN];
        let message = &frame[ETH_HLEN + IPV6_HLEN..];
        let mut data = Vec::new();
        data.extend_from_slice(&ip[8..40]);
        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, ip[6]]);
        data.extend_from_slice(message);
        folded_sum(&data) == 0xffff
    }

    #[test]
    fn a_neighbour_advertisement_parses_back_field_by_field() {
        let vip: Ipv6Addr = "2001:db8:1:2::42".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        let frame = neighbour_advertisement(MAC, vip);
        assert_eq!(frame.len(), 14 + 40 + 32);

        // Ethernet: all-nodes multicast, our source, IPv6.
        assert_eq!(frame[0..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(frame[6..12], MAC);
        assert_eq!(frame[12..14], [0x86, 0xdd]);

        // IPv6: version 6, class and flow zero; 32 bytes of ICMPv6; hop limit 255.
        let ip = &frame[14..54];
        assert_eq!(ip[0..4], [0x60, 0, 0, 0]);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 32);
        assert_eq!(ip[6], 58);
        assert_eq!(ip[7], 255);
        assert_eq!(ip[8..24], vip.octets());
        assert_eq!(
            ip[24..40],
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets()
        );

        // ICMPv6 Neighbor Advertisement: Override alone, reserved bits zero.
        let na = &frame[54..];
        assert_eq!(na[0], 136);
        assert_eq!(na[1], 0);
        let flags = u32::from_be_bytes([na[4], na[5], na[6], na[7]]);
        assert_eq!(flags & 0x8000_0000, 0, "Router");
        assert_eq!(flags & 0x4000_0000, 0, "Solicited");
        assert_ne!(flags & 0x2000_0000, 0, "Override");
        assert_eq!(flags & 0x1fff_ffff, 0, "Reserved");
        assert_eq!(na[8..24], vip.octets());
        // Target Link-Layer Address option, one unit of 8 bytes.
        assert_eq!(na[24], 2);
        assert_eq!(na[25], 1);
        assert_eq!(na[26..32], MAC);

        assert!(icmpv6_checks(&frame));
    }

    #[test]
    fn changing_any_byte_of_the_message_or_the_addresses_breaks_the_checksum() {
        let vip: Ipv6Addr = "fd00::1:2".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        let frame = neighbour_advertisement(MAC, vip);
        // The addresses (in the pseudo-header) and every byte of the ICMPv6 message.
        for at in (14 + 8)..frame.len() {
            let mut changed = frame.clone();
            changed[at] ^= 0x01;
            assert!(
                !icmpv6_checks(&changed),
                "byte {at} changed, checksum still verifies"
            );
        }
    }

    #[test]
    fn a_neighbour_advertisement_matches_one_checksummed_by_hand() {
        let vip: Ipv6Addr = "2001:db8::1".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        // The 16-bit words summed:
        //   pseudo-header  source 2001+0db8+0001 = 2dba, destination ff02+0001 = ff03,
        //                  length 0020, next header 003a
        //   message        8800 (type 136, code 0), 0000 (checksum), 2000 0000 (Override),
        //                  target 2dba, 0201 (option 2, length 1), 0200 0000 0001 (MAC)
        //   2dba + ff03 + 0020 + 003a + 8800 + 2000 + 2dba + 0201 + 0200 + 0001 = 2_06d3,
        //   folded 06d3 + 2 = 06d5, complemented f92a.
        #[rustfmt::skip]
        let expected: [u8; 86] = [
            0x33, 0x33, 0x00, 0x00, 0x00, 0x01,
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
            0x86, 0xdd,
            0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 58, 255,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            136, 0, 0xf9, 0x2a,
            0x20, 0, 0, 0,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            2, 1, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
        ];
        assert_eq!(neighbour_advertisement(mac, vip), expected);
    }

    #[test]
    fn the_sum_folds_carries_and_pads_an_odd_byte() {
        assert_eq!(ones_complement_sum(&[&[0xff, 0xff], &[0x00, 0x02]]), 0x0002);
        assert_eq!(
            ones_complement_sum(&[&[0x12, 0x34], &[0x56]]),
            0x1234 + 0x5600
        );
        assert_eq!(ones_complement_sum(&[]), 0);
    }

    #[test]
    fn a_bad_interface_name_is_refused_with_the_name() {
        for name in ["", "a-name-far-too-long", "nul\0inside"] {
            let e = hardware_address(name).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains(&format!("interface {name}"))),
                "{name:?}: {e:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_an_error_naming_it() {
        let e = hardware_address("nosuch0").err();
        let message = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.starts_with("reading the hardware address of interface nosuch0: "),
            "{message}"
        );
    }

    #[test]
    fn loopback_is_not_ethernet() {
        let message = hardware_address("lo")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("not an Ethernet interface"), "{message}");
    }

    /// Sends both announcements on loopback, which takes Ethernet frames. Needs CAP_NET_RAW.
    #[cfg(feature = "kernel-tests")]
    #[test]
    fn announcements_go_out_on_loopback() -> io::Result<()> {
        let announcer = Announcer::open(1, MAC)?;
        announcer.announce(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)))?;
        announcer.announce(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)))
    }
}
