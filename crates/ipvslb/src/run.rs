//! `ipvslb run`: the allocator and/or the director against a cluster, with leader election, the
//! probes and metrics server, and a clean stop on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::dataplane::Memory;
use crate::metrics::Metrics;
use crate::server::Limits;
use crate::shared::SharedWatch;
use crate::translate::ClassPolicy;
use crate::{AbortOnDrop, ClassArgs, allocator, director, leader};

/// Which controllers run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Allocator and director (the single-director topology).
    All,
    /// Only the allocator (leader-elected).
    Allocator,
    /// Only the director of this host.
    Director,
}

/// Where the director writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataplaneKind {
    /// The kernel: IPVS over netlink and VIPs on `--interface` (needs CAP_NET_ADMIN).
    Kernel,
    /// An in-memory table: no kernel is touched (for trying ipvslb and for tests).
    Memory,
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// `ipvslb run` options; each also reads an environment variable, as a Pod spec sets them.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Which controllers to run.
    #[arg(long, env = "IPVSLB_ROLE", value_enum, default_value_t = Role::All)]
    role: Role,
    /// A kubeconfig file; without one, KUBECONFIG, ~/.kube/config or the in-cluster account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    classes: ClassArgs,
    /// The director's data plane.
    #[arg(long, env = "IPVSLB_DATAPLANE", value_enum, default_value_t = DataplaneKind::Kernel)]
    dataplane: DataplaneKind,
    /// The dummy interface that holds the VIPs on the director: created (with the alias
    /// `ipvslb`) if absent; an existing interface without that alias is refused.
    #[arg(long, env = "IPVSLB_INTERFACE", default_value = "ipvslb0")]
    interface: String,
    /// How often the director's full pass repairs drift and collects stale entries.
    #[arg(long, env = "IPVSLB_RESYNC", default_value = "5m", value_parser = parse_duration)]
    resync: Duration,
    /// How long a removed destination drains at weight 0 before it is deleted.
    #[arg(long, env = "IPVSLB_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration)]
    drain_grace: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "IPVSLB_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "IPVSLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The Lease that elects the allocator.
    #[arg(long, env = "IPVSLB_LEASE_NAME", default_value = "ipvslb-allocator")]
    lease_name: String,
    /// The Lease's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ipvslb-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the Pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How many Services each controller reconciles at once.
    #[arg(long, env = "IPVSLB_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Lease duration (at least 1s); a standby takes over this long after a leader dies
    /// without releasing. The leader stops acting at two thirds of it without a renewal.
    #[arg(long, env = "IPVSLB_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// At most this many of ipvslb's own destinations get the kernel's counters exported as
    /// `ipvslb_destination_total` series (five each; refreshed by each full pass).
    #[arg(long, env = "IPVSLB_MAX_DESTINATION_METRICS", default_value_t = 1000)]
    max_destination_metrics: usize,
    /// This director's name: of its `Director` resource and L2 Lease, and in NodeSet statuses
    /// (default: the host name, lowercased). It must be a lowercase RFC 1123 subdomain.
    #[arg(long, env = "IPVSLB_DIRECTOR_NAME")]
    director_name: Option<String>,
    /// Set the IPVS sysctls that draining relies on (`expire_nodest_conn`,
    /// `expire_quiescent_template`, `conn_reuse_mode`, all to 1) when the kernel data plane opens.
    #[arg(long, env = "IPVSLB_SET_IPVS_SYSCTLS")]
    set_ipvs_sysctls: bool,
    /// At most this many health probes run at once (the rest wait their turn).
    #[arg(long, env = "IPVSLB_MAX_PROBES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_probes: u32,
    /// Also keep the VIPs this director can serve on this dummy interface (created with the
    /// alias `ipvslb` if absent), for the host's routing daemon to announce: BIRD's `protocol
    /// direct` on this interface only (deploy/bird/). A VIP is on it once a
    /// full pass has programmed it and while one of its destinations takes connections; all
    /// go when a full pass cannot read or write the kernel, and at a stop with
    /// `--drain-on-stop`. Every VIP stays on
    /// `--interface` regardless, so IPVS serves the packets still on their way.
    #[arg(long, env = "IPVSLB_ANNOUNCE_INTERFACE")]
    announce_interface: Option<String>,
    /// Announce the VIPs of `L2` pools on this existing interface of the host (the clients'
    /// segment, `eth1` in the write-up): one director per VIP, elected through a Lease per
    /// director in the lease namespace, answers ARP and NDP for it there and sends gratuitous
    /// ARP and unsolicited neighbour advertisements when it takes it over. Sets the
    /// interface's `arp_ignore=1` and `arp_announce=2`, so no other VIP is answered for there.
    #[arg(
        long,
        env = "IPVSLB_L2_INTERFACE",
        conflicts_with = "announce_interface"
    )]
    l2_interface: Option<String>,
    /// How long the other directors wait, after they last saw this director renew its Lease,
    /// before taking over its L2 VIPs (it renews every sixth of this, and stops announcing
    /// two thirds of it after its last renewal seen back); from 600ms to 1h.
    #[arg(long, env = "IPVSLB_L2_LEASE_DURATION", default_value = "1500ms", value_parser = parse_duration)]
    l2_lease_duration: Duration,
    /// On SIGTERM, first withdraw every announcement, then go on serving for this long, so
    /// routers move the flows to the other directors before this one stops (0: stop at once).
    #[arg(long, env = "IPVSLB_DRAIN_ON_STOP", default_value = "0s", value_parser = parse_duration)]
    drain_on_stop: Duration,
    /// Let IPVS schedule a TCP or SCTP flow from any packet, not only its first
    /// (`sloppy_tcp`, `sloppy_sctp`): with the `mh` scheduler, a director then carries on a
    /// connection that another director started and ECMP moved here.
    #[arg(long, env = "IPVSLB_SLOPPY")]
    sloppy: bool,
    /// Run IPVS's connection sync daemons, master and backup, on this interface: each director
    /// multicasts its connections and takes in the others', so a flow moved here finds its
    /// connection (the stateful alternative to `--sloppy`; any scheduler, and persistence).
    /// A sync daemon already running with other settings is left alone and refused.
    #[arg(long, env = "IPVSLB_SYNC_INTERFACE")]
    sync_interface: Option<String>,
    /// The sync id of this tier of directors: backups take in only their own tier's
    /// connections (0: every tier's).
    #[arg(long, env = "IPVSLB_SYNC_ID", default_value_t = 0)]
    sync_id: u8,
    /// After SIGTERM, how long in-flight work may take before the process exits regardless.
    #[arg(long, env = "IPVSLB_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

