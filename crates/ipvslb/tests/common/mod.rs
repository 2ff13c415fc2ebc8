//! One real kube-apiserver + etcd per test binary, started on loopback from binaries built out of
//! their Go modules (`cargo xtask apiserver build`, run first by `.ci/run`), with ipvslb's CRDs
//! installed. Tests take turns (`turn()`): IPPools are cluster-scoped and every allocator sees them
//! all, so each test starts from a cluster without pools and works in namespaces of its own.

#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ipvslb::dataplane::Memory;
use ipvslb::metrics::Metrics;
use ipvslb::shared::SharedWatch;
use ipvslb::translate::{ClassPolicy, Unclassed};
use ipvslb::{allocator, director};
use ipvslb_api::{IPPool, NodeSet};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::{Mutex, MutexGuard, watch};
use xtask::apiserver::{build, server};

/// The shared server, alive until the test process exits (a watchdog stops it then).
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub dir: PathBuf,
    /// The admin bearer token written in `kubeconfig`.
    pub token: String,
    /// The API server's URL.
    pub url: String,
    _server: std::sync::Mutex<Option<server::Server>>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static TURN: Mutex<()> = Mutex::const_new(());

/// The cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // The controllers' logs, with RUST_LOG=info (or finer), go to the test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let binaries = build::cached(&build::Versions::from_env()).unwrap_or_else(|e| {
            panic!("the test API server is not built: {e}\nrun `cargo xtask apiserver build` (Go and the Go module proxy are needed)")
        });
        let dir = std::env::temp_dir().join(format!("ipvslb-apiserver-{}", std::process::id()));
        let mut options = server::Options::new(&dir, binaries);
        // Dual-stack Services need a Service range of each family.
        options.extra_apiserver_args.push("--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/112".into());
        let server = server::start(&options).unwrap_or_else(|e| panic!("starting the test API server: {e}"));
        watchdog(&dir);
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
        let cluster = Cluster {
            kubeconfig: server.kubeconfig.clone(),
            kubectl: server.kubectl.clone(),
            dir: dir.clone(),
            token: server.token.clone(),
            url: server.url.clone(),
            _server: std::sync::Mutex::new(Some(server)),
        };
        let out = cluster.kubectl(&["apply", "-f", crds.to_str().unwrap()]);
        assert!(out.status.success(), "installing the CRDs: {}", String::from_utf8_lossy(&out.stderr));
        // The API server warns about any schema it does not fully understand.
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(!warnings.contains("Warning"), "the CRDs draw warnings from the API server:\n{warnings}");
        let out = cluster.kubectl(&["wait", "--for=condition=Established", "crd/ippools.ipvslb.io", "crd/nodesets.ipvslb.io", "--timeout=30s"]);
        assert!(out.status.success(), "CRDs not established: {}", String::from_utf8_lossy(&out.stderr));
        cluster
    })
}

/// Stops etcd and kube-apiserver when this test process ends, however it ends: statics are
/// never dropped, so a small shell loop watches our pid.
fn watchdog(dir: &Path) {
    let script = format!(
        // The API server first, while etcd still answers: without etcd its graceful shutdown
        // was seen to hang for good. Whatever is left after 15 s is killed.
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         for name in kube-apiserver etcd; do \
           p=$(cat {dir}/$name.pid 2>/dev/null) || continue; kill $p 2>/dev/null; \
           for i in $(seq 15); do kill -0 $p 2>/dev/null || break; sleep 1; done; \
           kill -9 $p 2>/dev/null; \
         done; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    // Not waited for: it outlives this process on purpose.
    #[allow(
        clippy::zombie_processes,
        reason = "the watchdog must outlive the test process"
    )]
    let _watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the API server watchdog");
}

impl Cluster {
    /// Runs the real `kubectl` against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// `kubectl apply -f -` of `yaml`, asserting success.
    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs kubectl with `input` on standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> std::process::Output {
        let mut kubectl = Command::new(&self.kubectl);
        kubectl.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        with_stdin(kubectl, input)
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        let file = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }
}

