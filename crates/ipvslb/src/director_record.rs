//! The `Director` resource of this director (`kubectl get directors`): its readiness,
//! announcement mode, VIPs held and announced, IPVS table size, last full pass and drift
//! repaired; and an Event on each Service whose VIP this director starts or stops announcing.
//! Written when something in it changes (at most every [`COALESCE`]), never on a timer: a quiet
//! director costs the API server nothing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipvslb_api::{Director, DirectorSpec, DirectorStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cached::CachedService;
use crate::election::Election;
use crate::translate;

/// The field manager of the director's writes of its record.
const MANAGER: &str = "ipvslb-director";

/// How long changes are gathered into one write.
pub const COALESCE: Duration = Duration::from_millis(200);

/// What a full pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// The VIPs on the director's interface.
    pub vips: u64,
    /// The virtual services it owns.
    pub virtual_services: u64,
    /// Their destinations.
    pub destinations: u64,
    /// When it ended.
    pub finished: Option<Timestamp>,
    /// Kernel writes full passes made to repair drift, since the start.
    pub repairs: u64,
}

/// Where the record's parts come from.
pub struct Sources {
    /// Whether announcements are open (the director is ready).
    pub open: watch::Receiver<bool>,
    /// The VIPs announced.
    pub announced: watch::Receiver<BTreeSet<IpAddr>>,
    /// The live directors, in `L2` mode.
    pub election: watch::Receiver<Election>,
    /// The latest full pass.
    pub pass: watch::Receiver<Pass>,
}

/// Keeps the `Director` named `name` current until `shutdown`.
pub async fn run(
    client: Client,
    name: String,
    spec: DirectorSpec,
    mut sources: Sources,
    services: Store<CachedService>,
    recorder: Recorder,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Director> = Api::all(client);
    let mut written: Option<DirectorStatus> = None;
    let mut spec_written = false;
    let mut told: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        let status = status_of(&mut sources);
        let announcing = sources.announced.borrow().clone();
        tell(
            &services,
            &recorder,
            &name,
            &describe(&spec),
            &told,
            &announcing,
        )
        .await;
        told = announcing;
        if !spec_written {
            spec_written = write_spec(&api, &name, &spec).await;
        }
        if spec_written
            && written.as_ref() != Some(&status)
            && write_status(&api, &name, &status).await
        {
            written = Some(status);
        }
        let retry = !spec_written || written.is_none();
        tokio::select! {
            _ = sources.open.changed() => {}
            _ = sources.announced.changed() => {}
            _ = sources.election.changed() => {}
            _ = sources.pass.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)), if retry => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(COALESCE).await;
    }
}

fn status_of(sources: &mut Sources) -> DirectorStatus {
    let pass = sources.pass.borrow_and_update().clone();
    let election = sources.election.borrow_and_update().clone();
    let announced = sources.announced.borrow_and_update().clone();
    DirectorStatus {
        ready: *sources.open.borrow_and_update(),
        vips: pass.vips,
        announcing: listed(&announced),
        announced: announced.len() as u64,
        virtual_services: pass.virtual_services,
        destinations: pass.destinations,
        last_full_pass: pass.finished.map(Time),
        drift_repaired: pass.repairs,
        peers: election.live.into_iter().collect(),
    }
}

/// At most this many VIPs are listed in `status.announcing`; the count says how many in all.
pub const MAX_LISTED: usize = 32;

/// The VIPs, comma-separated, cut at [`MAX_LISTED`] with how many more.
fn listed(vips: &BTreeSet<IpAddr>) -> String {
    let mut text = vips
        .iter()
        .take(MAX_LISTED)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if vips.len() > MAX_LISTED {
        text.push_str(&format!(",+{} more", vips.len() - MAX_LISTED));
    }
    text
}

fn describe(spec: &DirectorSpec) -> String {
    match &spec.interface {
        Some(interface) => format!("{} on {interface}", spec.announce),
        None => spec.announce.to_string(),
    }
}

async fn write_spec(api: &Api<Director>, name: &str, spec: &DirectorSpec) -> bool {
    let object = serde_json::json!({
        "apiVersion": "ipvslb.io/v1alpha1",
        "kind": "Director",
        "metadata": { "name": name },
        "spec": spec,
    });
    let params = PatchParams::apply(MANAGER).force();
    match api.patch(name, &params, &Patch::Apply(&object)).await {
        Ok(_) => true,
        Err(e) => {
            warn!(director = %name, error = %e, "writing the Director resource failed; retrying");
            false
        }
    }
}

async fn write_status(api: &Api<Director>, name: &str, status: &DirectorStatus) -> bool {
    let object = serde_json::json!({
        "apiVersion": "ipvslb.io/v1alpha1",
        "kind": "Director",
        "metadata": { "name": name },
        "status": status,
    });
    let params = PatchParams::apply(MANAGER).force();
    match api
        .patch_status(name, &params, &Patch::Apply(&object))
        .await
    {
        Ok(_) => {
            debug!(director = %name, "Director status written");
            true
        }
        Err(e) => {
            warn!(director = %name, error = %e, "writing the Director status failed; retrying");
            false
        }
    }
}

/// Publishes a Normal Event on each Service holding a VIP that this director started
/// (`announcing` but not `told`) or stopped announcing. One pass over the Services, however
/// many VIPs changed.
async fn tell(
    services: &Store<CachedService>,
    recorder: &Recorder,
    name: &str,
    what: &str,
    told: &BTreeSet<IpAddr>,
    announcing: &BTreeSet<IpAddr>,
) {
    let changed: BTreeSet<IpAddr> = told.symmetric_difference(announcing).copied().collect();
    if changed.is_empty() {
        return;
    }
    for cached in services.state() {
        let service = cached.to_service();
        for vip in translate::ingress_addresses(&service)
            .into_iter()
            .filter(|v| changed.contains(v))
        {
            let (reason, note) = if announcing.contains(&vip) {
                (
                    "Announced",
                    format!("{vip} announced by director {name} ({what})"),
                )
            } else {
                (
                    "Withdrawn",
                    format!("{vip} no longer announced by director {name}"),
                )
            };
            let event = Event {
                type_: EventType::Normal,
                reason: reason.to_owned(),
                note: Some(note),
                action: "Announce".to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &service.object_ref(&())).await {
                warn!(service = %translate::service_name(&service), error = %e, reason, "could not publish an event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcing_column_lists_a_few_vips_and_counts_the_rest() {
        let few: BTreeSet<IpAddr> =
            ["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()].into();
        assert_eq!(listed(&few), "10.0.0.1,10.0.0.2");
        let many: BTreeSet<IpAddr> = (0..40u8).map(|i| IpAddr::from([10, 0, 1, i])).collect();
        let text = listed(&many);
        assert!(text.ends_with(",+8 more"), "{text}");
        assert_eq!(text.split(',').count(), MAX_LISTED + 1);
    }
}
