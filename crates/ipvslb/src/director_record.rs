//! The `Director` resource of this director (`kubectl get directors`): its readiness,
//! announcement mode, VIPs held and announced, IPVS table size, last full pass and drift
//! repaired; and an Event on each Service whose VIP this director starts or stops announcing.
//! Written when something in it changes (at most every [`COALESCE`]), never on a timer: a quiet
//! director costs the API server nothing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipvslb_api::{Announce, Director, DirectorSpec, DirectorStatus};
use k8s_openapi::api::core::v1::Service;
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

/// How long a refused write waits before it is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

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
    let api: Api<Director> = Api::all(client.clone());
    let mut written: Option<DirectorStatus> = None;
    let mut spec_written = false;
    let mut told: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        let status = status_of(&mut sources);
        let announcing = sources.announced.borrow().clone();
        tell(
            &client,
            &services,
            &recorder,
            spec.announce,
            &name,
            &describe(&spec),
            &told,
            &announcing,
        )
        .await;
        told = announcing;
        if !spec_written {
            spec_written = write(&api, &name, Part::Spec, serde_json::json!(spec)).await;
        }
        let mut refused = !spec_written;
        if spec_written && written.as_ref() != Some(&status) {
            if write(&api, &name, Part::Status, serde_json::json!(status)).await {
                written = Some(status);
            } else {
                refused = true;
            }
        }
        // A refused write waits a while, whatever changes meanwhile: one warning every few
        // seconds, not one per change.
        if refused {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            continue;
        }
        tokio::select! {
            _ = sources.open.changed() => {}
            _ = sources.announced.changed() => {}
            _ = sources.election.changed() => {}
            _ = sources.pass.changed() => {}
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

/// The part of the Director one write applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Spec,
    Status,
}

/// Applies `value` as the Director's `part` (server-side apply, this director's field
/// manager); whether it took.
async fn write(api: &Api<Director>, name: &str, part: Part, value: serde_json::Value) -> bool {
    let field = match part {
        Part::Spec => "spec",
        Part::Status => "status",
    };
    let object = serde_json::json!({
        "apiVersion": "ipvslb.io/v1alpha1",
        "kind": "Director",
        "metadata": { "name": name },
        field: value,
    });
    let (params, patch) = (PatchParams::apply(MANAGER).force(), Patch::Apply(&object));
    let written = match part {
        Part::Spec => api.patch(name, &params, &patch).await,
        Part::Status => api.patch_status(name, &params, &patch).await,
    };
    match written {
        Ok(_) => {
            debug!(director = %name, field, "Director written");
            true
        }
        Err(e) => {
            warn!(director = %name, field, error = %e, "writing the Director resource failed; retrying");
            false
        }
    }
}

/// Publishes a Normal Event on each Service holding a VIP that this director started
/// (`announcing` but not `told`) or stopped announcing. One pass over the Services, however
/// many VIPs changed.
#[allow(
    clippy::too_many_arguments,
    reason = "the Events and the condition share one pass"
)]
async fn tell(
    client: &Client,
    services: &Store<CachedService>,
    recorder: &Recorder,
    mode: Announce,
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
        let mine: Vec<(IpAddr, bool)> = translate::ingress_addresses(&service)
            .into_iter()
            .filter(|v| changed.contains(v))
            .map(|v| (v, announcing.contains(&v)))
            .collect();
        if !mine.is_empty() {
            set_condition(client, &service, name, mode, &mine).await;
        }
    }
}

/// The Service condition saying which directors announce its VIPs.
pub const CONDITION: &str = "ipvslb.io/Announced";

/// Who announces each VIP, as the condition's message says it: `10.240.0.225 by dir1;
/// fd00:240::224 by dir2, dir3` (sorted), or `none` when no VIP is announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcers(std::collections::BTreeMap<IpAddr, BTreeSet<String>>);

impl Announcers {
    /// Reads a message this module wrote; anything else reads as nobody.
    pub fn parse(message: &str) -> Self {
        let mut map = std::collections::BTreeMap::new();
        for part in message.split("; ") {
            let Some((vip, directors)) = part.split_once(" by ") else {
                continue;
            };
            let Ok(vip) = vip.parse::<IpAddr>() else {
                continue;
            };
            let names: BTreeSet<String> = directors
                .split(", ")
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect();
            if !names.is_empty() {
                map.insert(vip, names);
            }
        }
        Self(map)
    }