/// Waits for this test's turn and clears what earlier tests left that every allocator would
/// see: IPPools and NodeSets. The guard ends the turn.
pub async fn turn(namespaces: &[&str]) -> (MutexGuard<'static, ()>, Client) {
    let cluster = cluster();
    let guard = TURN.lock().await;
    let client = cluster.client().await;
    let pools: Api<IPPool> = Api::all(client.clone());
    let _ = pools
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let sets: Api<NodeSet> = Api::all(client.clone());
    let _ = sets
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces {
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
        match ns_api.create(&PostParams::default(), &namespace).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating namespace {ns}: {e}"),
        }
    }
    (guard, client)
}

/// A running allocator (and optionally director) in this process, stopped on drop.
pub struct Controllers {
    pub metrics: Arc<Metrics>,
    pub dataplane: Arc<Memory>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The test director's settings: a quick resync, no drain.
fn director_config(
    classes: ClassPolicy,
    name: &str,
    lease_namespace: &str,
    announce_interface: Option<&str>,
) -> director::Config {
    director::Config {
        classes,
        resync: Duration::from_secs(2),
        drain_grace: Duration::ZERO,
        concurrency: 8,
        probes: ipvslb::health::Config { max_in_flight: 64 },
        name: name.to_owned(),
        max_destination_metrics: 100,
        withdraw: tokio::sync::watch::channel(false).1,
        interface: "ipvslb0".to_owned(),
        announce_interface: announce_interface.map(str::to_owned),
        lease_namespace: lease_namespace.to_owned(),
        l2_lease: ipvslb::peers::Timings::DEFAULT,
    }
}

/// Which Services the test controllers serve: only their class, so a stray Service of another
/// test is never touched.
pub fn classes(class: &str) -> ClassPolicy {
    ClassPolicy {
        class: class.to_owned(),
        unclassed: Unclassed::Ignore,
    }
}

impl Controllers {
    /// Starts an allocator that leads at once (no election) and a director on an in-memory
    /// data plane.
    pub fn start(client: &Client, classes: ClassPolicy) -> Self {
        let (leading_tx, leading) = watch::channel(true);
        Self::start_with(client, classes, leading, Some(leading_tx))
    }

    /// Starts them with leadership from `leading`.
    pub fn start_with(
        client: &Client,
        classes: ClassPolicy,
        leading: watch::Receiver<bool>,
        keep: Option<watch::Sender<bool>>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let dataplane = Arc::new(Memory::default());
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut services = SharedWatch::new();
        tasks.push(tokio::spawn(allocator::run(
            client.clone(),
            allocator::Config {
                classes: classes.clone(),
                concurrency: 8,
                status_resync: Duration::from_secs(1),
            },
            services.subscribe(),
            metrics.clone(),
            leading,
            stop.clone(),
        )));
        let config = director_config(classes, "test-director", "default", None);
        tasks.push(tokio::spawn(director::run(
            client.clone(),
            config,
            services.subscribe(),
            dataplane.clone(),
            metrics.clone(),
            stop,
        )));
        tasks.push(tokio::spawn(services.run(
            client,
            ipvslb::cached::CachedService::trim,
            &metrics.health,
        )));
        if let Some(sender) = keep {
            // Keep the leadership channel open for the life of the controllers.
            tasks.push(tokio::spawn(async move {
                sender.closed().await;
            }));
        }
        Self {
            metrics,
            dataplane,
            shutdown,
            tasks,
        }
    }

    /// Starts a director alone, named `name`, in L2 mode on an in-memory data plane, its
    /// Lease in `lease_namespace`.
    pub fn start_l2_director(
        client: &Client,
        classes: ClassPolicy,
        name: &str,
        lease_namespace: &str,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let dataplane = Arc::new(Memory::announcing_in(ipvslb_api::Announce::L2));
        let (shutdown, stop) = watch::channel(false);
        let mut services = SharedWatch::new();
        let config = director_config(classes, name, lease_namespace, Some("eth1"));
        let director = tokio::spawn(director::run(
            client.clone(),
            config,
            services.subscribe(),
            dataplane.clone(),
            metrics.clone(),
            stop,
        ));
        let watch = tokio::spawn(services.run(
            client,
            ipvslb::cached::CachedService::trim,
            &metrics.health,
        ));
        Self {
            metrics,
            dataplane,
            shutdown,
            tasks: vec![director, watch],
        }
    }

