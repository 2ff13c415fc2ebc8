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

/// What goes into an initramfs besides busybox and the witnesses of [`PROGRAMS`].
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// The file name stem: `<cache>/initramfs-<name>.gz`.
    pub name: String,
    /// Test binaries, copied to `/tests/<name without its hash>` and stripped of debug info.
    pub tests: Vec<PathBuf>,
    /// More programs: (host path, path in the VM); their shared libraries come along.
    pub programs: Vec<(PathBuf, String)>,
    /// Files and folders copied as they are: (host path, path in the VM).
    pub files: Vec<(PathBuf, String)>,
    /// Symbolic links: (path in the VM, target).
    pub links: Vec<(String, String)>,
    /// Modules beyond [`MODULES`], by name.
    pub modules: Vec<String>,
    /// Folders under `kernel/` of the modules tree whose every module comes along
    /// (e.g. `net/netfilter`).
    pub module_dirs: Vec<String>,
    /// The shell lines `/init` runs after mounting and loading `ip_vs`; they set `status`.
    pub run: String,
}

impl Contents {
    /// The kernel tests' or the benchmark's initramfs: every binary under `/tests` run in turn
    /// with `args`.
    pub fn for_tests(mode: Mode, tests: Vec<PathBuf>, args: &[String]) -> Self {
        let mut quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        if mode == Mode::Test {
            // The tests share one kernel table: one at a time.
            quoted.push("--test-threads=1".to_owned());
        }
        let run = format!(
            r#"for t in /tests/*; do
    echo "vm: running $t"
    $t {args} || status=$?
done
"#,
            args = quoted.join(" ")
        );
        Self {
            name: match mode {
                Mode::Test => "test",
                Mode::Bench => "bench",
            }
            .to_owned(),
            tests,
            run,
            ..Self::default()
        }
    }
}

/// `s` quoted for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Builds `<cache>/initramfs-<name>.gz` and returns its path.
pub fn build(cache: &Path, kernel: &Kernel, contents: &Contents) -> Result<PathBuf, String> {
    let name = &contents.name;
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
    let programs = PROGRAMS
        .iter()
        .map(|(host, guest)| (PathBuf::from(host), (*guest).to_owned()))
        .chain(contents.programs.iter().cloned());
    for (host, guest) in programs {
        let target = root.join(guest.trim_start_matches('/'));
        copy(&host, &target)?;
        elves.push(host);
    }
    for binary in &contents.tests {
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
    for (host, guest) in &contents.files {
        copy_tree(host, &root.join(guest.trim_start_matches('/')))?;
    }
    for (link, target) in &contents.links {
        symlink(target, &root.join(link.trim_start_matches('/')))?;
    }

    modules(kernel, &root, contents)?;
    write_init(&root, &contents.run)?;

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
        let output = Command::new("ldd")
            .arg(elf)
            .output()
            .map_err(|e| format!("running ldd {}: {e}", elf.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            // A static binary (such as the Go programs) needs nothing more.
            if text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
            {
                continue;
            }
            return Err(format!(
                "ldd {} failed: {}",
                elf.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
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

/// Copies [`MODULES`], those `contents` asks for, and what they depend on into the initramfs and
/// runs `depmod`.
fn modules(kernel: &Kernel, root: &Path, contents: &Contents) -> Result<(), String> {
    let mut by_name = BTreeMap::new();
    index_modules(&kernel.modules, &mut by_name)?;

    let target = root.join("lib/modules").join(&kernel.version);
    mkdir(&target)?;
    let mut wanted: Vec<String> = MODULES
        .iter()
        .map(|m| (*m).to_owned())
        .chain(contents.modules.iter().cloned())
        .collect();
    for dir in &contents.module_dirs {
        let mut in_dir = BTreeMap::new();
        index_modules(&kernel.modules.join("kernel").join(dir), &mut in_dir)?;
        wanted.extend(in_dir.into_keys());
    }
    let mut done = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        let Some(path) = by_name.get(&name) else {
            if MODULES.contains(&name.as_str()) || contents.modules.contains(&name) {
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

/// Writes `/init`: mounts, loads `ip_vs`, runs `run`, prints the marker with `status`, powers
/// off.
fn write_init(root: &Path, run: &str) -> Result<(), String> {
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
{run}
echo "{MARKER}$status"
poweroff -f
"#
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

/// Copies a file, or a folder with everything in it.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    if !from.is_dir() {
        return copy(from, to);
    }
    mkdir(to)?;
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
    for entry in entries.filter_map(Result::ok) {
        copy_tree(&entry.path(), &to.join(entry.file_name()))?;
    }
    Ok(())
}

fn symlink(target: &str, link: &Path) -> Result<(), String> {
    if let Some(parent) = link.parent() {
        mkdir(parent)?;
    }
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| format!("linking {} to {target}: {e}", link.display()))
}
