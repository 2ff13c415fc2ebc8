//! The routing daemons' configurations in `deploy/`: BIRD 2 on a director and on the upstream
//! router, FRR on a director. Each goes through the daemon's own parser (`bird -p`, `vtysh
//! --dryrun`), and a broken copy of each is refused, so the check is known to check. The
//! parsers judge syntax and values only: what the routes do is for a run of the daemons.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIRD: &str = "/usr/sbin/bird";
const VTYSH: &str = "/usr/bin/vtysh";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The program at `path`, or a panic naming the Debian package that has it: a missing daemon
/// fails the test, never skips it.
fn tool(path: &'static str, package: &str) -> &'static str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package `{package}` \
         (apt-get install --no-install-recommends {package}; `cargo xtask test` installs it when missing)"
    );
    path
}

/// `text` written to a file of its own, for the daemons to read.
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("routing-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn bird_parse(file: &Path) -> Output {
    Command::new(tool(BIRD, "bird2"))
        .arg("-p")
        .arg("-c")
        .arg(file)
        .output()
        .unwrap()
}

fn vtysh_dryrun(file: &Path) -> Output {
    Command::new(tool(VTYSH, "frr"))
        .arg("--dryrun")
        .arg("-f")
        .arg(file)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `text` with each named `define NAME = VALUE;` given a new value (a trailing comment stays):
/// the way a test or a site adapts a BIRD configuration. A name without its line panics.
fn with_defines(text: &str, values: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (name, value) in values {
        let line = lines
            .iter_mut()
            .find(|l| define_name(l) == Some(*name))
            .unwrap_or_else(|| panic!("no `define {name}` line"));
        let end = line.find(';').expect("a define line ends with `;`");
        *line = format!("define {name} = {value}{}", &line[end..]);
    }
    lines.join("\n") + "\n"
}

fn define_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("define ")?;
    Some(rest[..rest.find('=')?].trim())
}

