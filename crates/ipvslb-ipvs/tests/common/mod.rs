//! Builders shared by the integration tests.

#![allow(dead_code)]

use std::net::IpAddr;

use ipvslb_ipvs::{
    Destination, ForwardingMethod, Op, Protocol, Scheduler, ServiceKey, Table, VirtualService,
};

/// An address from text that the test itself wrote.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// A TCP service key.
pub fn tcp(address: &str, port: u16) -> ServiceKey {
    ServiceKey::addr(ip(address), Protocol::Tcp, port)
}

/// A UDP service key.
pub fn udp(address: &str, port: u16) -> ServiceKey {
    ServiceKey::addr(ip(address), Protocol::Udp, port)
}

/// A round-robin service.
pub fn rr(key: ServiceKey) -> VirtualService {
    VirtualService::new(key, Scheduler::Rr)
}

/// A direct-routing destination.
pub fn dest(address: &str, port: u16, weight: u32) -> Destination {
    Destination::new(ip(address), port, ForwardingMethod::Route, weight)
}

/// A table of services with their destinations.
pub fn table<const N: usize>(entries: [(VirtualService, Vec<Destination>); N]) -> Table {
    let mut table = Table::new();
    for (service, destinations) in entries {
        table.insert(service, destinations);
    }
    table
}

/// `ops` applied one by one to a copy of `table`, panicking with the op the table refused.
pub fn applied(table: &Table, ops: &[Op]) -> Table {
    let mut out = table.clone();
    for op in ops {
        if let Err(e) = out.apply(op) {
            panic!("{op} was refused: {e}");
        }
    }
    out
}

/// Runs a command of a kernel test's setup; its failure is an error with its output.
pub fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` in the network namespace `ns`.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec![net.as_str()];
    all.extend_from_slice(args);
    sh("nsenter", &all)
}

/// The exit status of a kernel test binary's `main`: its error, if any, on stderr after `name`.
pub fn exit(name: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{name}: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