    /// Stops them as SIGTERM does: the first task (the director, or the allocator) may
    /// finish its work for up to `deadline`; then the rest are aborted.
    pub async fn stop_within(mut self, deadline: Duration) {
        let _ = self.shutdown.send(true);
        let mut tasks = self.tasks.drain(..);
        if let Some(mut first) = tasks.next()
            && tokio::time::timeout(deadline, &mut first).await.is_err()
        {
            first.abort();
        }
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Kills the controllers at once, as `kill -9` would: no graceful shutdown.
    pub fn kill(self) {
        drop(self);
    }

    /// Stops them gracefully.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A test that fails midway must not leave its controllers running into the next test.
impl Drop for Controllers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes; then panics with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The addresses in a Service's status.
pub use ipvslb::translate::ingress_ips as ingress;

/// Waits until `namespace/name` has exactly `want` in its status.
pub async fn wait_ingress(
    client: &Client,
    namespace: &str,
    name: &str,
    want: &[&str],
    timeout: Duration,
) {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("{namespace}/{name} to have {want:?}"),
        timeout,
        || async {
            let svc = api.get_opt(name).await.ok()??;
            (ingress(&svc) == want).then_some(())
        },
    )
    .await
}

/// A LoadBalancer Service manifest of `class` with TCP `ports`.
pub fn service_yaml(
    namespace: &str,
    name: &str,
    class: &str,
    ports: &[u16],
    annotations: &[(&str, &str)],
) -> String {
    let ports: String = ports
        .iter()
        .map(|p| format!("  - {{name: p{p}, port: {p}, protocol: TCP}}\n"))
        .collect();
    let annotations: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  annotations:\n{annotations}    x: \"y\"\nspec:\n  type: LoadBalancer\n  loadBalancerClass: {class}\n  selector: {{app: {name}}}\n  ports:\n{ports}"
    )
}

/// A free loopback address for a server to bind.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A plain HTTP/1.0 GET on loopback, returning the whole answer (empty if none came).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(stream, "GET {path} HTTP/1.0\r\n\r\n");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The status code of an HTTP answer.
pub fn status(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// The body of an HTTP answer.
pub fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

impl Cluster {
    /// A kubeconfig for ServiceAccount `ipvslb-system/ipvslb`, bound to ClusterRole `ipvslb`
    /// (whatever rules it has at the time), written to `file` in the cluster's directory.
    pub fn service_account_kubeconfig(&self, file: &str) -> PathBuf {
        self.apply(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ipvslb, namespace: ipvslb-system}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: ipvslb}\n\
             roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ipvslb}\n\
             subjects: [{kind: ServiceAccount, name: ipvslb, namespace: ipvslb-system}]\n",
        );
        let token = self.kubectl(&[
            "create",
            "token",
            "ipvslb",
            "-n",
            "ipvslb-system",
            "--duration=1h",
        ]);
        assert!(
            token.status.success(),
            "{}",
            String::from_utf8_lossy(&token.stderr)
        );
        let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        assert!(admin.contains(&self.token));
        let path = self.dir.join(file);
        std::fs::write(&path, admin.replace(&self.token, &token)).unwrap();
        path
    }

    /// ClusterRole `ipvslb` holding every rule of the chart (the allocator's, the director's
    /// and the two Lease Roles', read from `charts/ipvslb/rbac/`), for `ipvslb run --role all`, as
    /// a file and as text.
    pub fn chart_role() -> (PathBuf, String) {
        let mut text = String::from(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: ipvslb\nrules:\n",
        );
        for file in ["allocator", "director", "lease", "director-lease"] {
            text.push_str(&chart_rules(file));
        }
        // In the cluster's folder, which the watchdog removes.
        let path = cluster().dir.join("chart-role.yaml");
        std::fs::write(&path, &text).unwrap();
        (path, text)
    }
}

