//! ipvslb: bare-metal LoadBalancer Services for Kubernetes, with Linux IPVS.
//!
//! The binary's library half: the controllers (`allocator`, `director`), the translation of
//! Kubernetes objects into the core's types, `plan`, and the data-plane seam. `main.rs` only
//! parses the command line.

pub mod allocator;
pub mod converge;
pub mod dataplane;
pub mod director;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod translate;

use translate::Unclassed;

/// Which Services ipvslb serves.
#[derive(clap::Args)]
pub struct ClassArgs {
    /// The `spec.loadBalancerClass` this ipvslb serves.
    #[arg(long, env = "IPVSLB_LOAD_BALANCER_CLASS", default_value = ipvslb_api::LOAD_BALANCER_CLASS)]
    pub load_balancer_class: String,
    /// LoadBalancer Services without a class: serve them, or leave them to another implementation.
    #[arg(long, env = "IPVSLB_UNCLASSED_SERVICES", value_enum, default_value_t = Unclassed::Serve)]
    pub unclassed_services: Unclassed,
}

/// Aborts a spawned task when dropped, so a task's helpers end with it.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