/// Runs until SIGTERM or SIGINT; returns an error message when start-up fails.
pub async fn run(args: RunArgs) -> Result<(), String> {
    init_logging(args.log_format);
    if args.announce_interface.as_deref() == Some(args.interface.as_str()) {
        // Withdrawing a VIP would take it off the interface IPVS serves it from.
        return Err(format!(
            "--announce-interface must differ from --interface ({})",
            args.interface
        ));
    }
    if args.l2_interface.as_deref() == Some(args.interface.as_str()) {
        return Err(format!(
            "--l2-interface must differ from --interface ({}): it is the host's interface on the clients' segment",
            args.interface
        ));
    }
    let l2_lease = crate::peers::Timings::new(args.l2_lease_duration)
        .map_err(|e| format!("--l2-lease-duration: {e}"))?;
    if !args.drain_on_stop.is_zero()
        && args.announce_interface.is_none()
        && args.l2_interface.is_none()
    {
        warn!(
            "--drain-on-stop without --announce-interface: a stop waits, but nothing tells the routers to move the flows"
        );
    }
    let client = client(args.kubeconfig.as_ref()).await?;
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown) = watch::channel(false);
    let classes = ClassPolicy {
        class: args.classes.load_balancer_class.clone(),
        unclassed: args.classes.unclassed_services,
    };
    let server = crate::server::bind(args.metrics_addr, metrics.clone(), Limits::default())
        .await
        .map_err(|e| e.to_string())?;
    let _server = AbortOnDrop(tokio::spawn(server));
    info!(role = ?args.role, metrics = %args.metrics_addr, "starting");

    let mut tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)> = Vec::new();
    // Both roles follow every Service: one watch, one cache.
    let mut services = SharedWatch::new();
    if args.role != Role::Director {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let timings = leader::Timings::from_lease(args.lease_duration)
            .map_err(|e| format!("--lease-duration: {e}"))?;
        let (leading_tx, leading) = watch::channel(false);
        let elector = leader::Elector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            timings,
        )
        .map_err(|e| format!("--lease-duration: {e}"))?;
        // An election that ended (a panic) would leave this replica a standby for good.
        let election = metrics.health.heartbeat("lease election", Duration::MAX);
        // The Lease is released only once the allocator has stopped: a status write still in
        // flight must land before a standby can lead (and list the statuses). A drain that
        // outlasts the deadline leaves the Lease to expire instead.
        let (release_tx, stop) = watch::channel(false);
        tasks.push((
            "the lease (release)",
            tokio::spawn(async move {
                let _election = election;
                elector.run(leading_tx, stop).await;
            }),
        ));
        let gauge = metrics.clone();
        let mut observed = leading.clone();
        tokio::spawn(async move {
            while observed.changed().await.is_ok() {
                gauge.leader.set(i64::from(*observed.borrow_and_update()));
            }
        });
        let config = allocator::Config {
            classes: classes.clone(),
            concurrency: args.concurrency,
            status_resync: Duration::from_secs(30),
        };
        let allocator = allocator::run(
            client.clone(),
            config,
            services.subscribe(),
            metrics.clone(),
            leading,
            shutdown.clone(),
        );
        tasks.push((
            "the allocator",
            tokio::spawn(async move {
                allocator.await;
                let _ = release_tx.send(true);
            }),
        ));
    }
    let (withdraw_tx, withdraw) = watch::channel(false);
    if args.role != Role::Allocator {
        let config = director::Config {
            classes,
            resync: args.resync,
            drain_grace: args.drain_grace,
            concurrency: args.concurrency,
            probes: crate::health::Config {
                max_in_flight: args.max_probes as usize,
            },
            name: director_name(args.director_name.clone())?,
            max_destination_metrics: args.max_destination_metrics,
            withdraw,
            interface: args.interface.clone(),
            announce_interface: args
                .announce_interface
                .clone()
                .or_else(|| args.l2_interface.clone()),
            lease_namespace: args.lease_namespace.clone(),
            l2_lease,
        };
        let subscription = services.subscribe();
        let director = match args.dataplane {
            DataplaneKind::Kernel => {
                let kernel = crate::dataplane::Kernel::open(&args.interface).map_err(|e| {
                    format!("opening the kernel data plane: {e} (or run with --dataplane=memory)")
                })?;
                info!(interface = %args.interface, "kernel data plane: IPVS over netlink");
                if args.set_ipvs_sysctls {
                    crate::dataplane::set_ipvs_sysctls().map_err(|e| e.to_string())?;
                    info!(settings = ?crate::dataplane::IPVS_SYSCTLS, "IPVS sysctls set");
                }
                if args.sloppy {
                    crate::dataplane::set_sysctls(&crate::dataplane::SLOPPY_SYSCTLS)
                        .map_err(|e| e.to_string())?;
                    info!(settings = ?crate::dataplane::SLOPPY_SYSCTLS, "IPVS sloppy sysctls set");
                }
                if let Some(interface) = &args.sync_interface {
                    let wanted = sync_daemons(interface, args.sync_id);
                    let started = kernel.ensure_sync_daemons(&wanted).map_err(|e| {
                        format!("starting the connection sync daemons on {interface}: {e}")
                    })?;
                    info!(%interface, sync_id = args.sync_id, started = started.len(), "IPVS connection sync daemons run");
                }
                let kernel = match (&args.announce_interface, &args.l2_interface) {
                    (Some(announce), _) => {
                        info!(interface = %announce, "announcing the VIPs of BGP pools this director can serve");
                        kernel.announcing_on(announce).map_err(|e| e.to_string())?
                    }
                    (None, Some(segment)) => {
                        info!(interface = %segment, lease = ?args.l2_lease_duration, "answering ARP and NDP for the VIPs of L2 pools this director is elected for");
                        kernel
                            .announcing_l2_on(segment)
                            .map_err(|e| e.to_string())?
                    }
                    (None, None) => kernel,
                };
                spawn_director(&client, config, subscription, kernel, &metrics, &shutdown)
            }
            DataplaneKind::Memory => {
                info!(interface = %args.interface, "in-memory data plane: the kernel is not touched");
                let memory = match (&args.announce_interface, &args.l2_interface) {
                    (Some(_), _) => Memory::announcing(),
                    (None, Some(_)) => Memory::announcing_in(ipvslb_api::Announce::L2),
                    (None, None) => Memory::default(),
                };
                spawn_director(&client, config, subscription, memory, &metrics, &shutdown)
            }
        };
        tasks.push(("the director", director));
    }
    let _services = AbortOnDrop(tokio::spawn(services.run(
        &client,
        crate::cached::CachedService::trim,
        &metrics.health,
    )));

    termination().await;
    if args.role != Role::Allocator && !args.drain_on_stop.is_zero() {
        info!(drain = ?args.drain_on_stop, "stopping: withdrawing the VIP announcements first");
        metrics.health.stopping();
        let _ = withdraw_tx.send(true);
        tokio::time::sleep(args.drain_on_stop).await;
    }
    info!(deadline = ?args.shutdown_timeout, "stopping: finishing in-flight work and releasing the lease");
    metrics.health.stopping();
    let _ = shutdown_tx.send(true);
    stop(tasks, args.shutdown_timeout, &metrics.health).await;
    Ok(())
}