/// `role` (the chart's rules in one ClusterRole) without the right to write Service status:
/// both the allocator's rule and the director's (which patches the Announced condition) lose
/// `patch`.
pub fn without_service_status_writes(role: &str) -> String {
    let narrowed = role
        .replace(
            "  resources: [services/status]\n  verbs: [patch]",
            "  resources: [services/status]\n  verbs: [get]",
        )
        .replace(
            "  resources: [services/status]\n  verbs: [get, patch]",
            "  resources: [services/status]\n  verbs: [get]",
        );
    assert_eq!(
        narrowed
            .matches("  resources: [services/status]\n  verbs: [get]")
            .count(),
        2,
        "the chart's rules for Service status moved"
    );
    narrowed
}

/// The rules of `charts/ipvslb/rbac/<file>.yaml`, the very text the chart's roles include.
pub fn chart_rules(file: &str) -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../charts/ipvslb/rbac/{file}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

impl Cluster {}

/// The real binary, `ipvslb run` with the in-memory data plane, its log in a file; killed on
/// drop.
pub struct Ipvslb {
    child: std::process::Child,
    log: PathBuf,
    /// Where its probes are served.
    pub probes: String,
}

impl Ipvslb {
    /// Runs `ipvslb run` against `kubeconfig` serving `class`, electing on Lease
    /// `ipvslb-system/lease`, with `extra` arguments; `wrap` is a shell prefix (such as a
    /// `ulimit`) or empty. The log goes to `log`.
    pub fn spawn(
        kubeconfig: &Path,
        class: &str,
        lease: &str,
        extra: &[&str],
        wrap: &str,
        log: PathBuf,
    ) -> Self {
        let probes = free_addr();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{wrap} exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ipvslb"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--load-balancer-class",
                class,
                "--unclassed-services",
                "ignore",
            ])
            .args(["--dataplane", "memory", "--metrics-addr", &probes])
            .args(["--lease-name", lease, "--lease-namespace", "ipvslb-system"])
            .args(["--lease-duration", "3s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("ipvslb runs");
        Self { child, log, probes }
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of `path` on its probes server.
    pub fn get(&self, path: &str) -> String {
        http_get(&self.probes, path)
    }

    /// Whether it still runs (its exit status if not).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends SIGTERM, as the kubelet does.
    pub fn terminate(&self) {
        let out = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "kill -TERM failed");
    }
}

impl Drop for Ipvslb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback that can be frozen: from then on it forwards nothing, in either
/// direction, on old or new connections. An API server that stops answering, without closing.
pub struct Relay {
    /// Where clients connect.
    pub addr: String,
    frozen: watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (frozen, watching) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut to: tokio::net::tcp::OwnedWriteHalf,
                                watching: watch::Receiver<bool>| async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if *watching.borrow() {
                                // Frozen for good: hold the connection, forward nothing.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let up = pipe(client_read, server_write, watching.clone());
                    let down = pipe(server_read, client_write, watching);
                    tokio::join!(up, down);
                });
            }
        });
        Self {
            addr,
            frozen,
            _task: task,
        }
    }

    /// Stops forwarding, for good.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// Runs `command` with `input` on its standard input, and collects what it printed.
pub fn with_stdin(mut command: Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Two Nodes labelled `ipvslb.io/backend: "true"`.
const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {ipvslb.io/backend: \"true\"}}
---
apiVersion: v1
kind: Node
metadata: {name: node2, labels: {ipvslb.io/backend: \"true\"}}
";

/// Nodes get their addresses and Ready condition through the status subresource, as a kubelet
/// would report them.
pub fn make_nodes_ready(cluster: &Cluster) {
    cluster.apply(NODES);
    for (node, ip) in [("node1", "10.240.0.101"), ("node2", "10.240.0.102")] {
        let patch = format!(
            "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{ip}\"}}],\"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"ready\",\"lastHeartbeatTime\":\"2026-01-01T00:00:00Z\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}}]}}}}"
        );
        let out = cluster.kubectl(&[
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
        assert!(
            out.status.success(),
            "patching {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
