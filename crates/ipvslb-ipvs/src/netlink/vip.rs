//! [`Vips`]: the virtual addresses on the director's own dummy interface, over rtnetlink.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use neli::attr::Attribute;
use neli::consts::nl::NlmF;
use neli::consts::rtnl::{Arphrd, Ifa, IfaF, Iff, Ifla, IflaInfo, RtAddrFamily, RtScope, Rtm};
use neli::consts::socket::NlFamily;
use neli::rtnl::{Ifaddrmsg, IfaddrmsgBuilder, Ifinfomsg, IfinfomsgBuilder, RtattrBuilder};
use neli::types::{Buffer, RtBuffer};
use neli::{FromBytesWithInput, Size, ToBytes};

use super::socket::{Conn, Expect, SocketError};
use super::{Error, Request, Result};
use crate::model::host_prefix;

/// The interface ipvslb creates and owns unless told otherwise.
pub const DEFAULT_INTERFACE: &str = "ipvslb0";

/// The alias (`IFLA_IFALIAS`) written on the interface [`Vips::open`] creates. An existing
/// interface of the configured name without it is someone else's (kube-proxy's `kube-ipvs0` is
/// a dummy interface too) and is never adopted: its addresses would be taken for VIPs to remove.
pub const INTERFACE_ALIAS: &str = "ipvslb";

/// How long a reply may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The host addresses (/32 and /128) on one dummy interface. No other interface is ever touched.
#[derive(Debug)]
pub struct Vips {
    conn: Conn,
    name: String,
    index: u32,
    /// On an interface of the host's ([`Vips::open_shared`]): how long an address lives
    /// unless refreshed, in seconds. `None` on ipvslb's own interface, where addresses live
    /// until removed.
    lifetime: Option<u32>,
}

impl Vips {
    /// Opens rtnetlink, creates the dummy interface `name` if it is absent (marked with
    /// [`INTERFACE_ALIAS`]), and sets it up. An existing interface is adopted only when it is a
    /// dummy interface with that mark.
    pub fn open(name: &str) -> Result<Self> {
        Self::open_with(name, true)
    }

    /// As [`Vips::open`], but never creates the interface: `ENODEV` when it is absent.
    pub fn open_existing(name: &str) -> Result<Self> {
        Self::open_with(name, false)
    }

    /// Opens rtnetlink over an existing interface of the host's, of any kind (the segment a
    /// director answers ARP and NDP on): never created, adopted or set up, and only its host
    /// addresses (/32, /128) are listed, so its own subnet addresses are never taken for VIPs.
    /// The addresses it adds live `lifetime` seconds unless [`Vips::refresh`]ed: the kernel
    /// removes them by itself when the process that claimed them is gone. Returns it with its
    /// hardware address.
    pub fn open_shared(name: &str, lifetime: u32) -> Result<(Self, Option<[u8; 6]>)> {
        let mut vips = Self::connect(name)?;
        vips.lifetime = Some(lifetime.max(1));
        let link = vips.link_named(name)?;
        vips.index = u32::try_from(*link.ifi_index()).map_err(|_| Error::Decode {
            op: Request::Link,
            key: name.to_owned(),
            reason: format!("interface index {}", link.ifi_index()),
        })?;
        Ok((vips, link_hardware_address(&link)))
    }

    fn connect(name: &str) -> Result<Self> {
        let conn = Conn::open(NlFamily::Route, TIMEOUT).map_err(|source| Error::Socket {
            op: Request::Open,
            key: String::new(),
            source,
        })?;
        Ok(Self {
            conn,
            name: name.to_owned(),
            index: 0,
            lifetime: None,
        })
    }

    fn open_with(name: &str, create: bool) -> Result<Self> {
        let mut vips = Self::connect(name)?;
        vips.index = match vips.link() {
            Ok((index, alias)) => {
                if alias.as_deref() != Some(INTERFACE_ALIAS) {
                    return Err(Error::NotOurs {
                        interface: name.to_owned(),
                        alias,
                    });
                }
                index
            }
            Err(e) if create && e.is_missing() => {
                vips.create_dummy()?;
                let (index, _) = vips.link()?;
                vips.index = index;
                vips.set_alias()?;
                index
            }
            Err(e) => return Err(e),
        };
        vips.set_up()?;
        Ok(vips)
    }

