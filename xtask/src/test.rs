//! `cargo xtask test`: every test of the project, with what they need first.
//!
//! 1. the real kube-apiserver, etcd, kubectl and kube-proxy (built from their Go modules once,
//!    then cached), which the controller tests and the end-to-end run start, and helm and
//!    promql-check (Prometheus' PromQL parser), which the chart's tests run (and, from apt
//!    when missing, `systemd-analyze` for the director unit's tests and BIRD and FRR for the
//!    routing daemons' configurations);
//! 2. `cargo test --workspace` (unit, property, CLI and controller tests);
//! 3. `cargo xtask image-binary`: the Dockerfile's static binary, built and run;
//! 4. `cargo xtask vm-test`: the kernel tests in a qemu VM;
//! 5. `cargo xtask e2e`: the write-up's demo end to end (API server here, the rest in the VM).

use std::path::Path;
use std::process::Command;

use xtask::apiserver::build;

/// Runs the steps in order and stops at the first failure.
pub fn run(args: &[String]) -> Result<(), String> {
    if std::env::var_os("IPVSLB_E2E_STEPS").is_some_and(|v| !v.is_empty()) {
        return Err(
            "IPVSLB_E2E_STEPS is set: cargo xtask test runs every end-to-end step; unset it"
                .to_owned(),
        );
    }
    println!("== building (or reusing) kube-apiserver, etcd, kubectl and kube-proxy");
    build::ensure_kube_proxy(&build::Versions::from_env())?;
    println!("== building (or reusing) helm, for the chart's tests");
    build::ensure_helm(&build::helm_version())?;
    build::ensure_promql_check(&build::prometheus_version())?;
    build::clean_go_caches()?;
    println!("== systemd-analyze, for the director unit's tests");
    // `systemd-analyze verify` looks up the unit's `Documentation=man:ipvsadm(8)` too.
    crate::vm::install_missing(
        "test",
        &[
            ("/usr/bin/systemd-analyze", "systemd"),
            ("/usr/share/man/man8/ipvsadm.8.gz", "ipvsadm"),
        ],
    )?;
    println!("== BIRD and FRR, for the routing daemons' configurations");
    install_routing_daemons()?;
    println!("== cargo test --workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(["test", "--workspace", "--locked"])
        .args(args)
        .status()
        .map_err(|e| format!("running {cargo} test: {e}"))?;
    if !status.success() {
        return Err(format!("cargo test failed ({status})"));
    }
    println!("== the image's static binary");
    xtask::image::run(&[])?;
    println!("== kernel tests in the VM");
    crate::vm::test(&[])?;
    println!("== end to end: the write-up's demo");
    crate::e2e::run(&[])
}

/// bird2 and frr, whose parsers check `deploy/bird/` and `deploy/frr/`. On a host run by
/// systemd their packages start the daemons with Debian's default configurations; the tests
/// only parse files, so what this installs is stopped and left disabled.
fn install_routing_daemons() -> Result<(), String> {
    let tools = [
        ("/usr/sbin/bird", "bird2", "bird.service"),
        ("/usr/bin/vtysh", "frr", "frr.service"),
    ];
    let installing: Vec<&str> = tools
        .iter()
        .filter(|(path, _, _)| !Path::new(path).exists())
        .map(|(_, _, unit)| *unit)
        .collect();
    let paths: Vec<(&str, &str)> = tools.iter().map(|(p, pkg, _)| (*p, *pkg)).collect();
    crate::vm::install_missing("test", &paths)?;
    if installing.is_empty() || !Path::new("/run/systemd/system").exists() {
        return Ok(());
    }
    crate::vm::run_checked(
        Command::new("systemctl")
            .args(["disable", "--now"])
            .args(&installing),
    )
}
