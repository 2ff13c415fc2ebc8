//! Inclusive address ranges within one family, parsed from a CIDR (`10.240.0.208/29`,
//! `2001:db8::/64`) or a `first-last` range (`10.240.0.210-10.240.0.215`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::model::IpFamily;

/// An inclusive range `first..=last` of one family; `first <= last` always holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange {
    first: IpAddr,
    last: IpAddr,
}

/// Why a pool address entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Neither a CIDR nor a `first-last` range.
    #[error("{0:?} is neither a CIDR (10.0.0.0/24) nor a range (10.0.0.10-10.0.0.20)")]
    Syntax(String),
    /// The CIDR has host bits set (`10.0.0.1/24`): ambiguous, so refused.
    #[error("{0:?} has host bits set; did you mean {1}?")]
    HostBits(String, IpNet),
    /// The two ends are of different families.
    #[error("{0:?} mixes IPv4 and IPv6")]
    MixedFamilies(String),
    /// The first address is above the last.
    #[error("{0:?} starts after it ends")]
    Reversed(String),
}

impl IpRange {
    /// The range `first..=last`, if both are of one family and in order.
    pub fn new(first: IpAddr, last: IpAddr) -> Option<Self> {
        (IpFamily::of(&first) == IpFamily::of(&last) && to_u128(first) <= to_u128(last))
            .then_some(Self { first, last })
    }

    /// The range holding exactly `addr`.
    pub fn single(addr: IpAddr) -> Self {
        Self {
            first: addr,
            last: addr,
        }
    }

    /// The first address.
    pub fn first(&self) -> IpAddr {
        self.first
    }

    /// The last address.
    pub fn last(&self) -> IpAddr {
        self.last
    }

    /// The range's family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.first)
    }

    /// Whether `addr` lies within.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        IpFamily::of(addr) == self.family()
            && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(*addr))
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.family() == other.family()
            && to_u128(self.first) <= to_u128(other.last)
            && to_u128(other.first) <= to_u128(self.last)
    }

    /// The number of addresses, saturating at `u128::MAX` (only `::/0` reaches it).
    pub fn size(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }
}

impl FromStr for IpRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if let Some((a, b)) = text.split_once('-') {
            let first: IpAddr = a.trim().parse().map_err(|_| RangeError::Syntax(s.into()))?;
            let last: IpAddr = b.trim().parse().map_err(|_| RangeError::Syntax(s.into()))?;
            if IpFamily::of(&first) != IpFamily::of(&last) {
                return Err(RangeError::MixedFamilies(s.into()));
            }
            return IpRange::new(first, last).ok_or_else(|| RangeError::Reversed(s.into()));
        }
        if text.contains('/') {
            let net: IpNet = text.parse().map_err(|_| RangeError::Syntax(s.into()))?;
            if net.trunc() != net {
                return Err(RangeError::HostBits(s.into(), net.trunc()));
            }
            return Ok(Self {
                first: net.network(),
                last: net.broadcast(),
            });
        }
        let addr: IpAddr = text.parse().map_err(|_| RangeError::Syntax(s.into()))?;
        Ok(Self::single(addr))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An address as a number, for ordering and arithmetic (IPv4 in the low 32 bits).
pub fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of `family` numbered `n` (IPv4 uses the low 32 bits of `n`).
pub fn from_u128(family: IpFamily, n: u128) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_ranges_and_single_addresses_parse() {
        let r: IpRange = "10.240.0.208/29".parse().unwrap();
        assert_eq!(r.to_string(), "10.240.0.208-10.240.0.215");
        assert_eq!(r.size(), 8);
        let r: IpRange = "10.240.0.210 - 10.240.0.215".parse().unwrap();
        assert_eq!(r.size(), 6);
        let r: IpRange = "2001:db8::/64".parse().unwrap();
        assert_eq!(r.size(), 1 << 64);
        let r: IpRange = "::/0".parse().unwrap();
        assert_eq!(r.size(), u128::MAX);
        let r: IpRange = "10.0.0.7".parse().unwrap();
        assert_eq!(r.size(), 1);
    }

    #[test]
    fn malformed_entries_are_refused_with_a_reason() {
        assert!(matches!(
            "10.0.0.1/24".parse::<IpRange>(),
            Err(RangeError::HostBits(..))
        ));
        assert!(matches!(
            "10.0.0.9-10.0.0.1".parse::<IpRange>(),
            Err(RangeError::Reversed(_))
        ));
        assert!(matches!(
            "10.0.0.1-::1".parse::<IpRange>(),
            Err(RangeError::MixedFamilies(_))
        ));
        assert!(matches!(
            "banana".parse::<IpRange>(),
            Err(RangeError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<IpRange>(),
            Err(RangeError::Syntax(_))
        ));
    }

    #[test]
    fn overlap_and_containment_respect_families() {
        let a: IpRange = "10.0.0.0/24".parse().unwrap();
        let b: IpRange = "10.0.0.255-10.0.1.3".parse().unwrap();
        let c: IpRange = "::a00:0/120".parse().unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(a.contains(&"10.0.0.9".parse().unwrap()));
        assert!(!c.contains(&"10.0.0.9".parse().unwrap()));
    }
}
