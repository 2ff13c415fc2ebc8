//! The minimal ordered operations that turn one table into another.

use crate::model::{Destination, ServiceKey, Table, VirtualService};

/// Which services a caller owns; [`diff`] never emits an operation on any other.
pub trait Owner {
    /// Whether the service `key` is the caller's to change.
    fn owns(&self, key: &ServiceKey) -> bool;
}

impl<F: Fn(&ServiceKey) -> bool> Owner for F {
    fn owns(&self, key: &ServiceKey) -> bool {
        self(key)
    }
}

/// What to do with a destination that the desired table no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Delete it now.
    Delete,
    /// First set its weight to 0 (established connections finish); delete it once it is at 0.
    Drain,
}

/// One change to the kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(VirtualService),
    /// `IPVS_CMD_SET_SERVICE`.
    EditService(VirtualService),
    /// `IPVS_CMD_DEL_SERVICE` (its destinations go with it).
    DelService(ServiceKey),
    /// `IPVS_CMD_NEW_DEST`.
    AddDest(ServiceKey, Destination),
    /// `IPVS_CMD_SET_DEST`.
    EditDest(ServiceKey, Destination),
    /// `IPVS_CMD_DEL_DEST`.
    DelDest(ServiceKey, Destination),
}

/// The ordered operations that turn `actual` into `desired` for the services `owner` owns.
pub fn diff(actual: &Table, desired: &Table, owner: &impl Owner, removal: Removal) -> Vec<Op> {
    let _ = (actual, desired, owner, removal);
    todo!("implemented with the table diff")
}