    /// Whether an interface named `name` exists (of any kind), seen through this socket.
    pub fn link_exists(&mut self, name: &str) -> Result<bool> {
        match self.link_named(name) {
            Ok(_) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The interface's name.
    pub fn interface(&self) -> &str {
        &self.name
    }

    /// The interface's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Every address of global scope on the interface (the kernel's IPv6 link-local one is not
    /// listed, and never removed); on a shared interface, only host addresses with a lifetime,
    /// never the host's own permanent ones.
    pub fn list(&mut self) -> Result<BTreeSet<IpAddr>> {
        let request = IfaddrmsgBuilder::default()
            .ifa_family(RtAddrFamily::Unspecified)
            .ifa_prefixlen(0)
            .ifa_scope(RtScope::Universe)
            .ifa_index(0)
            .build()
            .map_err(|e| self.codec(Request::ListAddresses, e))?;
        let replies: Vec<Ifaddrmsg> = self.dump(
            Request::ListAddresses,
            self.name.clone(),
            Rtm::Getaddr,
            request,
        )?;
        Ok(replies
            .iter()
            .filter(|a| *a.ifa_index() == self.index)
            // The kernel's own link-local address is not a VIP.
            .filter(|a| *a.ifa_scope() == RtScope::Universe)
            // On the host's interface, its own addresses are permanent; the VIPs ipvslb puts
            // there have a lifetime.
            .filter(|a| self.lifetime.is_none() || !a.ifa_flags().contains(IfaF::PERMANENT))
            .filter_map(|a| Some((address_of(a)?, *a.ifa_prefixlen())))
            .filter(|(address, prefix)| self.lifetime.is_none() || *prefix == host_prefix(address))
            .map(|(address, _)| address)
            .collect())
    }

    /// Adds `address` as a host address; `false` if it was there already.
    pub fn add(&mut self, address: IpAddr) -> Result<bool> {
        let message = self.address_message(address, Request::AddAddress)?;
        match self.ack(
            Request::AddAddress,
            address.to_string(),
            Rtm::Newaddr,
            NlmF::CREATE | NlmF::EXCL,
            message,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Puts `address` back for another lifetime (re-added if it expired meanwhile).
    pub fn refresh(&mut self, address: IpAddr) -> Result<()> {
        let message = self.address_message(address, Request::AddAddress)?;
        self.ack(
            Request::AddAddress,
            address.to_string(),
            Rtm::Newaddr,
            NlmF::CREATE | NlmF::REPLACE,
            message,
        )
    }

    /// Removes `address`; `false` if it was not there.
    pub fn remove(&mut self, address: IpAddr) -> Result<bool> {
        let message = self.address_message(address, Request::DelAddress)?;
        match self.ack(
            Request::DelAddress,
            address.to_string(),
            Rtm::Deladdr,
            NlmF::empty(),
            message,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the interface's addresses exactly `desired`; returns how many were added and removed.
    pub fn sync(&mut self, desired: &BTreeSet<IpAddr>) -> Result<(usize, usize)> {
        let actual = self.list()?;
        let mut added = 0;
        let mut removed = 0;
        for address in desired.difference(&actual) {
            added += usize::from(self.add(*address)?);
        }
        for address in actual.difference(desired) {
            removed += usize::from(self.remove(*address)?);
        }
        Ok((added, removed))
    }

    fn address_message(&self, address: IpAddr, op: Request) -> Result<Ifaddrmsg> {
        let (family, bytes, flags) = match address {
            IpAddr::V4(a) => (RtAddrFamily::Inet, a.octets().to_vec(), IfaF::empty()),
            // No duplicate address detection: the address must be usable at once, and a VIP is
            // shared by design.
            IpAddr::V6(a) => (RtAddrFamily::Inet6, a.octets().to_vec(), IfaF::NODAD),
        };
        let mut attrs = RtBuffer::new();
        for kind in [Ifa::Local, Ifa::Address] {
            attrs.push(
                RtattrBuilder::default()
                    .rta_type(kind)
                    .rta_payload(Buffer::from(bytes.clone()))
                    .build()
                    .map_err(|e| self.codec(op, e))?,
            );
        }
        if let Some(valid) = self.lifetime {
            // IPv6: deprecated from the start (preferred lifetime 0): still answered for and
            // served, but never chosen as the source of this host's own IPv6 traffic on the
            // segment (RFC 6724 rule 3), where a shared VIP as source would send the answers
            // to whichever director holds it then.
            let preferred = if address.is_ipv6() { 0 } else { valid };
            let mut cacheinfo = Vec::with_capacity(16);
            for value in [preferred, valid, 0, 0] {
                cacheinfo.extend_from_slice(&value.to_ne_bytes());
            }
            attrs.push(
                RtattrBuilder::default()
                    .rta_type(Ifa::Cacheinfo)
                    .rta_payload(Buffer::from(cacheinfo))
                    .build()
                    .map_err(|e| self.codec(op, e))?,
            );
        }
        IfaddrmsgBuilder::default()
            .ifa_family(family)
            .ifa_prefixlen(host_prefix(&address))
            .ifa_flags(flags)
            .ifa_scope(RtScope::Universe)
            .ifa_index(self.index)
            .rtattrs(attrs)
            .build()
            .map_err(|e| self.codec(op, e))
    }

    /// The link named `name`: `ENODEV` when there is none.
    fn link_named(&mut self, name: &str) -> Result<Ifinfomsg> {
        let mut attrs = RtBuffer::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Ifname)
                .rta_payload(Buffer::from(nul_terminated(name)))
                .build()
                .map_err(|e| self.codec(Request::Link, e))?,
        );
        let request = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .rtattrs(attrs)
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        self.get(Request::Link, Rtm::Getlink, request)
    }

    /// The index and alias of the interface `self.name`: `ENODEV` when there is none,
    /// [`Error::NotDummy`] when it is not a dummy interface.
    fn link(&mut self) -> Result<(u32, Option<String>)> {
        let name = self.name.clone();
        let reply = self.link_named(&name)?;
        let kind = link_kind(&reply);
        if kind.as_deref() != Some("dummy") {
            return Err(Error::NotDummy {
                interface: self.name.clone(),
                kind: kind.unwrap_or_else(|| "a device without a kind".to_owned()),
            });
        }
        let index = u32::try_from(*reply.ifi_index()).map_err(|_| Error::Decode {
            op: Request::Link,
            key: self.name.clone(),
            reason: format!("interface index {}", reply.ifi_index()),
        })?;
        Ok((index, link_alias(&reply)))
    }

    /// Marks the interface as ipvslb's.
    fn set_alias(&mut self) -> Result<()> {
        let mut attrs = RtBuffer::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Ifalias)
                .rta_payload(Buffer::from(INTERFACE_ALIAS.as_bytes().to_vec()))
                .build()
                .map_err(|e| self.codec(Request::Link, e))?,
        );
        let request = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(i32::try_from(self.index).unwrap_or_default())
            .rtattrs(attrs)
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        self.ack(
            Request::Link,
            self.name.clone(),
            Rtm::Newlink,
            NlmF::empty(),
            request,
        )
    }

    fn create_dummy(&mut self) -> Result<()> {
        let kind = RtattrBuilder::default()
            .rta_type(IflaInfo::Kind)
            .rta_payload(Buffer::from(b"dummy".to_vec()))
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        let info = RtattrBuilder::default()
            .rta_type(Ifla::Linkinfo)
            .rta_payload(Buffer::new())
            .build()
            .map_err(|e| self.codec(Request::Link, e))?
            .nest(&kind)
            .map_err(|e| self.codec(Request::Link, e))?;
        let name = RtattrBuilder::default()
            .rta_type(Ifla::Ifname)
            .rta_payload(Buffer::from(nul_terminated(&self.name)))
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        let mut attrs = RtBuffer::new();
        attrs.push(name);
        attrs.push(info);
        let request = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_type(Arphrd::from(0))
            .rtattrs(attrs)
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        self.ack(
            Request::Link,
            self.name.clone(),
            Rtm::Newlink,
            NlmF::CREATE | NlmF::EXCL,
            request,
        )
    }

    fn set_up(&mut self) -> Result<()> {
        let index = i32::try_from(self.index).unwrap_or_default();
        let request = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index)
            .ifi_flags(Iff::UP)
            .ifi_change(Iff::UP)
            .build()
            .map_err(|e| self.codec(Request::Link, e))?;
        self.ack(
            Request::Link,
            self.name.clone(),
            Rtm::Newlink,
            NlmF::empty(),
            request,
        )
    }

    fn codec(&self, op: Request, e: impl std::fmt::Display) -> Error {
        Error::Socket {
            op,
            key: self.name.clone(),
            source: SocketError::Codec(e.to_string()),
        }
    }

    /// Sends one request with `NLM_F_ACK` and waits for its acknowledgement.
    fn ack<P>(&mut self, op: Request, key: String, kind: Rtm, flags: NlmF, payload: P) -> Result<()>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        self.request(op, key, kind, flags, payload, Expect::Ack)
            .map(|_| ())
    }

