//! The `L2` announcement channel: the host's own interface on the clients' segment.
//!
//! Every VIP sits on ipvslb's dummy interface, where IPVS serves it; Linux would answer ARP
//! for it on every interface of the host, so two directors on one segment would both claim
//! every VIP. On the segment's interface ipvslb therefore sets `arp_ignore=1` (answer ARP only
//! for an address configured on the interface the request came in on) and `arp_announce=2`
//! (never use a VIP as the source of this host's own ARP requests, which would claim it
//! too), and puts there only the VIPs this director is elected for, as host addresses. IPv6
//! needs no setting: Linux answers a neighbour solicitation only for an address on the asking
//! interface. A VIP put there is announced at once with a gratuitous ARP or an unsolicited
//! neighbour advertisement, and again [`REPEATS`] later, as long as this director holds it, so
//! that a host that missed one packet (or whose cache was mid-probe) still moves (Linux ignores
//! a gratuitous ARP that comes within `locktime`, 1 s, of the entry's last update).
//!
//! The addresses on the segment live [`LIFETIME`] unless refreshed, and a thread refreshes
//! them every [`REFRESH`] while this process holds them: a director killed outright stops
//! answering for its VIPs within about two seconds by the kernel's own hand, as its peers take
//! over its Lease, instead of answering beside them until someone cleans up.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipvslb_ipvs::netlink::{Announcer, Vips};
use tracing::warn;

use crate::dataplane::Error;

/// The delays between the announcements of a VIP after the first one (keepalived sends five
/// gratuitous ARPs by default; these spread four more over 3.75 s).
pub const REPEATS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How long a VIP stays on the segment's interface without a refresh, in seconds (the
/// kernel checks lifetimes to the second).
pub const LIFETIME: u32 = 1;

/// How often the VIPs held are refreshed.
pub const REFRESH: Duration = Duration::from_millis(250);

/// The `net.ipv4.conf.<interface>` settings of the segment's interface, and why.
pub const ARP_SYSCTLS: [(&str, &str); 2] = [("arp_ignore", "1"), ("arp_announce", "2")];

/// The host's interface on the segment, and what is announced on it.
pub struct Segment {
    addresses: Arc<Mutex<Vips>>,
    /// Until when this director may answer for its VIPs (its Lease's deadline): past it, the
    /// keeper withdraws them itself, whatever else is stuck.
    valid_until: Arc<Mutex<Option<Instant>>>,
    /// The VIPs this director holds on the segment now: the repeats stop once one is released.
    held: Arc<Mutex<BTreeSet<IpAddr>>>,
    neighbours: Arc<Announcer>,
    repeats: mpsc::Sender<IpAddr>,
    interface: String,
}

impl Segment {
    /// Opens the existing interface `interface` and sets its ARP behaviour.
    pub fn open(interface: &str) -> Result<Self, Error> {
        let failed = |message: String| Error::Address {
            address: None,
            message: format!("l2 interface {interface}: {message}"),
        };
        let (vips, mac) =
            Vips::open_shared(interface, LIFETIME).map_err(|e| failed(e.to_string()))?;
        let mac = mac.ok_or_else(|| failed("it has no Ethernet address".to_owned()))?;
        for (name, value) in ARP_SYSCTLS {
            let path = format!("/proc/sys/net/ipv4/conf/{interface}/{name}");
            // Already set (by the host, where /proc/sys is read-only to ipvslb): nothing to do.
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
                continue;
            }
            std::fs::write(&path, value).map_err(|e| {
                failed(format!(
                    "writing {value} to {path}: {e} (set net.ipv4.conf.{interface}.{name}={value} on the host)"
                ))
            })?;
        }
        // arp_ignore takes the highest of `all` and the interface's: 2 and above would answer
        // only senders inside the VIP's own /32, that is nobody.
        if let Ok(all) = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_ignore")
            && all.trim().parse::<u8>().is_ok_and(|v| v > 1)
        {
            warn!(all = all.trim(), %interface, "net.ipv4.conf.all.arp_ignore is above 1: no director will answer ARP for the VIPs; set it to 0 or 1");
        }
        let neighbours = Arc::new(
            Announcer::open(vips.index(), mac)
                .map_err(|e| failed(format!("opening a packet socket: {e}")))?,
        );
        let held = Arc::new(Mutex::new(BTreeSet::new()));
        let (repeats, pending) = mpsc::channel();
        let addresses = Arc::new(Mutex::new(vips));
        let valid_until = Arc::new(Mutex::new(None));
        let keeper = Keeper {
            neighbours: neighbours.clone(),
            held: held.clone(),
            addresses: addresses.clone(),
            valid_until: valid_until.clone(),
            interface: interface.to_owned(),
        };
        std::thread::Builder::new()
            .name("ipvslb-segment".to_owned())
            .spawn(move || keeper.run(&pending))
            .map_err(|e| failed(format!("starting the announcement thread: {e}")))?;
        Ok(Self {
            addresses,
            valid_until,
            held,
            neighbours,
            repeats,
            interface: interface.to_owned(),
        })
    }

    /// The interface's addresses.
    pub fn addresses(&self) -> &Mutex<Vips> {
        &self.addresses
    }

    /// The VIPs this process put on the interface and has not released.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Until when this director may answer (`None`: not at all).
    pub fn hold_until(&self, until: Option<Instant>) {
        if let Ok(mut valid) = self.valid_until.lock() {
            *valid = until;
        }
    }

    /// Puts `vip` on the interface and tells the segment at once, and again later. An address
    /// the host itself has there (permanent) is refused, never taken over.
    pub fn claim(&self, vip: IpAddr) -> Result<(), String> {
        {
            let mut addresses = self.addresses.lock().map_err(|_| "poisoned".to_owned())?;
            if !addresses.add(vip).map_err(|e| e.to_string())? {
                if !addresses.list().map_err(|e| e.to_string())?.contains(&vip) {
                    return Err(format!(
                        "{vip} is an address of the host's own on {}: not taken over",
                        self.interface
                    ));
                }
                // Left by an earlier process, about to expire: a lifetime of its own now.
                addresses.refresh(vip).map_err(|e| e.to_string())?;
            }
        }
        if let Ok(mut held) = self.held.lock() {
            held.insert(vip);
        }
        if let Err(e) = self.neighbours.announce(vip) {
            warn!(%vip, interface = %self.interface, error = %e, "sending the neighbour announcement failed");
        }
        let _ = self.repeats.send(vip);
        Ok(())
    }

    /// Takes `vip` off the interface; first no more announcements or refreshes of it (once
    /// those stop, none under way can put it back).
    pub fn release(&self, vip: IpAddr) -> Result<(), String> {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&vip);
        }
        let mut addresses = self.addresses.lock().map_err(|_| "poisoned".to_owned())?;
        addresses.remove(vip).map(drop).map_err(|e| e.to_string())
    }
}

