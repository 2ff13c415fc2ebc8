//! Applying one [`Op`] to a [`Table`] in memory, with the kernel's rules: the stand-in for the
//! kernel in tests and on hosts without IPVS.

use std::collections::btree_map::Entry;

use crate::diff::{Op, OpKind};
use crate::model::{
    DestKey, Destination, ListOrder, ServiceEntry, ServiceFlags, ServiceKey, Table, VirtualService,
};

/// An operation the kernel would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The service to add is already there (the kernel's `EEXIST`).
    #[error("adding virtual service {0}: it already exists")]
    ServiceExists(ServiceKey),
    /// The service named by the operation is not there (the kernel's `ESRCH`).
    #[error("{op} failed: virtual service {key} does not exist")]
    NoSuchService {
        /// What was being done.
        op: OpKind,
        /// The missing service.
        key: ServiceKey,
    },
    /// The destination to add is already there (the kernel's `EEXIST`).
    #[error("adding destination {dest} to {service}: it already exists")]
    DestinationExists {
        /// The service.
        service: ServiceKey,
        /// The destination.
        dest: DestKey,
    },
    /// The destination named by the operation is not there (the kernel's `ENOENT`).
    #[error("{op} {dest} of {service}: no such destination")]
    NoSuchDestination {
        /// What was being done.
        op: OpKind,
        /// The service.
        service: ServiceKey,
        /// The missing destination.
        dest: DestKey,
    },
    /// The destination's settings are out of the kernel's range (the kernel's `ERANGE`).
    #[error("{op} {dest} of {service}: {reason}")]
    OutOfRange {
        /// What was being done.
        op: OpKind,
        /// The service.
        service: ServiceKey,
        /// The destination.
        dest: DestKey,
        /// Which setting is out of range.
        reason: String,
    },
}

impl Table {
    /// Applies `op` as the kernel would, or leaves the table unchanged and says why the kernel
    /// would refuse it.
    ///
    /// Like the kernel, this refuses to add what exists and to edit or delete what does not, and
    /// refuses a destination whose weight does not fit the kernel's signed 32-bit field or whose
    /// lower threshold is above its upper one. [`ServiceFlags::HASHED`] is never stored: it is
    /// kernel bookkeeping, not a setting. Deleting a service deletes its destinations. A destination
    /// is added at the head of its service's list, as the kernel adds it.
    pub fn apply(&mut self, op: &Op) -> Result<(), ApplyError> {
        match op {
            Op::AddService(service) => match self.services.entry(service.key) {
                Entry::Occupied(_) => Err(ApplyError::ServiceExists(service.key)),
                Entry::Vacant(slot) => {
                    slot.insert(ServiceEntry::new(stored(service)));
                    Ok(())
                }
            },
            Op::EditService(service) => {
                self.entry(op.kind(), &service.key)?.service = stored(service);
                Ok(())
            }
            Op::DelService(key) => match self.services.remove(key) {
                Some(_) => Ok(()),
                None => Err(ApplyError::NoSuchService {
                    op: op.kind(),
                    key: *key,
                }),
            },
            Op::AddDest(key, dest) => {
                check_range(op.kind(), key, dest)?;
                let entry = self.entry(op.kind(), key)?;
                // The kernel adds at the head of the list (`list_add_rcu`).
                let mut order = entry.list_order();
                match entry.destinations.entry(dest.key()) {
                    Entry::Occupied(_) => Err(ApplyError::DestinationExists {
                        service: *key,
                        dest: dest.key(),
                    }),
                    Entry::Vacant(slot) => {
                        slot.insert(dest.clone());
                        order.insert(0, dest.key());
                        entry.order = ListOrder::Listed(order);
                        Ok(())
                    }
                }
            }
            Op::EditDest(key, dest) => {
                check_range(op.kind(), key, dest)?;
                let entry = self.entry(op.kind(), key)?;
                match entry.destinations.get_mut(&dest.key()) {
                    Some(slot) => {
                        *slot = dest.clone();
                        Ok(())
                    }
                    None => Err(no_such_destination(op.kind(), key, dest)),
                }
            }
            Op::DelDest(key, dest) => {
                let entry = self.entry(op.kind(), key)?;
                let mut order = entry.list_order();
                match entry.destinations.remove(&dest.key()) {
                    Some(_) => {
                        entry.destination_stats.remove(&dest.key());
                        order.retain(|k| *k != dest.key());
                        entry.order = ListOrder::Listed(order);
                        Ok(())
                    }
                    None => Err(no_such_destination(op.kind(), key, dest)),
                }
            }
        }
    }

    /// The service `key`, which `op` needs to exist.
    fn entry(&mut self, op: OpKind, key: &ServiceKey) -> Result<&mut ServiceEntry, ApplyError> {
        self.services
            .get_mut(key)
            .ok_or(ApplyError::NoSuchService { op, key: *key })
    }
}

/// The service as the table keeps it.
fn stored(service: &VirtualService) -> VirtualService {
    VirtualService {
        flags: service.flags.without(ServiceFlags::HASHED),
        ..service.clone()
    }
}

fn no_such_destination(op: OpKind, service: &ServiceKey, dest: &Destination) -> ApplyError {
    ApplyError::NoSuchDestination {
        op,
        service: *service,
        dest: dest.key(),
    }
}

/// The kernel's range checks on a destination's settings (`ip_vs_add_dest`, `ip_vs_edit_dest`).
fn check_range(op: OpKind, service: &ServiceKey, dest: &Destination) -> Result<(), ApplyError> {
    let reason = if i32::try_from(dest.weight).is_err() {
        format!("weight {} is above {}", dest.weight, i32::MAX)
    } else if dest.lower_threshold > dest.upper_threshold {
        format!(
            "lower threshold {} is above upper threshold {}",
            dest.lower_threshold, dest.upper_threshold
        )
    } else {
        return Ok(());
    };
    Err(ApplyError::OutOfRange {
        op,
        service: *service,
        dest: dest.key(),
        reason,
    })
}
