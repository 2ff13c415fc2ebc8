//! The free addresses of one family in one pool, kept as disjoint inclusive intervals. Memory grows
//! with the number of holes that allocations punch, never with the size of the pool, so an IPv6
//! /64 costs one map entry until it is used.

use std::collections::BTreeMap;

/// Disjoint free intervals `start -> end` (inclusive), as address numbers.
#[derive(Debug, Clone, Default)]
pub(super) struct FreeSpace {
    intervals: BTreeMap<u128, u128>,
    /// Skip IPv4 addresses ending in `.0` and `.255` (only ever set for IPv4).
    avoid_buggy: bool,
}

impl FreeSpace {
    /// Free space over `intervals`, which must be disjoint and not adjacent.
    pub(super) fn new(intervals: &[(u128, u128)], avoid_buggy: bool) -> Self {
        Self {
            intervals: intervals.iter().copied().collect(),
            avoid_buggy,
        }
    }

    /// The lowest free address that may be handed out, without taking it.
    ///
    /// With `avoid_buggy`, `.0`/`.255` addresses stay in the map until they are met here; an
    /// interval or prefix made only of them is dropped then, so each is skipped once and the
    /// cost stays amortised O(log n) without a per-/24 entry up front.
    pub(super) fn lowest(&mut self) -> Option<u128> {
        while let Some((&start, &end)) = self.intervals.first_key_value() {
            let usable = if self.avoid_buggy {
                skip_buggy(start)
            } else {
                start
            };
            if usable <= end {
                if usable != start {
                    self.intervals.remove(&start);
                    self.intervals.insert(usable, end);
                }
                return Some(usable);
            }
            self.intervals.remove(&start);
        }
        None
    }

    /// Takes `n` out of the free space; false when it was not free.
    pub(super) fn take(&mut self, n: u128) -> bool {
        let Some((&start, &end)) = self.intervals.range(..=n).next_back() else {
            return false;
        };
        if end < n {
            return false;
        }
        self.intervals.remove(&start);
        if start < n {
            self.intervals.insert(start, n - 1);
        }
        if n < end {
            self.intervals.insert(n + 1, end);
        }
        true
    }

    /// Gives `n` back, merging it with its free neighbours so holes do not accumulate.
    pub(super) fn put_back(&mut self, n: u128) {
        let mut start = n;
        let mut end = n;
        if let Some(before) = n.checked_sub(1)
            && let Some((&s, &e)) = self.intervals.range(..n).next_back()
        {
            if e >= n {
                // Already free: giving it back twice must not corrupt the map.
                return;
            }
            if e == before {
                self.intervals.remove(&s);
                start = s;
            }
        }
        if let Some(after) = n.checked_add(1)
            && let Some(e) = self.intervals.remove(&after)
        {
            end = e;
        }
        self.intervals.insert(start, end);
    }

    /// The number of disjoint intervals (for tests of the memory bound).
    #[cfg(test)]
    pub(super) fn intervals(&self) -> usize {
        self.intervals.len()
    }
}

/// Whether an IPv4 address number ends in `.0` or `.255`, which some old firmware mistakes for
/// a network or broadcast address and drops.
pub(super) fn is_buggy(n: u128) -> bool {
    matches!(n & 0xff, 0 | 0xff)
}

/// The first address at or after `n` that does not end in `.0` or `.255`.
fn skip_buggy(n: u128) -> u128 {
    match n & 0xff {
        0 => n + 1,
        0xff => n + 2,
        _ => n,
    }
}

/// How many addresses of the IPv4 interval `first..=last` end in `.0` or `.255`, by arithmetic.
pub(super) fn buggy_count(first: u128, last: u128) -> u128 {
    // In 0..=x there are x/256 + 1 addresses ending in .0 and (x + 1)/256 ending in .255.
    let upto = |x: u128| x / 256 + 1 + (x + 1) / 256;
    upto(last) - first.checked_sub(1).map_or(0, upto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buggy_addresses_are_counted_without_enumerating_them() {
        for (first, last) in [
            (0u128, 1000u128),
            (255, 256),
            (1, 254),
            (3, 700),
            (256, 511),
        ] {
            let slow = (first..=last).filter(|n| is_buggy(*n)).count() as u128;
            assert_eq!(buggy_count(first, last), slow, "{first}..={last}");
        }
    }

    #[test]
    fn taking_and_giving_back_keeps_intervals_merged() {
        let mut free = FreeSpace::new(&[(10, 20)], false);
        assert!(free.take(15));
        assert!(!free.take(15));
        assert_eq!(free.intervals(), 2);
        free.put_back(15);
        assert_eq!(free.intervals(), 1);
        assert_eq!(free.lowest(), Some(10));
    }

    #[test]
    fn buggy_only_stretches_are_dropped_when_met() {
        let mut free = FreeSpace::new(&[(255, 257)], true);
        assert_eq!(free.lowest(), Some(257));
        assert!(free.take(257));
        assert_eq!(free.lowest(), None);
    }

    #[test]
    fn the_top_of_the_ipv6_space_does_not_overflow() {
        let mut free = FreeSpace::new(&[(u128::MAX - 1, u128::MAX)], false);
        assert!(free.take(u128::MAX));
        free.put_back(u128::MAX);
        assert_eq!(free.intervals(), 1);
    }
}