/// The thread that repeats the announcements and refreshes the addresses' lifetimes.
struct Keeper {
    neighbours: Arc<Announcer>,
    held: Arc<Mutex<BTreeSet<IpAddr>>>,
    addresses: Arc<Mutex<Vips>>,
    valid_until: Arc<Mutex<Option<Instant>>>,
    interface: String,
}

impl Keeper {
    /// Runs until the segment is dropped.
    fn run(&self, pending: &mpsc::Receiver<IpAddr>) {
        // (when, VIP, how many repeats are done)
        let mut due: Vec<(Instant, IpAddr, usize)> = Vec::new();
        let mut refresh = Instant::now() + REFRESH;
        loop {
            let next = due.iter().map(|(at, _, _)| *at).fold(refresh, Instant::min);
            match pending.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(vip) => due.push((Instant::now() + REPEATS[0], vip, 0)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if now >= refresh {
                self.refresh();
                refresh = now + REFRESH;
            }
            due = due
                .into_iter()
                .filter_map(|(at, vip, done)| {
                    if at > now {
                        return Some((at, vip, done));
                    }
                    if !self.held.lock().is_ok_and(|h| h.contains(&vip)) {
                        return None;
                    }
                    self.announce(vip);
                    REPEATS
                        .get(done + 1)
                        .map(|delay| (now + *delay, vip, done + 1))
                })
                .collect();
        }
    }

    /// Gives every VIP held another lifetime, or, once this director's claim has lapsed
    /// (its Lease could not be renewed, the task keeping it is gone), takes them all off. The
    /// set stays locked meanwhile, so a VIP being withdrawn is either refreshed before it goes
    /// or not at all.
    fn refresh(&self) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        let Ok(mut addresses) = self.addresses.lock() else {
            return;
        };
        let valid = self
            .valid_until
            .lock()
            .is_ok_and(|v| v.is_some_and(|until| Instant::now() < until));
        if !valid {
            if !held.is_empty() {
                warn!(vips = ?*held, interface = %self.interface, "this director's claim lapsed: no longer answering for its VIPs");
            }
            for vip in std::mem::take(&mut *held) {
                if let Err(e) = addresses.remove(vip) {
                    warn!(%vip, interface = %self.interface, error = %e, "taking the VIP off the segment failed; it expires by itself");
                }
            }
            return;
        }
        for vip in held.iter() {
            if let Err(e) = addresses.refresh(*vip) {
                warn!(%vip, interface = %self.interface, error = %e, "refreshing the VIP on the segment failed");
            }
        }
    }

    fn announce(&self, vip: IpAddr) {
        if let Err(e) = self.neighbours.announce(vip) {
            warn!(%vip, interface = %self.interface, error = %e, "sending the neighbour announcement failed");
        }
    }
}
