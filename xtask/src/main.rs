//! Developer tasks, run as `cargo xtask <task>`:
//!
//! - `crds`: write `crds/*.yaml` (and the chart's copy) from the Rust types.
//! - `vm-test`, `vm-bench`: the kernel test VM.
//! - `apiserver start|stop --dir DIR`: a real kube-apiserver and etcd on loopback.

use std::process::ExitCode;

mod apiserver;
mod crds;
mod vm;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("crds") => crds::write(),
        Some("vm-test") => vm::test(&args[1..]),
        Some("vm-bench") => vm::bench(&args[1..]),
        Some("apiserver") => apiserver::run(&args[1..]),
        _ => Err(format!(
            "usage: cargo xtask <task>\n\ntasks:\n  crds          write crds/*.yaml from the API types\n"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
