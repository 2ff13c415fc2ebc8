//! What the director needs of a host's data plane, behind one trait: the kernel (IPVS over
//! netlink, VIP addresses over rtnetlink) on a real director, an in-memory table elsewhere.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ipvslb_ipvs::{Op, ServiceEntry, ServiceKey, Table};

/// A data-plane operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the table or one service failed.
    #[error("reading the IPVS table: {0}")]
    Read(String),
    /// Applying operations failed; `applied` of them took effect first.
    #[error("applying IPVS changes ({applied} applied before the failure): {message}")]
    Apply {
        /// How many operations took effect.
        applied: usize,
        /// What failed.
        message: String,
    },
    /// Reading or changing the VIP addresses failed.
    #[error("VIP address {address:?}: {message}")]
    Address {
        /// The address, when one was concerned.
        address: Option<IpAddr>,
        /// What failed.
        message: String,
    },
    /// The in-memory state was poisoned by a panic elsewhere.
    #[error("data plane state is unusable after an earlier failure")]
    Poisoned,
}

/// The director's view of one host's data plane. Calls may block (netlink): async callers run
/// them on a blocking thread.
pub trait Dataplane: Send + Sync + 'static {
    /// The whole IPVS table, with every service's destinations.
    fn dump(&self) -> Result<Table, Error>;
    /// One virtual service and its destinations, or `None` if the kernel has no such service.
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error>;
    /// Applies `ops` in order.
    fn apply(&self, ops: &[Op]) -> Result<(), Error>;
    /// The VIP addresses on the director's own interface.
    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error>;
    /// Adds a VIP address to the director's own interface.
    fn add_address(&self, address: IpAddr) -> Result<(), Error>;
    /// Removes a VIP address from the director's own interface.
    fn del_address(&self, address: IpAddr) -> Result<(), Error>;
    /// How many write requests were sent so far (to prove idempotence: a repeated sync adds 0).
    fn writes(&self) -> u64;
}

/// A data plane in memory: the same semantics as the kernel's table (adding an existing service
/// fails, and so on), for hosts without IPVS and for controller tests.
#[derive(Debug, Default)]
pub struct Memory {
    table: Mutex<Table>,
    addresses: Mutex<BTreeSet<IpAddr>>,
    writes: AtomicU64,
}

impl Memory {
    /// A snapshot of the table.
    pub fn table(&self) -> Result<Table, Error> {
        self.table
            .lock()
            .map(|t| t.clone())
            .map_err(|_| Error::Poisoned)
    }
}

impl Dataplane for Memory {
    fn dump(&self) -> Result<Table, Error> {
        self.table()
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error> {
        let table = self.table.lock().map_err(|_| Error::Poisoned)?;
        Ok(table.services.get(key).cloned())
    }

    fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        let mut table = self.table.lock().map_err(|_| Error::Poisoned)?;
        for (applied, op) in ops.iter().enumerate() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            table.apply(op).map_err(|e| Error::Apply {
                applied,
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        self.addresses
            .lock()
            .map(|a| a.clone())
            .map_err(|_| Error::Poisoned)
    }

    fn add_address(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut addresses = self.addresses.lock().map_err(|_| Error::Poisoned)?;
        addresses.insert(address);
        Ok(())
    }

    fn del_address(&self, address: IpAddr) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut addresses = self.addresses.lock().map_err(|_| Error::Poisoned)?;
        addresses.remove(&address);
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// A shared data plane is a data plane: tests keep a handle on the one the director writes to.
impl<D: Dataplane> Dataplane for std::sync::Arc<D> {
    fn dump(&self) -> Result<Table, Error> {
        (**self).dump()
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, Error> {
        (**self).service(key)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        (**self).apply(ops)
    }

    fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        (**self).addresses()
    }

    fn add_address(&self, address: IpAddr) -> Result<(), Error> {
        (**self).add_address(address)
    }

    fn del_address(&self, address: IpAddr) -> Result<(), Error> {
        (**self).del_address(address)
    }

    fn writes(&self) -> u64 {
        (**self).writes()
    }
}
