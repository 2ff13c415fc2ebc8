//! The Linux IPVS table as data: virtual services, destinations, schedulers and forwarding methods
//! named as in the kernel's `ip_vs.h`, and [`diff`], the minimal ordered list of operations that
//! turns one table into another while touching only the services a caller owns.
//!
//! This crate knows nothing of Kubernetes. It must not depend on any Kubernetes crate: it is a
//! reusable IPVS library in its own right.

mod apply;
pub mod consts;
mod diff;
mod listing;
mod model;
#[cfg(target_os = "linux")]
pub mod netlink;

pub use apply::ApplyError;
pub use diff::{Op, OpKind, Owner, OwnsAll, Removal, diff};
pub use listing::Listing;
pub use model::*;
