//! ipvslb's decisions, as pure functions over plain data: which Service gets which VIP
//! ([`alloc`]), and which IPVS table each director must hold ([`plan`]).
//!
//! Sans-IO: this crate must not import tokio, a Kubernetes client, or open a socket or a file.
//! Time, when needed, comes in as an argument; results go out as data for the caller to act on.

pub mod alloc;
pub mod health;
pub mod model;
pub mod plan;
pub mod range;
pub mod selector;

pub use model::*;
pub use range::{IpRange, RangeError};
pub use selector::{Requirement, Selector};
