//! The Debian cloud kernel, fetched once with apt and unpacked into the cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{output_of, run_checked};

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package.
    pub modules: PathBuf,
}

/// The current `linux-image-*-cloud-amd64` package, downloaded and unpacked under `cache` unless
/// it already is.
pub fn fetch(cache: &Path) -> Result<Kernel, String> {
    let package = match package_name()? {
        Some(name) => name,
        None => {
            run_checked(Command::new("apt-get").args(["update", "-q"]))?;
            package_name()?.ok_or(
                "apt-cache depends linux-image-cloud-amd64 names no linux-image-*-cloud-amd64 package",
            )?
        }
    };
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let root = cache.join("kernel").join(&version);
    let kernel = Kernel {
        vmlinuz: root.join("boot").join(format!("vmlinuz-{version}")),
        modules: root.join("lib").join("modules").join(&version),
        version,
    };
    if kernel.vmlinuz.exists() && kernel.modules.exists() {
        return Ok(kernel);
    }

    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| format!("creating {}: {e}", debs.display()))?;
    eprintln!("vm: downloading {package}");
    run_checked(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&debs),
    )?;
    let deb = std::fs::read_dir(&debs)
        .map_err(|e| format!("reading {}: {e}", debs.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .ok_or_else(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                debs.display()
            )
        })?;
    let partial = cache
        .join("kernel")
        .join(format!("{}.partial", kernel.version));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)
        .map_err(|e| format!("creating {}: {e}", partial.display()))?;
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root).map_err(|e| format!("renaming {}: {e}", partial.display()))?;
    if kernel.vmlinuz.exists() && kernel.modules.exists() {
        Ok(kernel)
    } else {
        Err(format!(
            "{} has no {}",
            deb.display(),
            kernel.vmlinuz.display()
        ))
    }
}

/// The package `linux-image-cloud-amd64` depends on, if apt knows it.
fn package_name() -> Result<Option<String>, String> {
    let text = output_of(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))
        .unwrap_or_default();
    Ok(text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-cloud-amd64"))
        .map(str::to_owned))
}
