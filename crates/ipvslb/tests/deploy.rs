//! What ships beside the chart for directors outside the cluster: the systemd unit, checked by
//! the real `systemd-analyze` (verify, and its exposure score), and run with the flags and
//! variables the binary really has.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// `systemd-analyze`, or a panic naming the package that has it.
fn systemd_analyze() -> &'static str {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "systemd-analyze is missing: install the Debian package `systemd` \
         (apt-get install systemd; `cargo xtask test` installs it when missing)"
    );
    "systemd-analyze"
}

/// The unit with its binary path pointed at the binary cargo built (verify checks that the
/// program exists and is executable), in a fresh folder.
fn unit_here() -> (PathBuf, String) {
    let text = std::fs::read_to_string(repo("deploy/systemd/ipvslb-director.service")).unwrap();
    assert!(
        text.contains("ExecStart=/usr/local/bin/ipvslb run"),
        "the unit's ExecStart moved"
    );
    let here = text.replace("/usr/local/bin/ipvslb", env!("CARGO_BIN_EXE_ipvslb"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-unit");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ipvslb-director.service");
    std::fs::write(&path, &here).unwrap();
    (path, text)
}

#[test]
fn the_director_unit_passes_systemd_analyze_verify_without_a_warning() {
    let tool = systemd_analyze();
    let (unit, _) = unit_here();
    let out = Command::new(tool)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
    // The check itself catches a misspelt key.
    let bad = unit.with_file_name("ipvslb-bad.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&bad, text.replace("NoNewPrivileges=", "NoNewPrivilegez=")).unwrap();
    let out = Command::new(tool).arg("verify").arg(&bad).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key"),
        "verify did not notice a misspelt key"
    );
}

#[test]
fn the_director_unit_is_hardened_to_an_exposure_of_at_most_two() {
    let tool = systemd_analyze();
    let (unit, text) = unit_here();
    for line in [
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // Exposure levels are scored 0-10; --threshold takes them times ten.
    let out = Command::new(tool)
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze security scores the unit above 2.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_director_unit_sets_only_variables_and_flags_ipvslb_run_has() {
    let (_, text) = unit_here();
    let help = Command::new(env!("CARGO_BIN_EXE_ipvslb"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut checked = 0;
    for line in text.lines() {
        if let Some(vars) = line.strip_prefix("Environment=") {
            for var in vars.split_whitespace() {
                let name = var.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("env: {name}")),
                    "`ipvslb run` reads no {name}"
                );
                checked += 1;
            }
        }
        if let Some(exec) = line.strip_prefix("ExecStart=") {
            for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
                assert!(help.contains(flag), "`ipvslb run` has no {flag}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "only {checked} settings found in the unit");
}

#[test]
fn the_l2_drop_in_gives_the_director_a_packet_socket_and_stays_at_an_exposure_of_at_most_two_and_a_half()
 {
    let tool = systemd_analyze();
    let (unit, text) = unit_here();
    let drop_in =
        std::fs::read_to_string(repo("deploy/systemd/ipvslb-director.service.d/l2.conf")).unwrap();
    for line in [
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
    ] {
        assert!(
            drop_in.lines().any(|l| l == line),
            "the drop-in lacks {line}"
        );
    }
    assert!(
        drop_in.contains("AF_PACKET")
            && drop_in.contains("arp_ignore=1")
            && drop_in.contains("arp_announce=2"),
        "{drop_in}"
    );
    // The unit with the drop-in applied: its directives come after the unit's, as systemd
    // reads them.
    let merged = unit.with_file_name("ipvslb-director-l2.service");
    let here = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&merged, format!("{here}\n{drop_in}")).unwrap();
    let verify = Command::new(tool)
        .arg("verify")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&verify.stderr).contains("Unknown"),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let out = Command::new(tool)
        .args(["security", "--offline=yes", "--threshold=25"])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze security scores the unit with the L2 drop-in above 2.5:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Restart=on-failure"));
}
