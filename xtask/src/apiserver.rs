//! `cargo xtask apiserver build|start|stop`: a real kube-apiserver and etcd on loopback for tests.
//!
//! - `build` compiles `kube-apiserver`, `kubectl`, `kube-proxy` and `etcd` from their Go modules with the installed
//!   Go into `${IPVSLB_CACHE:-$HOME/.cache/ipvslb}/k8s/<version>/bin/`, and `helm` into
//!   `.../helm/<version>/bin/`; cached binaries are reused.
//! - `start --dir DIR` starts etcd and kube-apiserver on 127.0.0.1 (free ports, fresh certificates,
//!   a static admin token in `system:masters`, RBAC authorization), waits for `/readyz`, writes
//!   `DIR/kubeconfig` and links `DIR/bin/kubectl`; both processes keep running in the background.
//! - `stop --dir DIR` stops both processes and removes what `start` wrote.
//!
//! Test harnesses call [`build::ensure`], [`server::start`] and [`server::Server::stop`] (or
//! [`server::stop`] with a directory) directly.

pub mod build;
pub mod certs;
pub mod server;

use std::path::PathBuf;
use std::time::Instant;

/// The usage text of `cargo xtask apiserver`.
const USAGE: &str = "usage: cargo xtask apiserver <command>

commands:
  build                  build kube-apiserver, kubectl, kube-proxy, etcd, helm and promql-check (skipped when cached)
  start --dir DIR        start etcd and kube-apiserver in the background; writes DIR/kubeconfig
  stop --dir DIR         stop them and remove what start wrote (--keep-logs keeps DIR/*.log)

options:
  --kubernetes-version V   Kubernetes release to build/use (default: $IPVSLB_KUBERNETES_VERSION or built-in)
  --etcd-version V         etcd release to build (default: $IPVSLB_ETCD_VERSION or built-in)
";

/// Runs `cargo xtask apiserver <args>`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut command = None;
    let mut dir = None;
    let mut keep_logs = false;
    let mut versions = build::Versions::from_env();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--kubernetes-version" => versions.kubernetes = value("--kubernetes-version")?,
            "--etcd-version" => versions.etcd = value("--etcd-version")?,
            "--keep-logs" => keep_logs = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other if command.is_none() && !other.starts_with('-') => {
                command = Some(other.to_owned())
            }
            other => return Err(format!("unexpected argument {other:?}\n\n{USAGE}")),
        }
    }
    let need_dir = || {
        dir.clone()
            .ok_or_else(|| format!("--dir DIR is required\n\n{USAGE}"))
    };
    match command.as_deref() {
        Some("build") => {
            let bins = build::ensure_kube_proxy(&versions)?;
            println!("binaries in {}", bins.dir.display());
            let helm = build::ensure_helm(&build::helm_version())?;
            println!("helm: {}", helm.display());
            let check = build::ensure_promql_check(&build::prometheus_version())?;
            println!("promql-check: {}", check.display());
            Ok(())
        }
        Some("start") => {
            let dir = need_dir()?;
            let bins = build::cached(&versions)?;
            let started = Instant::now();
            let mut options = server::Options::new(&dir, bins);
            options.detach = true;
            let server = server::start(&options)?;
            println!(
                "kube-apiserver {} ready at {} in {:.2}s",
                versions.kubernetes,
                server.url,
                started.elapsed().as_secs_f64()
            );
            println!("kubeconfig: {}", server.kubeconfig.display());
            println!("kubectl:    {}", server.kubectl.display());
            server.detach();
            Ok(())
        }
        Some("stop") => server::stop(&need_dir()?, keep_logs),
        _ => Err(USAGE.to_owned()),
    }
}
