//! The initramfs: busybox, the modules IPVS needs, the witnesses (`ipvsadm`, `ip`, `nsenter`),
//! the binaries under test with their shared libraries, and `/init`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::kernel::Kernel;
use super::{Mode, output_of, run_checked};

/// Modules loaded or loadable in the VM; their dependencies come along.
const MODULES: [&str; 18] = [
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_lblc",
    "ip_vs_lblcr",
    "ip_vs_dh",
    "ip_vs_sh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_fo",
    "ip_vs_ovf",
    "ip_vs_mh",
    "ip_vs_twos",
    "dummy",
    "veth",
    "bridge",
];

/// Programs copied from the host with their libraries: (host path, path in the VM).
const PROGRAMS: [(&str, &str); 3] = [
    ("/usr/sbin/ipvsadm", "/sbin/ipvsadm"),
    ("/usr/sbin/ip", "/sbin/ip"),
    ("/usr/bin/nsenter", "/sbin/nsenter"),
];

/// The marker `/init` prints last; [`super::boot`] waits for it.
pub const MARKER: &str = "IPVSLB-VM-RESULT status=";

/// Builds `<cache>/initramfs-<mode>.gz` and returns its path.
pub fn build(
    cache: &Path,
    kernel: &Kernel,
    binaries: &[PathBuf],
    mode: Mode,
    args: &[String],
) -> Result<PathBuf, String> {
    let name = match mode {
        Mode::Test => "test",
        Mode::Bench => "bench",
    };
    let root = cache.join(format!("initramfs-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    for dir in [
        "bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "tests", "lib", "lib64",
        "usr/bin", "usr/sbin",
    ] {
        mkdir(&root.join(dir))?;
    }

    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    for link in ["bin/sh", "sbin/modprobe"] {
        symlink("/bin/busybox", &root.join(link))?;
    }

    let mut elves = Vec::new();
    for (host, guest) in PROGRAMS {
        let target = root.join(guest.trim_start_matches('/'));
        copy(Path::new(host), &target)?;
        elves.push(PathBuf::from(host));
    }
    for binary in binaries {
        let file_name = binary
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("odd binary name {}", binary.display()))?;
        // `kernel_ipvs-0123abcd` -> `kernel_ipvs`
        let short = file_name.split('-').next().unwrap_or(file_name);
        let target = root.join("tests").join(short);
        copy(binary, &target)?;
        run_checked(Command::new("strip").arg("--strip-debug").arg(&target))?;
        elves.push(binary.clone());
    }
    for library in libraries(&elves)? {
        copy(
            &library,
            &root.join(library.strip_prefix("/").unwrap_or(&library)),
        )?;
    }

    modules(kernel, &root)?;
    write_init(&root, mode, args)?;

    let initrd = cache.join(format!("initramfs-{name}.gz"));
    let script = format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
        root.display(),
        initrd.display()
    );
    run_checked(Command::new("sh").arg("-c").arg(script))?;
    Ok(initrd)
}

/// Every shared library (and the dynamic loader) that `elves` load, per `ldd`.
fn libraries(elves: &[PathBuf]) -> Result<BTreeSet<PathBuf>, String> {
    let mut libraries = BTreeSet::new();
    for elf in elves {
        let text = output_of(Command::new("ldd").arg(elf))?;
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    Ok(libraries)
}

/// Copies [`MODULES`] and what they depend on into the initramfs and runs `depmod`.
fn modules(kernel: &Kernel, root: &Path) -> Result<(), String> {
    let mut by_name = BTreeMap::new();
    index_modules(&kernel.modules, &mut by_name)?;

    let target = root.join("lib/modules").join(&kernel.version);
    mkdir(&target)?;
    let mut wanted: Vec<String> = MODULES.iter().map(|m| (*m).to_owned()).collect();
    let mut done = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        let Some(path) = by_name.get(&name) else {
            if MODULES.contains(&name.as_str()) {
                // A scheduler this kernel does not ship: the tests find out for themselves.
                eprintln!("vm: kernel {} has no module {name}", kernel.version);
                continue;
            }
            return Err(format!(
                "module {name} is needed but not in the kernel package"
            ));
        };
        let relative = path.strip_prefix(&kernel.modules).unwrap_or(path);
        copy(path, &target.join(relative))?;
        let depends = output_of(Command::new("modinfo").args(["-F", "depends"]).arg(path))?;
        wanted.extend(
            depends
                .trim()
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_")),
        );
    }
    for file in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let source = kernel.modules.join(file);
        if source.exists() {
            copy(&source, &target.join(file))?;
        }
    }
    run_checked(
        Command::new("depmod")
            .arg("-b")
            .arg(root)
            .arg(&kernel.version),
    )
}

/// Maps module names (with `_`) to their files under `dir`.
fn index_modules(dir: &Path, by_name: &mut BTreeMap<String, PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, by_name)?;
        } else if let Some(file) = path.file_name().and_then(|n| n.to_str())
            && let Some(pos) = file.find(".ko")
        {
            by_name.insert(file[..pos].replace('-', "_"), path.clone());
        }
    }
    Ok(())
}

/// Writes `/init`: mounts, loads `ip_vs`, runs every binary under `/tests`, prints the marker,
/// powers off.
fn write_init(root: &Path, mode: Mode, args: &[String]) -> Result<(), String> {
    let mut quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    if mode == Mode::Test {
        // The tests share one kernel table: one at a time.
        quoted.push("--test-threads=1".to_owned());
    }
    let script = format!(
        r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/netns
/sbin/ip link set lo up
modprobe ip_vs || echo "vm: modprobe ip_vs failed"
status=0
for t in /tests/*; do
    echo "vm: running $t"
    $t {args} || status=$?
done
echo "{MARKER}$status"
poweroff -f
"#,
        args = quoted.join(" ")
    );
    let init = root.join("init");
    std::fs::write(&init, script).map_err(|e| format!("writing {}: {e}", init.display()))?;
    set_executable(&init)
}

fn set_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Copies a file (following symbolic links), creating the parent directory.
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(parent) = to.parent() {
        mkdir(parent)?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn symlink(target: &str, link: &Path) -> Result<(), String> {
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| format!("linking {} to {target}: {e}", link.display()))
}
