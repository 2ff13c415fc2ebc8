//! The Helm chart, proven with the real `helm` (built from `helm.sh/helm/v4` by
//! `cargo xtask apiserver build` or `cargo xtask test`) against the real API server: lint, every
//! rendering applied with a server-side dry run, install, the real binary run as the chart's Pods
//! would run it with the chart's ServiceAccounts and nothing more, upgrade and uninstall; and the
//! PromQL of the dashboard and the alerts checked against what `ipvslb run` exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Cluster, cluster, eventually, free_addr, http_get, status, turn, wait_ingress};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);
/// The release's namespace: not the binary's default Lease namespace (`ipvslb-system`), so the
/// install test shows the Lease follows the Pod's namespace (POD_NAMESPACE) into its Role.
const NAMESPACE: &str = "lb-system";
/// Where the harness's own ServiceAccount and Leases live.
const HARNESS_NAMESPACE: &str = "ipvslb-system";
const RELEASE: &str = "ipvslb";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/ipvslb")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The cached helm binary, or a panic saying how to build it.
fn helm_binary() -> PathBuf {
    let version = xtask::apiserver::build::helm_version();
    xtask::apiserver::build::cached_helm(&version).unwrap_or_else(|e| {
        panic!(
            "helm {version} is not built: {e}\n(Go and the Go module proxy are needed to build it)"
        )
    })
}

/// Runs helm with its state in a folder of this test process, never the user's.
fn helm(args: &[&str]) -> Output {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    Command::new(helm_binary())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("helm runs")
}

/// Runs helm against the test cluster.
fn helm_in(cluster: &Cluster, args: &[&str]) -> Output {
    let mut all = vec!["--kubeconfig", cluster.kubeconfig.to_str().unwrap()];
    all.extend_from_slice(args);
    helm(&all)
}

fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The values files of `charts/ipvslb/ci/`, sorted.
fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected at least 4 ci values files, found {files:?}"
    );
    files
}

fn template(values: &Path) -> String {
    let chart = chart();
    ok(
        &format!("helm template with {}", values.display()),
        &helm(&[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "-f",
            values.to_str().unwrap(),
        ]),
    )
}

/// The documents of a multi-document YAML stream, as JSON values (empty documents left out).
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} named *{suffix} rendered"))
}

#[test]
fn the_chart_lints_strictly_with_its_defaults_and_every_ci_values_file() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let mut runs = vec![vec!["lint", "--strict", chart]];
    let files = ci_values();
    for file in &files {
        runs.push(vec![
            "lint",
            "--strict",
            chart,
            "-f",
            file.to_str().unwrap(),
        ]);
    }
    for args in runs {
        let out = ok(&format!("helm {}", args.join(" ")), &helm(&args));
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm {}:\n{out}",
            args.join(" ")
        );
    }
}

#[test]
fn the_values_schema_refuses_unknown_keys_and_wrong_types() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (set, says) in [
        (
            "allocator.replica=3",
            "additional properties 'replica' not allowed",
        ),
        ("allocator.replicas=two", "want integer"),
        ("director.enabled=maybe", "want boolean"),
        ("unclassedServices=sometimes", "/unclassedServices"),
        ("director.resync=5 minutes", "/director/resync"),
        ("metrics.port=70000", "/metrics/port"),
        (
            "imagePullSecret=x",
            "additional properties 'imagePullSecret' not allowed",
        ),
    ] {
        let out = helm(&["template", RELEASE, chart, "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "--set {set}: expected a refusal naming {says:?}, got {}:\n{stderr}",
            out.status
        );
    }
    // Types given as strings where the schema wants them are accepted.
    ok(
        "a valid override",
        &helm(&["template", RELEASE, chart, "--set", "allocator.replicas=3"]),
    );
}

#[test]
fn the_chart_version_and_image_follow_the_workspace_version_and_the_dockerfile() {
    let cargo = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a workspace version");
    let chart_yaml: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["appVersion"], version, "Chart.yaml appVersion");
    assert_eq!(chart_yaml["version"], version, "Chart.yaml version");
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let image = format!(
        "{}:{version}",
        values["image"]["repository"].as_str().unwrap()
    );
    let docs = documents(&template(&chart().join("ci/default-values.yaml")));
    let deployment = find(&docs, "Deployment", "-allocator");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        image.as_str()
    );
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("docker build -t {image} ")),
        "the Dockerfile's build line does not make the chart's default image {image}"
    );
    assert!(
        dockerfile.contains(&format!("org.opencontainers.image.version=\"{version}\"")),
        "the Dockerfile's version label is not {version}"
    );
    assert!(
        dockerfile.contains(xtask::image::BUILD_COMMAND),
        "the Dockerfile does not build the binary as `cargo xtask image-binary` checks it: {}",
        xtask::image::BUILD_COMMAND
    );
}

