//! Booting the VM under qemu and reading its serial console until the marker.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::initramfs::MARKER;

/// The virtual machine to boot.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs (TCG runs one host thread per CPU).
    pub cpus: u32,
    /// The `-nic` option, or none for a VM without a network card.
    pub nic: Option<String>,
}

impl Machine {
    /// The kernel tests' VM: 1 GiB, one CPU, no network card.
    pub fn isolated() -> Self {
        Self {
            memory_mib: 1024,
            cpus: 1,
            nic: None,
        }
    }
}

/// How a VM run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit status `/init` reported.
    pub status: i32,
    /// From starting qemu to the marker.
    pub to_marker: Duration,
    /// Every line the VM printed.
    pub lines: Vec<String>,
}

/// Boots `vmlinuz` with `initrd`, echoes the console, and returns the status in the marker line.
/// Fails when the marker does not come within `timeout_secs` or qemu ends without it; the VM is
/// killed if it has not powered itself off shortly after the marker.
pub fn run(
    vmlinuz: &Path,
    initrd: &Path,
    machine: &Machine,
    timeout_secs: u64,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg"])
        .arg("-m")
        .arg(machine.memory_mib.to_string())
        .arg("-smp")
        .arg(machine.cpus.to_string())
        .args(["-nographic", "-no-reboot", "-nic"])
        .arg(machine.nic.as_deref().unwrap_or("none"))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;

    let (lines, received) = mpsc::channel::<String>();
    if let Some(stdout) = child.stdout.take() {
        let lines = lines.clone();
        std::thread::spawn(move || forward(stdout, &lines));
    }
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || forward(stderr, &lines));
    }

    let deadline = started + Duration::from_secs(timeout_secs);
    let mut status = None;
    let mut all = Vec::new();
    let mut out = std::io::stdout().lock();
    while status.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                if let Some(pos) = line.find(MARKER) {
                    let code = line[pos + MARKER.len()..].trim();
                    status = Some(code.parse::<i32>().unwrap_or(-1));
                }
                all.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the VM printed no result within {timeout_secs} s (IPVSLB_VM_TIMEOUT); killed it"
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let exit = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!(
                    "qemu ended ({exit}) before the VM printed its result"
                ));
            }
        }
    }
    let to_marker = started.elapsed();
    let powered_off = started.elapsed() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < powered_off => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    Ok(Outcome {
        status: status.unwrap_or(-1),
        to_marker,
        lines: all,
    })
}

/// Sends each line read from `from` (lossily decoded, without `\r`) until it ends.
fn forward(from: impl std::io::Read, to: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = without_escapes(&String::from_utf8_lossy(&buf));
                let line = line.trim_end_matches(['\n', '\r']).to_owned();
                if to.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// `line` without the terminal control sequences the firmware prints (`ESC c`, `ESC [ ... X`).
fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters, then one final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_escapes;

    #[test]
    fn terminal_control_sequences_are_dropped_from_console_lines() {
        assert_eq!(
            without_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2Jvm: running /tests/kernel_ipvs"),
            "vm: running /tests/kernel_ipvs"
        );
        assert_eq!(without_escapes("plain"), "plain");
    }
}