/// The director over `dataplane`, running until `shutdown`.
fn spawn_director<D: crate::dataplane::Dataplane>(
    client: &Client,
    config: director::Config,
    services: crate::shared::Subscription<crate::cached::CachedService>,
    dataplane: D,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(director::run(
        client.clone(),
        config,
        services,
        dataplane,
        metrics.clone(),
        shutdown.clone(),
    ))
}

/// Waits for `tasks` until `deadline`; a task still running then (a request the API server
/// does not answer, a data-plane call that hangs) must not keep the process from exiting, as
/// the kubelet would kill it without a word. Says what was left unfinished.
async fn stop(
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    deadline: Duration,
    health: &crate::server::Health,
) {
    let deadline = tokio::time::Instant::now() + deadline;
    let mut unfinished = Vec::new();
    for (name, mut task) in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            unfinished.push(name);
        }
    }
    if unfinished.is_empty() {
        info!("stopped");
    } else {
        let in_flight = health.in_flight();
        warn!(
            unfinished = %unfinished.join(", "),
            reconciles = %in_flight,
            "shutdown deadline passed: exiting with work unfinished"
        );
    }
}

pub(crate) async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| format!("finding the cluster (kubeconfig or in-cluster): {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("building the Kubernetes client: {e}"))
}

/// Both sync daemons on `interface`: every director of an active tier sends and receives.
fn sync_daemons(interface: &str, sync_id: u8) -> Vec<ipvslb_ipvs::SyncDaemon> {
    [ipvslb_ipvs::SyncRole::Master, ipvslb_ipvs::SyncRole::Backup]
        .map(|role| ipvslb_ipvs::SyncDaemon {
            role,
            interface: interface.to_owned(),
            sync_id,
        })
        .to_vec()
}