    /// Sends one request and returns its reply.
    fn get<P>(&mut self, op: Request, kind: Rtm, payload: P) -> Result<P>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        let key = self.name.clone();
        self.conn
            .get(kind.into(), NlmF::empty(), payload)
            .map_err(|failure| Error::of_request(op, key, failure))
    }

    /// Sends one dump request and returns every reply until `NLMSG_DONE`.
    fn dump<P>(&mut self, op: Request, key: String, kind: Rtm, payload: P) -> Result<Vec<P>>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        self.request(op, key, kind, NlmF::empty(), payload, Expect::All)
    }

    fn request<P>(
        &mut self,
        op: Request,
        key: String,
        kind: Rtm,
        flags: NlmF,
        payload: P,
        expect: Expect,
    ) -> Result<Vec<P>>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        self.conn
            .request(kind.into(), flags, payload, expect)
            .map_err(|failure| Error::of_request(op, key, failure))
    }
}

fn nul_terminated(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// The address of an `RTM_NEWADDR` message (`IFA_LOCAL`, else `IFA_ADDRESS`).
fn address_of(message: &Ifaddrmsg) -> Option<IpAddr> {
    let attrs = message.rtattrs();
    let find = |kind: Ifa| {
        attrs
            .iter()
            .find(|a| *a.rta_type() == kind)
            .map(|a| a.payload().as_ref().to_vec())
    };
    let bytes = find(Ifa::Local).or_else(|| find(Ifa::Address))?;
    match *message.ifa_family() {
        RtAddrFamily::Inet => {
            let octets: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        RtAddrFamily::Inet6 => {
            let octets: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The `IFLA_ADDRESS` of a link, when it is an Ethernet address.
fn link_hardware_address(link: &Ifinfomsg) -> Option<[u8; 6]> {
    let address = link
        .rtattrs()
        .iter()
        .find(|a| *a.rta_type() == Ifla::Address)?;
    address.payload().as_ref().try_into().ok()
}

/// The `IFLA_IFALIAS` of a link, if it has one.
fn link_alias(link: &Ifinfomsg) -> Option<String> {
    let alias = link
        .rtattrs()
        .iter()
        .find(|a| *a.rta_type() == Ifla::Ifalias)?;
    let bytes = alias.payload().as_ref();
    let text = bytes.split(|b| *b == 0).next()?;
    (!text.is_empty()).then(|| String::from_utf8_lossy(text).into_owned())
}

/// The `IFLA_INFO_KIND` of a link (`dummy`, `veth`, ...), if it has one.
fn link_kind(link: &Ifinfomsg) -> Option<String> {
    let info = link
        .rtattrs()
        .iter()
        .find(|a| *a.rta_type() == Ifla::Linkinfo)?;
    let nested = info.get_attr_handle::<IflaInfo>().ok()?;
    let kind = nested.get_attribute(IflaInfo::Kind)?;
    let bytes = kind.payload().as_ref();
    let name = bytes.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}