/// The `define` lines of a BIRD configuration, as (name, value).
fn defines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let name = define_name(l)?;
            let value = &l[l.find('=')? + 1..l.find(';')?];
            Some((name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The lines a daemon reads, without comments (`#` for BIRD, `!` for FRR).
fn statements(text: &str, comment: char) -> Vec<&str> {
    text.lines()
        .map(|l| l.split(comment).next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect()
}

const BIRD_CONFIGS: [&str; 2] = ["deploy/bird/director.conf", "deploy/bird/router.conf"];

#[test]
fn the_bird_director_and_router_configurations_pass_birds_own_check() {
    for file in BIRD_CONFIGS {
        let out = bird_parse(&repo(file));
        assert!(
            out.status.success() && stderr(&out).trim().is_empty(),
            "bird -p -c {file} ({}):\n{}",
            out.status,
            stderr(&out)
        );
    }
}

#[test]
fn a_misspelt_option_or_a_bad_value_is_refused_by_birds_check() {
    let router = read("deploy/bird/router.conf");
    assert!(
        router.contains("merge paths on;"),
        "router.conf no longer merges paths"
    );
    let misspelt = scratch(
        "misspelt.conf",
        &router.replace("merge paths on;", "merge pathz on;"),
    );
    let out = bird_parse(&misspelt);
    assert!(
        !out.status.success() && stderr(&out).contains("misspelt.conf:"),
        "bird -p accepted a misspelt option ({}): {}",
        out.status,
        stderr(&out)
    );
    let bad_range = scratch(
        "bad-range.conf",
        &with_defines(&router, &[("VIP4_RANGE", "10.240.0.192/33")]),
    );
    let out = bird_parse(&bad_range);
    assert!(
        !out.status.success() && stderr(&out).contains("Invalid prefix length"),
        "bird -p accepted a /33 ({}): {}",
        out.status,
        stderr(&out)
    );
}

#[test]
fn the_bird_configurations_hold_every_site_value_in_their_define_lines() {
    let expected: [(&str, &[(&str, &str)]); 2] = [
        (
            "deploy/bird/director.conf",
            &[
                ("DIRECTOR_ADDR", "10.240.0.21"),
                ("DIRECTOR_AS", "64513"),
                ("ROUTER_ADDR", "10.240.0.1"),
                ("ROUTER_AS", "64512"),
                ("VIP4_RANGE", "10.240.0.192/26"),
                ("VIP6_RANGE", "2001:db8:240::/64"),
            ],
        ),
        (
            "deploy/bird/router.conf",
            &[
                ("ROUTER_ADDR", "10.240.0.1"),
                ("ROUTER_AS", "64512"),
                ("DIRECTOR_AS", "64513"),
                ("DIR1_ADDR", "10.240.0.21"),
                ("DIR2_ADDR", "10.240.0.22"),
                ("VIP4_RANGE", "10.240.0.192/26"),
                ("VIP6_RANGE", "2001:db8:240::/64"),
                ("MAX_VIPS", "4096"),
            ],
        ),
    ];
    for (file, values) in expected {
        let text = read(file);
        let found = defines(&text);
        let want: Vec<(String, String)> = values
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(found, want, "the define lines of {file}");
        // No site value is written out anywhere else, so rewriting the define lines is enough.
        for line in statements(&text, '#') {
            if line.starts_with("define ") {
                continue;
            }
            for (_, value) in values {
                assert!(
                    !line.contains(value),
                    "{file}: `{line}` repeats {value} instead of its define"
                );
            }
        }
        // Another site's values, through the define lines only, still make a valid file.
        let other = with_defines(
            &text,
            &values
                .iter()
                .map(|(name, _)| {
                    let v = match *name {
                        "DIRECTOR_ADDR" | "DIR1_ADDR" => "192.0.2.11",
                        "DIR2_ADDR" => "192.0.2.12",
                        "ROUTER_ADDR" => "192.0.2.1",
                        "ROUTER_AS" => "65000",
                        "DIRECTOR_AS" => "4200000001",
                        "VIP4_RANGE" => "198.51.100.0/24",
                        "VIP6_RANGE" => "2001:db8:51::/48",
                        _ => "64",
                    };
                    (*name, v)
                })
                .collect::<Vec<_>>(),
        );
        let out = bird_parse(&scratch("other-site.conf", &other));
        assert!(
            out.status.success(),
            "{file} with another site's values: {}",
            stderr(&out)
        );
    }
}

#[test]
fn the_director_announces_only_its_announce_interface_and_the_router_merges_paths() {
    let director = read("deploy/bird/director.conf");
    let director = statements(&director, '#');
    for line in [
        "interface \"ipvslb-announce\";",
        "import none;",
        "export where proto = \"announce\" && net.len = 32 && net ~ VIP4_RANGE;",
        "export where proto = \"announce\" && net.len = 128 && net ~ VIP6_RANGE;",
        "bfd { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };",
    ] {
        assert!(director.contains(&line), "director.conf lacks `{line}`");
    }
    assert!(
        !director.iter().any(|l| l.starts_with("protocol kernel")),
        "the director installs no route it hears"
    );
    let router = read("deploy/bird/router.conf");
    let router = statements(&router, '#');
    assert_eq!(
        router.iter().filter(|l| **l == "merge paths on;").count(),
        2,
        "both kernel protocols of router.conf merge paths"
    );
    for line in [
        "import where net.len = 32 && net ~ VIP4_RANGE;",
        "import where net.len = 128 && net ~ VIP6_RANGE;",
        "export none;",
    ] {
        assert!(router.contains(&line), "router.conf lacks `{line}`");
    }
}

#[test]
fn the_frr_director_configuration_passes_vtysh_dryrun() {
    let out = vtysh_dryrun(&repo("deploy/frr/frr.conf"));
    assert!(
        out.status.success(),
        "vtysh --dryrun -f deploy/frr/frr.conf ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

#[test]
fn a_misspelt_command_or_a_value_out_of_range_is_refused_by_vtysh_dryrun() {
    let frr = read("deploy/frr/frr.conf");
    for (name, from, to) in [
        (
            "misspelt-frr.conf",
            " match interface ipvslb-announce",
            " match interfaze ipvslb-announce",
        ),
        (
            "out-of-range-frr.conf",
            "detect-multiplier 3",
            "detect-multiplier 1",
        ),
    ] {
        assert!(frr.contains(from), "frr.conf lacks `{from}`");
        let out = vtysh_dryrun(&scratch(name, &frr.replace(from, to)));
        assert!(
            !out.status.success() && stderr(&out).contains(to.trim()),
            "vtysh --dryrun accepted `{to}` ({}): {}",
            out.status,
            stderr(&out)
        );
    }
}

#[test]
fn the_frr_director_redistributes_only_the_announce_interface_with_bfd_on_the_router() {
    let frr = read("deploy/frr/frr.conf");
    let frr = statements(&frr, '!');
    let count = |line: &str| frr.iter().filter(|l| **l == line).count();
    assert_eq!(
        count("redistribute connected route-map ANNOUNCE"),
        2,
        "both families"
    );
    assert_eq!(
        count("match interface ipvslb-announce"),
        2,
        "both ANNOUNCE entries"
    );
    assert_eq!(count("set origin igp"), 2, "both ANNOUNCE entries");
    assert_eq!(count("neighbor 10.240.0.1 bfd"), 1);
    assert_eq!(count("neighbor 10.240.0.1 route-map FROM-ROUTER in"), 2);
    assert!(
        !frr.iter()
            .any(|l| l.starts_with("redistribute") && !l.ends_with("route-map ANNOUNCE")),
        "every redistribution goes through ANNOUNCE"
    );
}

#[test]
fn the_frr_daemons_file_starts_bgpd_and_bfdd() {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"set -e; . "$1"; echo "$bgpd $bfdd""#)
        .arg("daemons")
        .arg(repo("deploy/frr/daemons"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sourcing deploy/frr/daemons: {}",
        stderr(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes yes");
}