fn default_identity() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// The director's name, checked: it names Kubernetes objects (its `Director`, its Lease).
fn director_name(given: Option<String>) -> Result<String, String> {
    let (name, source) = match given {
        Some(name) => (name, "--director-name"),
        None => (
            host_name().to_lowercase(),
            "the host name (set --director-name)",
        ),
    };
    if is_subdomain(&name) {
        Ok(name)
    } else {
        Err(format!(
            "director name {name:?}, from {source}, is not a valid Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        ))
    }
}

/// Whether `name` is a lowercase RFC 1123 subdomain, as Kubernetes object names must be.
fn is_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| alnum(c) || c == '-')
                && label.starts_with(alnum)
                && label.ends_with(alnum)
        })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "ipvslb".into())
}

async fn termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 5m or 500ms"))?;
    let seconds = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_too_long_to_count_is_refused_not_wrapped() {
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("18446744073709551615h").is_err());
        assert!(parse_duration("18446744073709551615m").is_err());
    }

    #[test]
    fn a_director_name_must_name_a_kubernetes_object() {
        assert_eq!(
            director_name(Some("dir-1.rack2".into())),
            Ok("dir-1.rack2".into())
        );
        for bad in ["(none)", "Dir1", "-dir", "dir-", "a..b", ""] {
            let error = director_name(Some(bad.into())).unwrap_err();
            assert!(error.contains("--director-name"), "{error}");
        }
    }

    #[test]
    fn durations_parse_with_their_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(
            parse_duration("5 minutes")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
