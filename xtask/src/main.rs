//! Developer tasks, run as `cargo xtask <task>`:
//!
//! - `crds`: write `crds/*.yaml` (and the chart's copy) from the Rust types.
//! - `vm-test`, `vm-bench`: the kernel test VM.
//! - `e2e`: the end-to-end run (API server on the host; director, nodes with kube-proxy, pods
//!   and client in the VM). `relay` is its helper, run by qemu.
//! - `test`: every test (API server build if needed, `cargo test --workspace`, the image's
//!   static binary, the VM tests).
//! - `image-binary`: build the binary the Dockerfile copies, prove it static, run it.
//! - `apiserver start|stop --dir DIR`: a real kube-apiserver and etcd on loopback.

use std::process::ExitCode;

use xtask::{apiserver, crds, image};
mod e2e;
mod test;
mod vm;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  test                       every test: builds the API server if needed, cargo test, the VM tests
  crds                       write crds/*.yaml from the API types
  image-binary               build the Dockerfile's static binary, check it and run it
  apiserver build|start|stop  a real kube-apiserver and etcd on loopback (see --help)
  vm-test, vm-bench          the kernel test VM
  e2e                        the write-up's demo end to end: API server on the host, director,
                             kube-proxy nodes and pods in the kernel VM
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("crds") => crds::write(),
        Some("test") => test::run(&args[1..]),
        Some("image-binary") => image::run(&args[1..]),
        Some("vm-test") => vm::test(&args[1..]),
        Some("vm-bench") => vm::bench(&args[1..]),
        Some("e2e") => e2e::run(&args[1..]),
        Some("relay") => e2e::relay(&args[1..]),
        Some("apiserver") => apiserver::run(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
