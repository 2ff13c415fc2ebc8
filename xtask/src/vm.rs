//! The kernel test VM: `cargo xtask vm-test` and `cargo xtask vm-bench`.
//!
//! The machines we build on run a kernel without IPVS, so the kernel half of `ipvslb-ipvs` is
//! proven in a small VM: a Debian cloud kernel (fetched once with apt into a cache outside the
//! repository), an initramfs holding busybox, the few modules IPVS needs, `ipvsadm`, iproute2's
//! `ip`, `nsenter` and the test binaries with their shared libraries, booted by qemu with the
//! serial console as the only channel. `/init` runs the binaries, prints a marker line with their
//! exit status and powers the VM off; this side waits for the marker with a deadline.

pub mod boot;
pub mod initramfs;
pub mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel tests (`crates/ipvslb-ipvs/tests/kernel_*.rs`).
    Test,
    /// The netlink benchmark.
    Bench,
}

/// `cargo xtask vm-test [FILTER...]`: the kernel tests in the VM. Arguments go to each test binary.
pub fn test(args: &[String]) -> Result<(), String> {
    run(Mode::Test, args)
}

/// `cargo xtask vm-bench`: the netlink benchmark in the VM.
pub fn bench(args: &[String]) -> Result<(), String> {
    run(Mode::Bench, args)
}

fn run(mode: Mode, args: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let cache = xtask::cache_root().join("vm");
    std::fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;

    host_tools()?;
    let kernel = kernel::fetch(&cache)?;
    eprintln!("vm: kernel {}", kernel.version);

    let binaries = build_binaries(mode)?;
    let contents = initramfs::Contents::for_tests(mode, binaries, args);
    let initrd = initramfs::build(&cache, &kernel, &contents)?;
    eprintln!(
        "vm: initramfs {} ready after {:.1?}",
        initrd.display(),
        started.elapsed()
    );

    let timeout = std::env::var("IPVSLB_VM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(match mode {
            Mode::Test => 600,
            Mode::Bench => 1800,
        });
    let outcome = boot::run(
        &kernel.vmlinuz,
        &initrd,
        &boot::Machine::isolated(),
        timeout,
    )?;
    eprintln!(
        "vm: marker after {:.1?} of VM time; whole run {:.1?}",
        outcome.to_marker,
        started.elapsed()
    );
    if outcome.status == 0 {
        if mode == Mode::Bench {
            // The ratios, last, whatever the VM printed after them.
            for line in outcome.lines.iter().filter(|l| {
                BENCH_RATIOS
                    .iter()
                    .any(|ratio| l.strip_prefix(ratio).is_some_and(|r| r.starts_with(" = ")))
            }) {
                println!("{line}");
            }
        }
        Ok(())
    } else {
        Err(format!(
            "the tests in the VM failed (exit status {}); the VM's output is above",
            outcome.status
        ))
    }
}

/// The ratios the benchmark prints (`NAME = VALUE`), echoed at the end of `vm-bench`.
const BENCH_RATIOS: [&str; 4] = [
    "naive/ipvslb",
    "restore/ipvslb",
    "ipvslb/floor",
    "dump/ipvsadm-list",
];

/// The host programs the harness needs, each with the Debian package that has it.
const HOST_TOOLS: [(&str, &str); 8] = [
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/bin/cpio", "cpio"),
    ("/usr/sbin/depmod", "kmod"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/sbin/ipvsadm", "ipvsadm"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/bin/ldd", "libc-bin"),
];

/// Installs whatever of [`HOST_TOOLS`] is missing, with apt.
pub fn host_tools() -> Result<(), String> {
    install_missing("vm", &HOST_TOOLS)
}

/// Installs the Debian package of each `(path, package)` whose path is missing, with apt.
pub fn install_missing(who: &str, tools: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("{who}: installing {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if install() {
        return Ok(());
    }
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    if install() {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", missing.join(" ")))
    }
}

/// Builds the binaries the VM runs and returns their paths.
fn build_binaries(mode: Mode) -> Result<Vec<PathBuf>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    // The whole workspace, as `cargo test --workspace` resolves it, so that the dependencies'
    // features unify the same way and nothing is compiled twice; `--test` picks the targets.
    command.args(["test", "--workspace"]);
    match mode {
        // The director's kernel tests too: its converger over the real data plane.
        Mode::Test => command.args(["--features", "ipvslb/kernel-tests"]),
        Mode::Bench => &mut command,
    };
    command.args([
        "--features",
        "ipvslb-ipvs/kernel-tests",
        "--no-run",
        "--message-format=json",
    ]);
    match mode {
        Mode::Test => command.args(["--test", "kernel_*"]),
        Mode::Bench => command.args(["--release", "--test", "kernel_bench"]),
    };
    let mut binaries: Vec<PathBuf> = executables(&mut command, "the kernel test binaries")?
        .into_iter()
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kernel_"))
        })
        .filter(|path| mode == Mode::Bench || !path.to_string_lossy().contains("kernel_bench"))
        .collect();
    binaries.sort();
    binaries.dedup();
    if binaries.is_empty() {
        return Err("cargo built no kernel_* test binary".to_owned());
    }
    Ok(binaries)
}

/// Runs a `cargo ... --message-format=json` build and returns the executables it produced.
pub fn executables(command: &mut Command, what: &str) -> Result<Vec<PathBuf>, String> {
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!("building {what} failed"));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|line| xtask::json_string(line, "executable"))
        .map(PathBuf::from)
        .collect())
}

/// Runs `command`, failing with its name when it does not succeed.
pub fn run_checked(command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

/// Runs `command` and returns its standard output.
pub fn output_of(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
