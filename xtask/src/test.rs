//! `cargo xtask test`: every test of the project, with what they need first.
//!
//! 1. the real kube-apiserver, etcd, kubectl and kube-proxy (built from their Go modules once,
//!    then cached), which the controller tests and the end-to-end run start, and helm and
//!    promql-check (Prometheus' PromQL parser), which the chart's tests run (and
//!    `systemd-analyze`, from apt when missing, for the director unit's tests);
//! 2. `cargo test --workspace` (unit, property, CLI and controller tests);
//! 3. `cargo xtask image-binary`: the Dockerfile's static binary, built and run;
//! 4. `cargo xtask vm-test`: the kernel tests in a qemu VM;
//! 5. `cargo xtask e2e`: the write-up's demo end to end (API server here, the rest in the VM).

use std::process::Command;

use xtask::apiserver::build;

/// Runs the steps in order and stops at the first failure.
pub fn run(args: &[String]) -> Result<(), String> {
    println!("== building (or reusing) kube-apiserver, etcd, kubectl and kube-proxy");
    build::ensure_kube_proxy(&build::Versions::from_env())?;
    println!("== building (or reusing) helm, for the chart's tests");
    build::ensure_helm(&build::helm_version())?;
    build::ensure_promql_check(&build::prometheus_version())?;
    println!("== systemd-analyze, for the director unit's tests");
    crate::vm::install_missing("test", &[("/usr/bin/systemd-analyze", "systemd")])?;
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
