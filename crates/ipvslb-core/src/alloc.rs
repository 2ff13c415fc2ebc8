//! VIP allocation.