/// Prometheus Operator kinds the metrics values render, as permissive CRDs, so the dry run can
/// reach them (their fields are checked against the operator's own Go types by
/// `the_servicemonitor_and_the_prometheusrule_decode_strictly_into_the_operators_types`).
const MONITORING_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule, listKind: PrometheusRuleList}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendering_is_valid_as_the_api_server_sees_it() {
    let cluster = cluster();
    let (_turn, _client) = turn(&[NAMESPACE]).await;
    cluster.apply(MONITORING_CRDS);
    let out = cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
        "--timeout=30s",
    ]);
    ok("waiting for the monitoring CRDs", &out);
    for values in ci_values() {
        let rendered = template(&values);
        let kinds = documents(&rendered).len();
        assert!(kinds > 5, "{}: only {kinds} objects", values.display());
        let out = cluster.kubectl_stdin(
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
            &rendered,
        );
        let stdout = ok(
            &format!("kubectl apply --dry-run=server of {}", values.display()),
            &out,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("Warning"),
            "{}: the API server warns:\n{stderr}",
            values.display()
        );
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            kinds,
            "{}: not every object was accepted:\n{stdout}",
            values.display()
        );
    }
}

/// The real binary, started as a Pod of the chart would start it: the container's args and
/// env as rendered, the downward API's values filled in, a token for the Pod's ServiceAccount.
/// Only two things differ: `--kubeconfig` replaces the in-cluster account (same token), and
/// the probes address is a free loopback port instead of `0.0.0.0:9090`.
struct Pod {
    child: std::process::Child,
    log: PathBuf,
    probes: String,
}

impl Pod {
    fn start(cluster: &Cluster, pod: &Value, name: &str, extra: &[&str]) -> Self {
        let spec = &pod["spec"]["template"]["spec"];
        let account = spec["serviceAccountName"].as_str().unwrap();
        let token = ok(
            &format!("kubectl create token {account}"),
            &cluster.kubectl(&["create", "token", account, "-n", NAMESPACE, "--duration=1h"]),
        );
        let admin = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
        let kubeconfig = cluster.dir.join(format!("{name}-kubeconfig"));
        std::fs::write(&kubeconfig, admin.replace(&cluster.token, token.trim())).unwrap();
        Self::start_with(cluster, pod, name, extra, &kubeconfig)
    }

