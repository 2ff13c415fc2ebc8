//! The API side: `kubectl` as users run it, a kube client where a step times an API write, and
//! the objects a kubelet and the EndpointSlice controller would write (no kubelet runs here).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};

use crate::hosts::{NODES, PODS, Pod};

/// The admin kubeconfig of the director (and of `kubectl`).
pub const KUBECONFIG: &str = "/e2e/kubeconfig";

/// `kubectl ARGS`, its standard output, or an error with what it printed.
pub fn kubectl(args: &[&str]) -> Result<String, String> {
    kubectl_with_input(args, None)
}

/// `kubectl apply -f -` of `yaml`.
pub fn apply(yaml: &str) -> Result<String, String> {
    kubectl_with_input(&["apply", "-f", "-"], Some(yaml))
}

/// `kubectl create -f -` of `yaml`: written once, without `apply`'s last-applied annotation.
pub fn create(yaml: &str) -> Result<String, String> {
    kubectl_with_input(&["create", "-f", "-"], Some(yaml))
}

fn kubectl_with_input(args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(KUBECONFIG)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to kubectl: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`kubectl {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `check` every `every` until it gives a value or `timeout` passes; the error then says
/// what was awaited and the last thing seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing yet");
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: not within {timeout:?} (last: {last})"));
        }
        std::thread::sleep(every);
    }
}

/// The test's Nodes, as kubelets would register them: both addresses, Ready, and the label the
/// example's NodeSet selects.
pub fn nodes_yaml() -> String {
    NODES
        .iter()
        .map(|node| {
            format!(
                "apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels:
    kubernetes.io/hostname: {name}
    ipvslb.io/backend: \"true\"
status:
  addresses:
  - type: InternalIP
    address: {v4}
  - type: InternalIP
    address: {v6}
  - type: Hostname
    address: {name}
  conditions:
  - type: Ready
    status: \"True\"
    reason: KubeletReady
",
                name = node.name,
                v4 = node.v4,
                v6 = node.v6
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Which address family an EndpointSlice holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// An EndpointSlice of `service` with `pods` on port 80 under the Service's port name, as the
/// EndpointSlice controller would write it.
pub fn slice_yaml(service: &str, port_name: &str, family: Family, pods: &[Pod]) -> String {
    let (suffix, kind) = match family {
        Family::V4 => ("v4", "IPv4"),
        Family::V6 => ("v6", "IPv6"),
    };
    let endpoints: String = pods
        .iter()
        .map(|pod| {
            let addr = match family {
                Family::V4 => pod.v4(),
                Family::V6 => pod.v6(),
            };
            format!(
                "- addresses: [\"{addr}\"]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: {node}
  targetRef: {{kind: Pod, namespace: default, name: {pod}}}
",
                node = NODES[pod.node].name,
                pod = pod.name
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{suffix}
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
    endpointslice.kubernetes.io/managed-by: e2e.ipvslb.io
addressType: {kind}
ports:
- name: {port_name}
  port: 80
  protocol: TCP
endpoints:
{endpoints}"
    )
}

/// The pods on `node`.
pub fn pods_on(node: usize) -> Vec<Pod> {
    PODS.iter().copied().filter(|p| p.node == node).collect()
}

/// A kube client for the steps that time an API write.
pub struct Kube {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Kube {
    pub fn connect() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a runtime: {e}"))?;
        let client = runtime.block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(KUBECONFIG)
                .map_err(|e| format!("reading {KUBECONFIG}: {e}"))?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| format!("loading {KUBECONFIG}: {e}"))?;
            kube::Client::try_from(config).map_err(|e| format!("a client for {KUBECONFIG}: {e}"))
        })?;
        Ok(Self { runtime, client })
    }

    /// Writes the Ready condition of `node`, as its kubelet (or the node lifecycle controller)
    /// would.
    pub fn set_ready(&self, node: &str, ready: bool) -> Result<(), String> {
        let api: Api<Node> = Api::all(self.client.clone());
        let status = if ready { "True" } else { "False" };
        let reason = if ready {
            "KubeletReady"
        } else {
            "NodeStatusUnknown"
        };
        let patch = serde_json::json!({
            "status": {"conditions": [{"type": "Ready", "status": status, "reason": reason}]}
        });
        self.runtime
            .block_on(api.patch_status(node, &PatchParams::default(), &Patch::Merge(&patch)))
            .map(drop)
            .map_err(|e| format!("writing the Ready condition of node {node}: {e}"))
    }

    /// Writes `status.loadBalancer.ingress` of Service `default/name` itself, as a load balancer
    /// would.
    pub fn set_ingress(&self, name: &str, ip: &str) -> Result<(), String> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), "default");
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        self.runtime
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .map(drop)
            .map_err(|e| format!("writing the status of Service default/{name}: {e}"))
    }

    /// The addresses in the Service's `status.loadBalancer.ingress`.
    pub fn ingress(&self, name: &str) -> Result<Vec<String>, String> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), "default");
        let service = self
            .runtime
            .block_on(api.get(name))
            .map_err(|e| format!("reading Service default/{name}: {e}"))?;
        Ok(service
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip)
            .collect())
    }
}
