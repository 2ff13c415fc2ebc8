//! `cargo xtask image-binary`: the binary the `Dockerfile` copies into its empty base, built
//! with the very command the recipe runs, proven static (no ELF interpreter) and run with an
//! empty environment from an empty folder, as in the image. No container engine is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `RUSTFLAGS` of the image's build: glibc linked in, so the binary needs no loader.
pub const RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// The target the image's binary is built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The build command of the Dockerfile, word for word (a test checks the recipe holds it).
pub const BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --locked -p ipvslb --target x86_64-unknown-linux-gnu";

/// Builds the image's binary, checks it and runs it.
pub fn run(_args: &[String]) -> Result<(), String> {
    let binary = build()?;
    let bytes = std::fs::read(&binary).map_err(|e| format!("reading {}: {e}", binary.display()))?;
    if has_interpreter(&bytes)? {
        return Err(format!(
            "{} asks for a dynamic loader (PT_INTERP): it would not start on the image's empty base",
            binary.display()
        ));
    }
    let scratch = std::env::temp_dir().join(format!("ipvslb-image-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/whoami");
    let out = Command::new(&binary)
        .args(["plan", "-f"])
        .arg(&examples)
        .env_clear()
        .current_dir(&scratch)
        .output()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("10.240.0.210") {
        return Err(format!(
            "the static binary's `plan -f examples/whoami` ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!(
        "{}: static, {} MiB, plans whoami at 10.240.0.210",
        binary.display(),
        bytes.len() / (1 << 20)
    );
    Ok(())
}

fn build() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    println!("  $ {BUILD_COMMAND}");
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "ipvslb",
            "--target",
            TARGET,
        ])
        .arg("--message-format=json")
        .env("RUSTFLAGS", RUSTFLAGS)
        .current_dir(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running {cargo} build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the image's binary failed ({})",
            out.status
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("\"name\":\"ipvslb\"") && line.contains("\"kind\":[\"bin\"]"))
        .find_map(|line| crate::json_string(line, "executable"))
        .map(PathBuf::from)
        .ok_or_else(|| "cargo build named no ipvslb executable".to_owned())
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> Result<bool, String> {
    let bad = |what: &str| Err(format!("not a 64-bit little-endian ELF file: {what}"));
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return bad("header");
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(header) = elf.get(at..at + 4) else {
            return bad("program headers");
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(header.try_into().expect("4 bytes")) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::has_interpreter;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(has_interpreter(&sh).unwrap());
        assert!(
            has_interpreter(b"not an elf file at all, long enough to hold a header ....").is_err()
        );
    }
}