    /// `director` now announces `vip` (`true`) or not. In L2 mode it is the only one: whoever
    /// was named before (a director that died, say) is not any more.
    pub fn set(&mut self, vip: IpAddr, director: &str, announces: bool, mode: Announce) {
        let names = self.0.entry(vip).or_default();
        if announces {
            if mode == Announce::L2 {
                names.clear();
            }
            names.insert(director.to_owned());
        } else {
            names.remove(director);
        }
        if names.is_empty() {
            self.0.remove(&vip);
        }
    }

    /// Whether some VIP is announced.
    pub fn any(&self) -> bool {
        !self.0.is_empty()
    }

    /// The message.
    pub fn message(&self) -> String {
        if self.0.is_empty() {
            return "none".to_owned();
        }
        self.0
            .iter()
            .map(|(vip, names)| {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{vip} by {}", names.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Updates the condition of `service` for the VIPs of `changes`: read, changed and written
/// under its resourceVersion, so that two directors never lose each other's part.
async fn set_condition(
    client: &Client,
    service: &Service,
    director: &str,
    mode: Announce,
    changes: &[(IpAddr, bool)],
) {
    let (Some(namespace), Some(name)) = (
        service.metadata.namespace.as_deref(),
        service.metadata.name.as_deref(),
    ) else {
        return;
    };
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let failed = |what: &str, e: &kube::Error| {
        warn!(service = %format!("{namespace}/{name}"), error = %e, "{what} the Service's Announced condition failed");
    };
    // A conflict is another director's write in between: read again.
    for _ in 0..5 {
        let current = match api.get_status(name).await {
            Ok(current) => current,
            Err(e) => return failed("reading", &e),
        };
        let conditions = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let before = conditions.iter().find(|c| c.type_ == CONDITION);
        let mut announcers = before
            .map(|c| Announcers::parse(&c.message))
            .unwrap_or_default();
        for (vip, announces) in changes {
            announcers.set(*vip, director, *announces, mode);
        }
        let status = if announcers.any() { "True" } else { "False" };
        let message = announcers.message();
        if before.is_some_and(|c| c.status == status && c.message == message) {
            return;
        }
        let since = match before {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(Timestamp::now()),
        };
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": current.metadata.resource_version },
            "status": { "conditions": [{
                "type": CONDITION,
                "status": status,
                "reason": if announcers.any() { "Announced" } else { "NotAnnounced" },
                "message": message,
                "lastTransitionTime": since,
                "observedGeneration": current.metadata.generation,
            }]},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return failed("writing", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_names_each_vips_announcers_and_l2_keeps_only_the_latest() {
        let v4: IpAddr = "10.240.0.225".parse().unwrap();
        let v6: IpAddr = "fd00:240::224".parse().unwrap();
        let mut a = Announcers::default();
        assert_eq!(a.message(), "none");
        a.set(v4, "dir1", true, Announce::L2);
        a.set(v6, "dir2", true, Announce::L2);
        assert_eq!(a.message(), "10.240.0.225 by dir1; fd00:240::224 by dir2");
        assert_eq!(Announcers::parse(&a.message()), a);
        // dir1 died and dir2 took its VIP over: dir2 alone is named.
        a.set(v4, "dir2", true, Announce::L2);
        assert_eq!(a.message(), "10.240.0.225 by dir2; fd00:240::224 by dir2");
        // Over BGP every director serving a VIP announces it.
        let mut b = Announcers::default();
        b.set(v4, "dir1", true, Announce::Bgp);
        b.set(v4, "dir2", true, Announce::Bgp);
        assert_eq!(b.message(), "10.240.0.225 by dir1, dir2");
        b.set(v4, "dir1", false, Announce::Bgp);
        b.set(v4, "dir2", false, Announce::Bgp);
        assert!(!b.any());
        assert_eq!(
            Announcers::parse("written by someone else"),
            Announcers::default()
        );
    }

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
