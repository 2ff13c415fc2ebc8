//! ipvslb API types.
