//! Developer tasks of ipvslb as a library, so that tests reuse them: the CRD generator and the
//! API server harness. The `xtask` binary (`cargo xtask <task>`) is a thin front end.

pub mod apiserver;
pub mod crds;
