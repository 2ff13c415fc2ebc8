//! `ipvslb director retire`: takes a director out of service. Removes every IPVS virtual
//! service and VIP address this director owns (an address in some IPPool or on its own
//! interface) and nothing else, and says what it removed. Run it after stopping the director,
//! or the director puts everything back.

use std::fmt::Write as _;
use std::path::PathBuf;

use ipvslb_api::IPPool;
use kube::Api;
use kube::api::ListParams;

use crate::converge::{Converger, Owned, Retired};
use crate::dataplane::Dataplane;

/// `ipvslb director retire` options.
#[derive(clap::Args)]
pub struct RetireArgs {
    /// The director's VIP interface.
    #[arg(long, env = "IPVSLB_INTERFACE", default_value = ipvslb_ipvs::netlink::DEFAULT_INTERFACE)]
    interface: String,
    /// A kubeconfig file, to read the IPPools; without one, KUBECONFIG, ~/.kube/config or the
    /// in-cluster account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Do not read the IPPools: own only what is on the interface (when the cluster is gone).
    #[arg(long)]
    no_cluster: bool,
    /// The director's announce interface, if it had one: its announcements are withdrawn too.
    #[arg(long, env = "IPVSLB_ANNOUNCE_INTERFACE")]
    announce_interface: Option<String>,
    /// The load-balancer class this director served: only that class's pools are its own.
    #[arg(long, env = "IPVSLB_LOAD_BALANCER_CLASS", default_value = ipvslb_api::LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
}

/// Retires this host's director; returns what it removed, as lines for people.
pub async fn retire(args: RetireArgs) -> Result<String, String> {
    let owned = if args.no_cluster {
        Owned::default()
    } else {
        pools(args.kubeconfig.as_ref(), &args.load_balancer_class)
            .await
            .map_err(|e| {
                format!(
                    "{e} (with --no-cluster, only what is on {} is removed)",
                    args.interface
                )
            })?
    };
    let kernel = crate::dataplane::Kernel::open_existing(&args.interface)
        .map_err(|e| format!("opening the kernel data plane: {e}"))?;
    let kernel = match &args.announce_interface {
        Some(announce) => kernel
            .announcing_on_existing(announce)
            .map_err(|e| format!("opening the announce interface: {e}"))?,
        None => kernel,
    };
    let interface = args.interface.clone();
    tokio::task::spawn_blocking(move || retire_on(kernel, &owned, &interface))
        .await
        .map_err(|e| format!("the data-plane task failed: {e}"))?
}

/// The ranges of the pools of `class`: what the director owns besides its interface. Another
/// class's pools belong to another installation, even on the same host.
async fn pools(kubeconfig: Option<&PathBuf>, class: &str) -> Result<Owned, String> {
    let client = crate::run::client(kubeconfig).await?;
    let pools = Api::<IPPool>::all(client)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing the IPPools: {e}"))?;
    Ok(Owned::new(
        pools
            .items
            .iter()
            .filter(|p| crate::translate::pool_class(p) == class)
            .flat_map(|p| {
                crate::translate::pool_for(
                    p,
                    &crate::translate::ClassPolicy {
                        class: class.to_owned(),
                        unclassed: crate::translate::Unclassed::Ignore,
                    },
                )
                .0
                .ranges
            })
            .collect(),
    ))
}

/// What was removed, one line each; an error when the kernel refused part of it.
fn describe(retired: &Retired, interface: &str) -> Result<String, String> {
    let mut text = String::new();
    for key in &retired.services {
        if !retired.failures.iter().any(|f| f.key == *key) {
            let _ = writeln!(text, "removed virtual service {key}");
        }
    }
    for address in &retired.addresses {
        let _ = writeln!(text, "removed address {address} from {interface}");
    }
    for address in &retired.announced {
        let _ = writeln!(text, "withdrew the announcement of {address}");
    }
    if retired.services.is_empty() && retired.addresses.is_empty() && retired.announced.is_empty() {
        text.push_str("nothing of this director's was left\n");
    }
    if retired.failures.is_empty() {
        return Ok(text);
    }
    for failure in &retired.failures {
        let _ = writeln!(
            text,
            "could not remove virtual service {}: {}",
            failure.key, failure.message
        );
    }
    Err(text)
}

/// Retires over any data plane: the seam the command and its tests share.
pub fn retire_on<D: Dataplane>(
    dataplane: D,
    owned: &Owned,
    interface: &str,
) -> Result<String, String> {
    let retired = Converger::new(dataplane, std::time::Duration::ZERO)
        .retire(owned)
        .map_err(|e| format!("retiring: {e}"))?;
    describe(&retired, interface)
}