    /// Like [`Pod::start`], with a kubeconfig made elsewhere.
    fn start_with(
        cluster: &Cluster,
        pod: &Value,
        name: &str,
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Self {
        let container = &pod["spec"]["template"]["spec"]["containers"][0];
        let probes = free_addr();
        let log = cluster.dir.join(format!("{name}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_ipvslb"));
        // An extra `--flag=value` replaces the rendered `--flag=...`.
        let replaced = |arg: &str| {
            extra.iter().any(|e| {
                e.split_once('=')
                    .is_some_and(|(flag, _)| arg.starts_with(&format!("{flag}=")))
            })
        };
        for arg in container["args"].as_array().unwrap() {
            let arg = arg.as_str().unwrap();
            if !replaced(arg) {
                command.arg(arg);
            }
        }
        command.arg("--kubeconfig").arg(kubeconfig).args(extra);
        command.env_clear().env("RUST_LOG", "info");
        for var in container["env"].as_array().unwrap() {
            let key = var["name"].as_str().unwrap();
            let value = match (
                &var["value"],
                var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.name")) => name.to_owned(),
                (_, Some("metadata.namespace")) => NAMESPACE.to_owned(),
                other => panic!("env {key}: no value the test can fill: {other:?}"),
            };
            command.env(key, value);
        }
        command.env("IPVSLB_METRICS_ADDR", &probes);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("ipvslb runs");
        Self { child, log, probes }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 and `/metrics` holds every line of `expected`.
    async fn wait_ready(&self, expected: &[&str], timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let ready = http_get(&self.probes, "/readyz");
            let metrics = http_get(&self.probes, "/metrics");
            if status(&ready) == Some(200) && expected.iter().all(|e| metrics.contains(e)) {
                return metrics;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "probes on {}: /readyz {ready:?}\nwanted {expected:?} in /metrics:\n{metrics}\nlog:\n{}",
                self.probes,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the README's commands that mint the external director's kubeconfig (with the test's
/// kubectl and admin kubeconfig, in a folder of its own) and returns the file they write.
fn mint_external_kubeconfig(cluster: &Cluster) -> PathBuf {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let start = readme
        .find("# Mint the external director's kubeconfig")
        .expect("the README shows how to mint the external director's kubeconfig");
    // The README installs into ipvslb-system; the test's release lives in NAMESPACE.
    let script = readme[start..start + readme[start..].find("```").unwrap()]
        .replace("-n ipvslb-system", &format!("-n {NAMESPACE}"));
    assert!(
        script.contains(&format!("-n {NAMESPACE} create token")),
        "{script}"
    );
    let script = script.as_str();
    let dir = cluster.dir.join("external-director");
    std::fs::create_dir_all(&dir).unwrap();
    let path = format!(
        "{}:{}",
        cluster.kubectl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(&dir)
        .env("PATH", path)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    ok(&format!("the README's commands:\n{script}"), &out);
    let kubeconfig = dir.join("director.kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        !text.contains(&cluster.token),
        "the minted kubeconfig holds the admin token"
    );
    kubeconfig
}

/// Names (`kind/name`, lower case) of the objects of this release that kubectl finds.
fn release_objects(cluster: &Cluster) -> BTreeSet<String> {
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let out = cluster.kubectl(&[
        "get",
        "deployments,daemonsets,serviceaccounts,services,configmaps,poddisruptionbudgets,roles,rolebindings,networkpolicies,secrets",
        "-n",
        NAMESPACE,
        "-l",
        &selector,
        "-o",
        "name",
    ]);
    let mut names: BTreeSet<String> = ok("kubectl get", &out).lines().map(str::to_owned).collect();
    let out = cluster.kubectl(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        &selector,
        "-o",
        "name",
    ]);
    names.extend(ok("kubectl get", &out).lines().map(str::to_owned));
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_gives_accounts_with_which_the_real_binary_serves_whoami_then_upgrade_and_uninstall_do_what_they_should()
 {
    let cluster = cluster();
    let (_turn, client) = turn(&[NAMESPACE]).await;
    // Helm installs the CRDs itself: start from a cluster without them.
    ok(
        "deleting the harness's CRDs",
        &cluster.kubectl(&[
            "delete",
            "crd",
            "ippools.ipvslb.io",
            "nodesets.ipvslb.io",
            "--wait=true",
            "--ignore-not-found",
        ]),
    );
    let chart = chart();
    let install = ok(
        "helm install",
        &helm_in(
            cluster,
            &[
                "install",
                RELEASE,
                chart.to_str().unwrap(),
                "--namespace",
                NAMESPACE,
            ],
        ),
    );
    assert!(install.contains("STATUS: deployed"), "{install}");
    assert!(
        install.contains("kubectl get ippools"),
        "NOTES.txt: {install}"
    );
    // The first pool NOTES.txt shows is one the API server takes.
    let start = install
        .find("<<POOL\n")
        .expect("NOTES.txt shows a first pool")
        + 7;
    let end = start + install[start..].find("  POOL").unwrap();
    let notes_pool: String = install[start..end]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    ok(
        "the chart's CRDs established",
        &cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/ippools.ipvslb.io",
            "crd/nodesets.ipvslb.io",
            "--timeout=30s",
        ]),
    );
    let out = cluster.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &notes_pool);
    ok(&format!("NOTES.txt's first pool:\n{notes_pool}"), &out);
    let installed = release_objects(cluster);
    for want in [
        "deployment.apps/ipvslb-allocator",
        "daemonset.apps/ipvslb-director",
        "serviceaccount/ipvslb-allocator",
        "serviceaccount/ipvslb-director",
        "service/ipvslb-allocator-metrics",
        "service/ipvslb-director-metrics",
        "configmap/ipvslb-dashboard",
        "poddisruptionbudget.policy/ipvslb-allocator",
        "role.rbac.authorization.k8s.io/ipvslb-allocator-lease",
        "rolebinding.rbac.authorization.k8s.io/ipvslb-allocator-lease",
        "clusterrole.rbac.authorization.k8s.io/ipvslb-allocator",
        "clusterrole.rbac.authorization.k8s.io/ipvslb-director",
        "clusterrolebinding.rbac.authorization.k8s.io/ipvslb-allocator",
        "clusterrolebinding.rbac.authorization.k8s.io/ipvslb-director",
    ] {
        assert!(
            installed.contains(want),
            "{want} missing from {installed:#?}"
        );
    }
    let manifest = ok(
        "helm get manifest",
        &helm_in(
            cluster,
            &["get", "manifest", RELEASE, "--namespace", NAMESPACE],
        ),
    );
    let docs = documents(&manifest);
    let allocator_pod = find(&docs, "Deployment", "-allocator");
    let director_pod = find(&docs, "DaemonSet", "-director");

    // The whoami demo, as the README applies it (its Deployment's Pods never start here).
    for file in ["examples/whoami/pool.yaml", "examples/whoami/whoami.yaml"] {
        ok(
            &format!("applying {file}"),
            &cluster.kubectl(&["apply", "-f", repo(file).to_str().unwrap()]),
        );
    }

    // The allocator with the chart's allocator account and nothing more.
    let allocator = Pod::start(cluster, allocator_pod, "ipvslb-allocator-0", &[]);
    wait_ingress(&client, "default", "whoami", &["10.240.0.210"], 30 * SECOND).await;
    allocator
        .wait_ready(
            &[
                "ipvslb_leader 1",
                "ipvslb_assignments{pool=\"default\"} 1",
                "ipvslb_services_pending 0",
            ],
            20 * SECOND,
        )
        .await;
    let lease = ok(
        "the allocator's Lease",
        &cluster.kubectl(&[
            "get",
            "lease",
            "ipvslb-allocator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]),
    );
    assert_eq!(
        lease, "ipvslb-allocator-0",
        "the Lease holder is the Pod name"
    );
    assert!(
        !allocator.logs().contains("forbidden"),
        "the allocator lacked a permission:\n{}",
        allocator.logs()
    );

    // The director with the chart's director account and the memory data plane: it reads
    // everything it needs and programs the VIP.
    let director = Pod::start(
        cluster,
        director_pod,
        "ipvslb-director-node1",
        &["--dataplane=memory"],
    );
    director
        .wait_ready(
            &["ipvslb_dataplane_ops_total{kind=\"add_service\",result=\"ok\"} 1"],
            30 * SECOND,
        )
        .await;
    assert!(
        !director.logs().contains("forbidden"),
        "the director lacked a permission:\n{}",
        director.logs()
    );

    // The director's account is read-only: an allocator run with it is refused, says so in
    // its log, and keeps running.
    let mut intruder = Pod::start(
        cluster,
        director_pod,
        "ipvslb-intruder",
        &["--role=allocator", "--lease-name=intruder"],
    );
    eventually(
        "a log line naming the refused Lease",
        20 * SECOND,
        || async {
            let log = intruder.logs();
            log.lines()
                .any(|l| l.contains("forbidden") && l.contains("leases"))
                .then_some(())
        },
    )
    .await;
    assert!(
        intruder.child.try_wait().unwrap().is_none(),
        "refused, it keeps running:\n{}",
        intruder.logs()
    );
    drop(intruder);
    drop(director);
    drop(allocator);

    // Upgrade: more allocators, directors moved out of the cluster, no dashboard.
    ok(
        "helm upgrade",
        &helm_in(
            cluster,
            &[
                "upgrade",
                RELEASE,
                chart.to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--reuse-values",
                "--set",
                "allocator.replicas=3,director.enabled=false,externalDirector.enabled=true,metrics.dashboard.enabled=false",
            ],
        ),
    );
    let replicas = ok(
        "the allocator's replicas",
        &cluster.kubectl(&[
            "get",
            "deployment",
            "ipvslb-allocator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.replicas}",
        ]),
    );
    assert_eq!(replicas, "3");
    let upgraded = release_objects(cluster);
    for gone in [
        "daemonset.apps/ipvslb-director",
        "serviceaccount/ipvslb-director",
        "service/ipvslb-director-metrics",
        "configmap/ipvslb-dashboard",
        "clusterrolebinding.rbac.authorization.k8s.io/ipvslb-director",
    ] {
        assert!(!upgraded.contains(gone), "{gone} is left after the upgrade");
    }
    for kept in [
        "deployment.apps/ipvslb-allocator",
        "serviceaccount/ipvslb-external-director",
        "clusterrole.rbac.authorization.k8s.io/ipvslb-director",
        "clusterrolebinding.rbac.authorization.k8s.io/ipvslb-external-director",
    ] {
        assert!(
            upgraded.contains(kept),
            "{kept} missing after the upgrade: {upgraded:#?}"
        );
    }
    // A director outside the cluster, with the account the upgrade created for it and the
    // kubeconfig the README's commands mint: it reads what it needs and programs the VIP.
    let kubeconfig = mint_external_kubeconfig(cluster);
    let external = Pod::start_with(
        cluster,
        director_pod,
        "lvs1",
        &["--dataplane=memory"],
        &kubeconfig,
    );
    external
        .wait_ready(
            &["ipvslb_dataplane_ops_total{kind=\"add_service\",result=\"ok\"} 1"],
            30 * SECOND,
        )
        .await;
    assert!(
        !external.logs().contains("forbidden"),
        "the external director lacked a permission:\n{}",
        external.logs()
    );
    drop(external);
    let history = ok(
        "helm history",
        &helm_in(cluster, &["history", RELEASE, "--namespace", NAMESPACE]),
    );
    assert_eq!(history.lines().count(), 3, "two revisions:\n{history}");

    // Uninstall: nothing of the release is left but the CRDs and the pools (Helm keeps crds/).
    ok(
        "helm uninstall",
        &helm_in(
            cluster,
            &["uninstall", RELEASE, "--namespace", NAMESPACE, "--wait"],
        ),
    );
    let left = release_objects(cluster);
    assert!(left.is_empty(), "left after helm uninstall: {left:#?}");
    ok(
        "the CRDs outlive the release",
        &cluster.kubectl(&["get", "crd", "ippools.ipvslb.io", "nodesets.ipvslb.io"]),
    );
    ok(
        "the pool outlives the release",
        &cluster.kubectl(&["get", "ippool", "default"]),
    );
    for file in ["examples/whoami/whoami.yaml", "examples/whoami/pool.yaml"] {
        let _ = cluster.kubectl(&["delete", "-f", repo(file).to_str().unwrap()]);
    }
}

/// Each expression parsed by Prometheus' own PromQL parser (`promql-check`, built by
/// `cargo xtask apiserver build`): the metric names it selects, or the parser's error.
fn parse_promql(exprs: &[String]) -> Vec<Result<Vec<String>, String>> {
    let input: String = exprs
        .iter()
        .map(|e| format!("{}\n", Value::from(e.as_str())))
        .collect();
    let out = ok("promql-check", &promql_check(&[], &input));
    let answers: Vec<Result<Vec<String>, String>> = out
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            match v["error"].as_str() {
                Some(e) => Err(e.to_owned()),
                None => Ok(v["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect()),
            }
        })
        .collect();
    assert_eq!(answers.len(), exprs.len(), "one answer per expression");
    answers
}

/// Runs `promql-check` (built into the test cache beside helm) with `args` on `input`.
fn promql_check(args: &[&str], input: &str) -> Output {
    let version = xtask::apiserver::build::prometheus_version();
    let program = xtask::apiserver::build::cached_promql_check(&version).unwrap_or_else(|e| {
        panic!(
            "promql-check is not built: {e}\n(Go and the Go module proxy are needed to build it)"
        )
    });
    let mut command = Command::new(program);
    command.args(args);
    common::with_stdin(command, input)
}

/// What `promql-check` said, `Err` when it refused its input.
fn verdict(out: Output) -> Result<String, String> {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(said)
    }
}

/// `promql-check rules` on a rules file: what it says, `Err` when Prometheus would refuse it.
fn check_rules(groups: &str) -> Result<String, String> {
    verdict(promql_check(&["rules"], groups))
}

/// `promql-check objects` on rendered documents: `Err` with what it says when one does not
/// decode strictly into the Prometheus Operator's types.
fn check_operator_objects(docs: &[&Value]) -> Result<String, String> {
    let input: String = docs.iter().map(|d| format!("{d}\n")).collect();
    verdict(promql_check(&["objects"], &input))
}

#[test]
fn the_servicemonitor_and_the_prometheusrule_decode_strictly_into_the_operators_types() {
    let docs = documents(&template(&chart().join("ci/metrics-values.yaml")));
    let monitoring: Vec<&Value> = docs
        .iter()
        .filter(|d| d["apiVersion"] == "monitoring.coreos.com/v1")
        .collect();
    let kinds: BTreeSet<&str> = monitoring
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["PrometheusRule", "ServiceMonitor"].into());
    let said = check_operator_objects(&monitoring);
    assert!(said.is_ok(), "{said:?}");
    // A field the operator does not know is caught.
    let mut wrong = find(&docs, "ServiceMonitor", RELEASE).clone();
    wrong["spec"]["endpoints"][0]["intervall"] = Value::from("30s");
    assert!(
        check_operator_objects(&[&wrong]).is_err(),
        "an unknown field decodes"
    );
}

/// The sample names an exposition declares with its `# TYPE` lines, as PromQL sees them.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{name}{suffix}"));
        }
    }
    names
}

#[test]
fn metric_names_are_read_by_the_promql_parser_and_from_type_lines() {
    let answers = parse_promql(&[
        "100 * max(ipvslb_a{x=\"ipvslb_no\"}) / sum(rate(ipvslb_b_total[5m]))".to_owned(),
        "sum(rate(ipvslb_b_total[5m])".to_owned(),
    ]);
    assert_eq!(
        answers[0],
        Ok(vec!["ipvslb_a".to_owned(), "ipvslb_b_total".to_owned()])
    );
    assert!(
        answers[1].is_err(),
        "an unclosed parenthesis parses: {:?}",
        answers[1]
    );
    let exported = exported_names(
        "# HELP ipvslb_x X.\n# TYPE ipvslb_x counter\n# TYPE ipvslb_h histogram\n# TYPE ipvslb_g gauge\n",
    );
    for name in [
        "ipvslb_x_total",
        "ipvslb_h_bucket",
        "ipvslb_h_count",
        "ipvslb_g",
    ] {
        assert!(exported.contains(name), "{name} in {exported:?}");
    }
    assert!(!exported.contains("ipvslb_x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported_by_ipvslb_run() {
    // The expressions: the dashboard's targets and the PrometheusRule's alerts, as rendered.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/ipvslb.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push((
                format!("dashboard panel {:?}", panel["title"]),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let panels = exprs.len();
    assert!(panels >= 10, "the dashboard has only {panels} queries");
    let docs = documents(&template(&chart().join("ci/metrics-values.yaml")));
    let rule = find(&docs, "PrometheusRule", RELEASE);
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for alert in group["rules"].as_array().unwrap() {
            exprs.push((
                format!("alert {}", alert["alert"]),
                alert["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(
        exprs.len() - panels >= 7,
        "only {} alerts",
        exprs.len() - panels
    );
    // The rule groups load as Prometheus loads a rules file: fields, durations, templates.
    let groups = serde_norway::to_string(&rule["spec"]).unwrap();
    let loaded = check_rules(&groups);
    assert!(
        loaded.is_ok(),
        "the PrometheusRule does not load:\n{loaded:?}\n{groups}"
    );
    let broken = groups.replacen("{{ $labels.pool }}", "{{ $labels.pool ", 1);
    assert_ne!(broken, groups);
    assert!(check_rules(&broken).is_err(), "a broken template loads");

    // What a running `ipvslb run` exports.
    let cluster = cluster();
    let (_turn, client) = turn(&["metrics", HARNESS_NAMESPACE]).await;
    let (role, _) = Cluster::chart_role();
    ok(
        "applying the role",
        &cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]),
    );
    let kubeconfig = cluster.service_account_kubeconfig("metrics-kubeconfig");
    let class = "test.ipvslb.io/metrics";
    let ipvslb = common::Ipvslb::spawn(
        &kubeconfig,
        class,
        "metrics-test",
        &[],
        "",
        cluster.dir.join("metrics-ipvslb.log"),
    );
    // Families show in /metrics once they have a series: one Service assigned and programmed,
    // then one whose status write is refused, so each family the queries read has one.
    cluster.apply(&format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: metrics\nspec:\n  loadBalancerClass: {class}\n  addresses: [10.250.9.10-10.250.9.20]\n"
    ));
    cluster.apply(
        "apiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata:\n  name: default\nspec:\n  nodeSelector: {}\n",
    );
    cluster.apply(&common::service_yaml("metrics", "web", class, &[80], &[]));
    wait_ingress(&client, "metrics", "web", &["10.250.9.10"], 20 * SECOND).await;
    let full = Cluster::chart_role().1;
    let narrowed = common::without_service_status_writes(&full);
    ok(
        "narrowing the role",
        &cluster.kubectl_stdin(&["apply", "-f", "-"], &narrowed),
    );
    cluster.apply(&common::service_yaml("metrics", "api", class, &[80], &[]));
    let families = [
        "# TYPE ipvslb_pool_addresses ",
        "# TYPE ipvslb_assignments ",
        "# TYPE ipvslb_reconcile_duration_seconds ",
        "# TYPE ipvslb_reconcile_errors ",
        "# TYPE ipvslb_dataplane_ops ",
    ];
    let deadline = std::time::Instant::now() + 30 * SECOND;
    let exposition = loop {
        let answer = ipvslb.get("/metrics");
        let body = common::body(&answer).to_owned();
        let missing: Vec<_> = families.iter().filter(|f| !body.contains(*f)).collect();
        if missing.is_empty() {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "families without a series: {missing:?}\n{body}\nlog:\n{}",
            ipvslb.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ok(
        "restoring the role",
        &cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]),
    );
    let exported = exported_names(&exposition);
    assert!(exported.contains("ipvslb_leader"), "{exposition}");
    let mut unknown = Vec::new();
    let texts: Vec<String> = exprs.iter().map(|(_, e)| e.clone()).collect();
    for ((whence, expr), parsed) in exprs.iter().zip(parse_promql(&texts)) {
        let names =
            parsed.unwrap_or_else(|e| panic!("{whence}: PromQL does not parse: {e}\n{expr}"));
        assert!(!names.is_empty(), "{whence} reads no metric: {expr}");
        for name in names {
            if !exported.contains(&name) {
                unknown.push(format!("{whence}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics that `ipvslb run` does not export:\n{}\nexported: {exported:#?}",
        unknown.join("\n")
    );
}

/// The rules of a chart rules file, each with the comment lines before it.
fn rules_of(text: &str) -> Vec<String> {
    let mut rules: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("- ") {
            rules.push(std::mem::take(&mut pending));
        }
        let target = if line.starts_with('#') || rules.is_empty() {
            &mut pending
        } else {
            rules.last_mut().unwrap()
        };
        target.push_str(line);
        target.push('\n');
    }
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_one_rule_of_the_charts_roles_the_binary_fails_and_says_so() {
    let cluster = cluster();
    let (_turn, _client) = turn(&["minimal", HARNESS_NAMESPACE]).await;
    let class = "test.ipvslb.io/minimal";
    cluster.apply(&format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: minimal\nspec:\n  loadBalancerClass: {class}\n  announce: L2\n  addresses: [10.250.8.10-10.250.8.100]\n---\napiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata:\n  name: default\nspec:\n  nodeSelector: {{}}\n"
    ));
    // Ready nodes, so that the director has destinations and announces its VIPs.
    common::make_nodes_ready(cluster);
    let header = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: ipvslb\nrules:\n";
    let kubeconfig = cluster.service_account_kubeconfig("minimal-kubeconfig");
    let mut service = 0;
    // (the files whose rules the role holds, the role run, the file whose rules go one by one)
    for (files, role, file) in [
        (&["allocator", "lease"][..], "allocator", "allocator"),
        (&["allocator", "lease"][..], "allocator", "lease"),
        // In L2 mode (below), so that its Lease, its Director and the Announced condition
        // are written too.
        (&["director", "director-lease"][..], "director", "director"),
        (
            &["director", "director-lease"][..],
            "director",
            "director-lease",
        ),
    ] {
        let rules = rules_of(&common::chart_rules(file));
        assert!(!rules.is_empty(), "no rules in {file}.yaml");
        for (dropped, rule) in rules.iter().enumerate() {
            let mut text = header.to_owned();
            for f in files {
                if *f == file {
                    for (i, r) in rules.iter().enumerate() {
                        if i != dropped {
                            text.push_str(r);
                        }
                    }
                } else {
                    text.push_str(&common::chart_rules(f));
                }
            }
            ok(
                "applying the narrowed role",
                &cluster.kubectl_stdin(&["apply", "-f", "-"], &text),
            );
            // A fresh Service for each run, so that each run has an assignment to make.
            service += 1;
            let name = format!("web{service}");
            cluster.apply(&common::service_yaml("minimal", &name, class, &[80], &[]));
            if role == "director" {
                // The director needs a VIP to program: the admin gives one by hand, to two
                // Services sharing it whose ports collide, so that it also has a Warning to
                // publish on the younger.
                let ip = format!("10.250.8.{}", 10 + service);
                let twin = format!("{name}-twin");
                let key = format!("k{service}");
                for n in [&name, &twin] {
                    cluster.apply(&common::service_yaml(
                        "minimal",
                        n,
                        class,
                        &[80],
                        &[("ipvslb.io/allow-shared-ip", &key)],
                    ));
                }
                let patch = format!(
                    "{{\"status\":{{\"loadBalancer\":{{\"ingress\":[{{\"ip\":\"{ip}\",\"ipMode\":\"VIP\"}}]}}}}}}"
                );
                for n in [&name, &twin] {
                    ok(
                        "setting a VIP",
                        &cluster.kubectl(&[
                            "patch",
                            "service",
                            n,
                            "-n",
                            "minimal",
                            "--subresource=status",
                            "--type=merge",
                            "-p",
                            &patch,
                        ]),
                    );
                }
            }
            let role_flag = format!("--role={role}");
            let mut ipvslb = common::Ipvslb::spawn(
                &kubeconfig,
                class,
                &format!("minimal-{service}"),
                &[
                    &role_flag,
                    "--l2-interface",
                    "seg0",
                    "--director-name",
                    "minimal",
                ],
                "",
                cluster.dir.join(format!("minimal-{service}.log")),
            );
            let said = eventually(
                &format!("a refusal without this rule of {file}.yaml:\n{rule}"),
                30 * SECOND,
                || async {
                    let log = ipvslb.logs();
                    let ready = ipvslb.get("/readyz");
                    if log.contains("forbidden") {
                        Some(format!(
                            "log: {}",
                            log.lines().find(|l| l.contains("forbidden")).unwrap()
                        ))
                    } else if status(&ready) == Some(503)
                        && common::body(&ready).contains("forbidden")
                    {
                        Some(format!("/readyz: {}", common::body(&ready)))
                    } else {
                        None
                    }
                },
            )
            .await;
            eprintln!("without rule {dropped} of {file}.yaml: {said}");
            assert!(
                ipvslb.exited().is_none(),
                "without a rule it keeps running:\n{}",
                ipvslb.logs()
            );
        }
    }
    // The full role again, for the tests after this one. (With every rule neither happens:
    // the install test runs both roles with the chart's accounts and finds no refusal.)
    let (role, _) = Cluster::chart_role();
    ok(
        "the full role",
        &cluster.kubectl(&["apply", "-f", role.to_str().unwrap()]),
    );
}

#[test]
fn every_value_of_the_chart_is_commented() {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    // (indentation, documented) of the keys enclosing the current line.
    let mut ancestors: Vec<(usize, bool)> = Vec::new();
    let mut comment = false;
    let mut undocumented = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            comment = false;
            continue;
        }
        if trimmed.starts_with('#') {
            comment = true;
            continue;
        }
        while ancestors.last().is_some_and(|(i, _)| *i >= indent) {
            ancestors.pop();
        }
        let inherited = ancestors.iter().any(|(_, documented)| *documented);
        let Some((key, value)) = trimmed.split_once(':') else {
            comment = false;
            continue;
        };
        if trimmed.starts_with("- ") {
            comment = false;
            continue;
        }
        let documented = comment || inherited;
        // A key with nothing after the colon opens a map of keys below it.
        let opens = value.trim().is_empty()
            && lines
                .get(n + 1)
                .is_some_and(|next| next.len() - next.trim_start().len() > indent);
        if !opens && !documented {
            undocumented.push(format!("line {}: {key}", n + 1));
        }
        ancestors.push((indent, documented));
        comment = false;
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment:\n{}",
        undocumented.join("\n")
    );
}

#[test]
fn the_pods_run_hardened_the_allocator_as_non_root_the_director_with_net_admin_alone() {
    let docs = documents(&template(&chart().join("ci/default-values.yaml")));
    let allocator = &find(&docs, "Deployment", "-allocator")["spec"]["template"]["spec"];
    let container = &allocator["containers"][0];
    assert_eq!(allocator["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        allocator["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(container["securityContext"]["capabilities"]["add"].is_null());
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["valueFrom"]["fieldRef"].is_object())
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(env, ["POD_NAME", "POD_NAMESPACE"]);
    assert_eq!(
        find(&docs, "Deployment", "-allocator")["spec"]["replicas"],
        2
    );
    find(&docs, "PodDisruptionBudget", "-allocator");

    let director = &find(&docs, "DaemonSet", "-director")["spec"]["template"]["spec"];
    let container = &director["containers"][0];
    assert_eq!(director["hostNetwork"], true);
    assert_eq!(
        director["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--role=director")
    );
    assert_eq!(director["nodeSelector"]["ipvslb.io/director"], "true");
    assert!(director["tolerations"].is_array());

    // One value turns the directors off, and their account with them.
    let chart = chart();
    let off = documents(&ok(
        "helm template without directors",
        &helm(&[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--set",
            "director.enabled=false",
        ]),
    ));
    assert!(!off.iter().any(|d| d["kind"] == "DaemonSet"));
    assert!(
        !off.iter()
            .any(|d| d["metadata"]["name"] == "ipvslb-director")
    );
}

/// The two metrics added for the alerts count what their alerts say: Services refused for want
/// of an address, and kernel writes the director's full pass makes to repair drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_metrics_count_pending_services_and_repaired_drift() {
    use ipvslb::dataplane::Dataplane;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, DeleteParams};

    let cluster = cluster();
    let (_turn, client) = turn(&["alerts"]).await;
    let class = "test.ipvslb.io/alerts";
    cluster.apply(&format!(
        "apiVersion: ipvslb.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: alerts\nspec:\n  loadBalancerClass: {class}\n  addresses: [10.250.7.10/32]\n---\napiVersion: ipvslb.io/v1alpha1\nkind: NodeSet\nmetadata:\n  name: default\nspec:\n  nodeSelector: {{}}\n"
    ));
    let controllers = common::Controllers::start(&client, common::classes(class));
    let metrics = controllers.metrics.clone();
    cluster.apply(&common::service_yaml("alerts", "first", class, &[80], &[]));
    wait_ingress(&client, "alerts", "first", &["10.250.7.10"], 20 * SECOND).await;
    assert_eq!(metrics.services_pending.get(), 0);
    cluster.apply(&common::service_yaml("alerts", "second", class, &[80], &[]));
    eventually(
        "the second Service counted pending",
        20 * SECOND,
        || async { (metrics.services_pending.get() == 1).then_some(()) },
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), "alerts");
    services
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_ingress(&client, "alerts", "second", &["10.250.7.10"], 20 * SECOND).await;
    eventually("no Service pending", 20 * SECOND, || async {
        (metrics.services_pending.get() == 0).then_some(())
    })
    .await;

    // Drift: someone takes the VIP off the interface; the full pass (every 2 s here) puts it back
    // and counts the write.
    let vip: std::net::IpAddr = "10.250.7.10".parse().unwrap();
    eventually("the VIP on the interface", 20 * SECOND, || async {
        controllers
            .dataplane
            .addresses()
            .ok()?
            .contains(&vip)
            .then_some(())
    })
    .await;
    let before = metrics.full_pass_repairs.get();
    controllers.dataplane.del_address(vip).unwrap();
    eventually("the full pass to repair the drift", 20 * SECOND, || async {
        let back = controllers.dataplane.addresses().ok()?.contains(&vip);
        (back && metrics.full_pass_repairs.get() > before).then_some(())
    })
    .await;
    controllers.stop().await;
}

#[test]
fn the_director_tier_values_become_flags_that_ipvslb_run_has() {
    let docs = documents(&template(&chart().join("ci/director-tier-values.yaml")));
    let director = &find(&docs, "DaemonSet", "-director")["spec"]["template"]["spec"];
    assert_eq!(director["terminationGracePeriodSeconds"], 30);
    let args: Vec<&str> = director["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for wanted in [
        "--announce-interface=ipvslb-announce",
        "--drain-on-stop=5s",
        "--sync-interface=eth1",
        "--sync-id=7",
    ] {
        assert!(args.contains(&wanted), "no {wanted} in {args:?}");
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ipvslb"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for flag in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("--{name}")),
            "`ipvslb run` has no --{name}"
        );
    }
    // Without the values, no announcement and no sync daemon.
    let defaults = documents(&template(&chart().join("ci/default-values.yaml")));
    let args = &find(&defaults, "DaemonSet", "-director")["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    let args = args.to_string();
    assert!(
        !args.contains("--announce-interface") && !args.contains("--sync-interface"),
        "{args}"
    );
}
