//! End to end, in the kernel VM (`cargo xtask e2e`): the write-up's demo with every part real.
//!
//! The root network namespace is the director; namespaces are the client, the nodes (each with a
//! real kube-proxy in iptables mode reading the API server) and the pods behind them (whoami
//! servers). `ipvslb run` programs the kernel's IPVS from what `kubectl apply` wrote. Each step
//! prints `ok STEP` or `FAILED STEP: ...`; the run ends with `N passed, M failed`.
//!
//! The binary is also the pods' server (`whoami NAME ADDR...`) and the client
//! (`ask ADDR COUNT EVERY_MS`), run in the namespaces with `nsenter`.

mod cluster;
mod hosts;
mod l2;
mod relay;
mod steps;
mod tier;
mod web;
mod witness;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("whoami") => web::serve(&args[1..]),
        Some("ask") => web::ask(&args[1..]),
        Some("streams") => web::streams(&args[1..]),
        Some("run") => steps::run(),
        _ => Err(
            "usage: e2e run | whoami NAME ADDR:PORT... | ask ADDR:PORT COUNT EVERY_MS \
                  (the run needs the VM that `cargo xtask e2e` boots)"
                .to_owned(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("e2e: {message}");
            ExitCode::FAILURE
        }
    }
}
