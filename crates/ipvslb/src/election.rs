//! Which director answers ARP and NDP for each VIP of an `L2` pool: the live director that
//! ranks highest for the VIP by rendezvous hashing (highest random weight). Every director
//! computes it alone from the same set of live directors (their Leases, [`crate::peers`]), so
//! they agree without a word to one another once they see the same Leases; a director joining
//! or leaving moves only the VIPs it wins or held, and the VIPs spread evenly.

use std::collections::BTreeSet;
use std::hash::Hasher;
use std::net::IpAddr;

/// The directors live now, as one director sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Election {
    /// This director's name.
    pub me: String,
    /// The live directors, this one among them only while its own Lease is fresh.
    pub live: BTreeSet<String>,
}

impl Election {
    /// The director that announces `vip`: `None` when no director is live.
    pub fn winner(&self, vip: &IpAddr) -> Option<&str> {
        self.live
            .iter()
            .max_by_key(|director| (weight(director, vip), std::cmp::Reverse(director.as_str())))
            .map(String::as_str)
    }

    /// Whether this director announces `vip`.
    pub fn wins(&self, vip: &IpAddr) -> bool {
        self.winner(vip) == Some(self.me.as_str())
    }

    /// Whether this director counts itself live (its Lease is fresh).
    pub fn is_live(&self) -> bool {
        self.live.contains(&self.me)
    }
}

/// The weight of `director` for `vip`: SipHash-1-3 with keys 0, which is fixed by its
/// definition (directors of different builds and versions must rank alike, and the standard
/// library's hasher may change) and mixes well enough that names differing in one character
/// still rank independently.
fn weight(director: &str, vip: &IpAddr) -> u64 {
    let mut hasher = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    hasher.write(director.as_bytes());
    // The name's end, so that ("ab", x) and ("a", "b" + x) differ.
    hasher.write_u8(0);
    match vip {
        IpAddr::V4(v4) => hasher.write(&v4.octets()),
        IpAddr::V6(v6) => hasher.write(&v6.octets()),
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_DIR1_V4: u64 = 12_761_877_072_027_549_454;
    const PINNED_DIR2_V4: u64 = 1_041_541_129_508_130_395;
    const PINNED_DIR1_V6: u64 = 17_894_601_939_189_268_838;

    fn election(me: &str, live: &[&str]) -> Election {
        Election {
            me: me.to_owned(),
            live: live.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn vips(n: u32) -> Vec<IpAddr> {
        (0..n)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0af0_0000 + i)))
            .collect()
    }

    #[test]
    fn every_director_elects_the_same_one_and_exactly_one_wins() {
        let live = ["dir1", "dir2", "dir3"];
        for vip in vips(500) {
            let winners: Vec<&str> = live
                .iter()
                .filter(|me| election(me, &live).wins(&vip))
                .copied()
                .collect();
            assert_eq!(winners.len(), 1, "{vip}: {winners:?}");
            assert_eq!(election("dir1", &live).winner(&vip), Some(winners[0]));
        }
    }

    #[test]
    fn vips_spread_over_the_directors() {
        let live = ["dir1", "dir2", "dir3"];
        let e = election("dir1", &live);
        for director in live {
            let won = vips(3000)
                .iter()
                .filter(|v| e.winner(v) == Some(director))
                .count();
            // 1000 expected; a fair split is within a few standard deviations (~26).
            assert!((850..=1150).contains(&won), "{director} won {won} of 3000");
        }
    }

    #[test]
    fn a_director_leaving_moves_only_the_vips_it_held() {
        let all = election("dir1", &["dir1", "dir2", "dir3"]);
        let without = election("dir1", &["dir1", "dir2"]);
        let mut moved = 0;
        for vip in vips(1000) {
            let before = all.winner(&vip);
            let after = without.winner(&vip);
            if before != Some("dir3") {
                assert_eq!(before, after, "{vip} moved though its director stayed");
            } else {
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn a_director_not_live_wins_nothing_and_nobody_live_elects_nobody() {
        let e = election("dir1", &["dir2"]);
        assert!(!e.is_live());
        assert!(vips(100).iter().all(|v| !e.wins(v)));
        assert_eq!(election("dir1", &[]).winner(&vips(1)[0]), None);
    }

    #[test]
    fn the_weights_are_fixed_across_builds() {
        // Pinned: a change here would make directors of two versions disagree on who
        // announces which VIP.
        let vip: IpAddr = "10.240.0.210".parse().unwrap();
        let v6: IpAddr = "2001:db8:240::210".parse().unwrap();
        assert_eq!(
            [
                weight("dir1", &vip),
                weight("dir2", &vip),
                weight("dir1", &v6)
            ],
            [PINNED_DIR1_V4, PINNED_DIR2_V4, PINNED_DIR1_V6]
        );
    }
}
