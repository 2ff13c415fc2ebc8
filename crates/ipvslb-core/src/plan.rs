//! Planning the IPVS table.
