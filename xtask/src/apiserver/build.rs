//! Builds `kube-apiserver`, `kubectl` and `etcd` from their Go modules into a per-version cache,
//! and `helm` (from `helm.sh/helm/v4`) beside them for the chart's tests.
//!
//! Kubernetes: a throwaway module requires `k8s.io/kubernetes` and pins every staging repository
//! its `go.mod` lists (`k8s.io/api`, `k8s.io/client-go`, ...) with a `replace` line to the matching
//! `v0.x.y` release. etcd: a throwaway module requires `go.etcd.io/etcd/server/v3` (whose `main`
//! package is the `etcd` binary) and pins the etcd modules it replaces with relative paths.
//! Builds run under `nice -n 19` with `go build -p $IPVSLB_GO_PARALLEL` (default 1).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The Kubernetes release built when nothing else is asked for.
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// The etcd release built when nothing else is asked for.
pub const ETCD_VERSION: &str = "v3.6.16";

/// The helm release built when nothing else is asked for (`IPVSLB_HELM_VERSION` overrides it).
pub const HELM_VERSION: &str = "v4.3.1";

/// The Prometheus module whose PromQL parser `promql-check` uses (`IPVSLB_PROMETHEUS_VERSION`
/// overrides it).
pub const PROMETHEUS_VERSION: &str = "v0.316.0";

/// The Prometheus Operator API module whose types `promql-check objects` decodes into.
pub const PROMETHEUS_OPERATOR_VERSION: &str = "v0.95.2";

/// The Kubernetes commands built from `k8s.io/kubernetes`.
const APISERVER_PACKAGE: &str = "k8s.io/kubernetes/cmd/kube-apiserver";
const KUBECTL_PACKAGE: &str = "k8s.io/kubernetes/cmd/kubectl";
const KUBE_PROXY_PACKAGE: &str = "k8s.io/kubernetes/cmd/kube-proxy";

/// The source of `promql-check`.
const PROMQL_CHECK_MAIN: &str = include_str!("promql/main.go");

/// The etcd modules that `go.etcd.io/etcd/server/v3` replaces with paths inside etcd's repository.
const ETCD_SIBLINGS: [&str; 4] = [
    "go.etcd.io/etcd/api/v3",
    "go.etcd.io/etcd/client/pkg/v3",
    "go.etcd.io/etcd/client/v3",
    "go.etcd.io/etcd/pkg/v3",
];

/// Which releases to build or use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    /// A `k8s.io/kubernetes` module version, such as `v1.37.2`.
    pub kubernetes: String,
    /// A `go.etcd.io/etcd/server/v3` module version, such as `v3.6.16`.
    pub etcd: String,
}

impl Versions {
    /// The built-in versions, overridden by `IPVSLB_KUBERNETES_VERSION` and `IPVSLB_ETCD_VERSION`.
    pub fn from_env() -> Self {
        let pick = |var: &str, default: &str| {
            env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            kubernetes: pick("IPVSLB_KUBERNETES_VERSION", KUBERNETES_VERSION),
            etcd: pick("IPVSLB_ETCD_VERSION", ETCD_VERSION),
        }
    }
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            kubernetes: KUBERNETES_VERSION.to_owned(),
            etcd: ETCD_VERSION.to_owned(),
        }
    }
}

/// Where the three binaries of one Kubernetes version live.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `bin` folder holding them.
    pub dir: PathBuf,
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `kubectl`.
    pub kubectl: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `kube-proxy`, which the end-to-end run starts on each node (built by [`ensure_kube_proxy`]).
    pub kube_proxy: PathBuf,
}

impl Binaries {
    /// The cache locations for `versions` (the files may not exist yet).
    pub fn in_cache(versions: &Versions) -> Self {
        let dir = crate::cache_root()
            .join("k8s")
            .join(&versions.kubernetes)
            .join("bin");
        Self {
            kube_apiserver: dir.join("kube-apiserver"),
            kubectl: dir.join("kubectl"),
            etcd: dir.join("etcd"),
            kube_proxy: dir.join("kube-proxy"),
            dir,
        }
    }

    /// The file recording which etcd release `etcd` was built from.
    fn etcd_stamp(&self) -> PathBuf {
        self.dir.join("etcd.version")
    }

    /// Whether `etcd` exists and was built from `version`.
    fn etcd_is(&self, version: &str) -> bool {
        self.etcd.is_file()
            && fs::read_to_string(self.etcd_stamp()).is_ok_and(|v| v.trim() == version)
    }
}

/// The cached binaries for `versions`, or an error saying how to build them.
pub fn cached(versions: &Versions) -> Result<Binaries, String> {
    let bins = Binaries::in_cache(versions);
    let missing: Vec<String> = [&bins.kube_apiserver, &bins.kubectl, &bins.etcd]
        .into_iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        Ok(bins)
    } else {
        Err(format!(
            "missing {}; run `cargo xtask apiserver build` first",
            missing.join(", ")
        ))
    }
}

/// Builds whatever of `versions` is not cached yet and returns the binaries.
pub fn ensure(versions: &Versions) -> Result<Binaries, String> {
    let bins = Binaries::in_cache(versions);
    let kubernetes_cached = bins.kube_apiserver.is_file() && bins.kubectl.is_file();
    let etcd_cached = bins.etcd_is(&versions.etcd);
    if kubernetes_cached && etcd_cached {
        println!(
            "kube-apiserver, kubectl {} and etcd {} cached in {}",
            versions.kubernetes,
            versions.etcd,
            bins.dir.display()
        );
        return Ok(bins);
    }
    fs::create_dir_all(&bins.dir).map_err(|e| format!("creating {}: {e}", bins.dir.display()))?;
    // Go is needed only to build: a machine with everything cached runs without it.
    let go = Go::detect()?;
    if kubernetes_cached {
        println!(
            "kube-apiserver and kubectl {} cached in {}",
            versions.kubernetes,
            bins.dir.display()
        );
    } else {
        build_kubernetes(
            &go,
            &versions.kubernetes,
            &[
                (APISERVER_PACKAGE, &bins.kube_apiserver),
                (KUBECTL_PACKAGE, &bins.kubectl),
            ],
        )?;
    }
    if etcd_cached {
        println!("etcd {} cached in {}", versions.etcd, bins.dir.display());
    } else {
        build_etcd(&go, &versions.etcd, &bins)?;
    }
    Ok(bins)
}

/// Builds `kube-proxy` of `versions.kubernetes` (from the same module set as the API server)
/// unless it is cached, and returns the binaries with it.
pub fn ensure_kube_proxy(versions: &Versions) -> Result<Binaries, String> {
    let bins = ensure(versions)?;
    if bins.kube_proxy.is_file() {
        println!(
            "kube-proxy {} cached in {}",
            versions.kubernetes,
            bins.dir.display()
        );
        return Ok(bins);
    }
    let go = Go::detect()?;
    build_kubernetes(
        &go,
        &versions.kubernetes,
        &[(KUBE_PROXY_PACKAGE, &bins.kube_proxy)],
    )?;
    Ok(bins)
}

/// Where `helm` of `version` lives in the cache (the file may not exist yet).
pub fn helm_in_cache(version: &str) -> PathBuf {
    crate::cache_root()
        .join("helm")
        .join(version)
        .join("bin")
        .join("helm")
}

/// The helm release to build or use: `IPVSLB_HELM_VERSION`, else [`HELM_VERSION`].
pub fn helm_version() -> String {
    env::var("IPVSLB_HELM_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| HELM_VERSION.to_owned())
}

/// The cached `helm`, or an error saying how to build it.
pub fn cached_helm(version: &str) -> Result<PathBuf, String> {
    let helm = helm_in_cache(version);
    if helm.is_file() {
        Ok(helm)
    } else {
        Err(format!(
            "missing {}; run `cargo xtask apiserver build` (or `cargo xtask test`) first",
            helm.display()
        ))
    }
}

/// Builds `helm` of `version` unless it is cached, and returns its path.
pub fn ensure_helm(version: &str) -> Result<PathBuf, String> {
    let helm = helm_in_cache(version);
    if helm.is_file() {
        println!("helm {version} cached in {}", helm.display());
        return Ok(helm);
    }
    let dir = helm.parent().expect("a bin folder");
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let go = Go::detect()?;
    build_helm(&go, version, &helm)?;
    Ok(helm)
}

/// The Prometheus module version to build `promql-check` with.
pub fn prometheus_version() -> String {
    env::var("IPVSLB_PROMETHEUS_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| PROMETHEUS_VERSION.to_owned())
}

/// Where `promql-check` built against Prometheus `version` lives in the cache (one folder per
/// version and source, so an edited `main.go` is rebuilt).
pub fn promql_check_in_cache(version: &str) -> PathBuf {
    // FNV-1a: a stable fingerprint of the source and the operator module's version.
    let fingerprint = PROMQL_CHECK_MAIN
        .bytes()
        .chain(PROMETHEUS_OPERATOR_VERSION.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    crate::cache_root()
        .join("promql-check")
        .join(format!("{version}-{fingerprint:016x}"))
        .join("bin")
        .join("promql-check")
}

/// The cached `promql-check`, or an error saying how to build it.
pub fn cached_promql_check(version: &str) -> Result<PathBuf, String> {
    let program = promql_check_in_cache(version);
    if program.is_file() {
        Ok(program)
    } else {
        Err(format!(
            "missing {}; run `cargo xtask apiserver build` (or `cargo xtask test`) first",
            program.display()
        ))
    }
}

/// Builds `promql-check` (a small program over Prometheus' PromQL parser and rules loader and
/// the Prometheus Operator's API types) unless cached.
pub fn ensure_promql_check(version: &str) -> Result<PathBuf, String> {
    let program = promql_check_in_cache(version);
    if program.is_file() {
        println!("promql-check ({version}) cached in {}", program.display());
        return Ok(program);
    }
    let dir = program.parent().expect("a bin folder");
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let go = Go::detect()?;
    let scratch = Scratch::new(&format!("promql-check-{version}"))?;
    let work = &scratch.0;
    println!(
        "building promql-check with Prometheus {version} in {}",
        work.display()
    );
    let started = Instant::now();
    let module = format!("github.com/prometheus/prometheus@{version}");
    let upstream = upstream_gomod(&go, work, &module)?;
    if upstream
        .lines()
        .any(|l| l.trim_start().starts_with("replace"))
    {
        return Err(format!(
            "the go.mod of {module} has replace lines, which this build does not pin yet"
        ));
    }
    write(
        &work.join("go.mod"),
        &format!(
            "module ipvslb.local/promql-check\n\ngo {}\n\nrequire github.com/prometheus/prometheus {version}\n",
            go_directive(&upstream).unwrap_or("1.24")
        ),
    )?;
    write(&work.join("main.go"), PROMQL_CHECK_MAIN)?;
    go.run(
        work,
        &[
            "get",
            &format!("github.com/prometheus/prometheus/promql/parser@{version}"),
            &format!(
                "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring@{PROMETHEUS_OPERATOR_VERSION}"
            ),
        ],
    )?;
    go.run(work, &["mod", "tidy"])?;
    go.build(work, "-s -w", ".", &program)?;
    println!(
        "promql-check built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(program)
}

/// Where the fixtures' Go builds keep their build and module caches: their own, so that
/// cleaning them never touches another Go project's.
fn go_caches() -> [(&'static str, PathBuf); 2] {
    let root = crate::cache_root().join("go");
    [
        ("GOCACHE", root.join("build")),
        ("GOMODCACHE", root.join("mod")),
    ]
}

/// Removes the fixtures' Go build and module caches once every fixture is built and cached: a
/// fresh build of them leaves about 6 GB there (4 GB of compiled packages, 2 GB of modules)
/// that nothing reads until the next version bump, and a CI machine that keeps its home
/// between runs would keep them forever. Nothing to do (and no `go` needed) when they are gone.
pub fn clean_go_caches() -> Result<(), String> {
    if go_caches().iter().all(|(_, dir)| !dir.exists()) {
        return Ok(());
    }
    let go = Go::detect()?;
    go.run(Path::new("."), &["clean", "-cache", "-modcache"])?;
    for (_, dir) in go_caches() {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// The Go toolchain and the settings every build uses.
struct Go {
    /// The `go` command.
    program: PathBuf,
    /// `go build -p` value.
    parallel: String,
}

impl Go {
    fn detect() -> Result<Self, String> {
        let program = env::var_os("GO").map_or_else(|| PathBuf::from("go"), PathBuf::from);
        let out = Command::new(&program)
            .arg("version")
            .output()
            .map_err(|e| format!("running `{} version`: {e}", program.display()))?;
        println!("using {}", String::from_utf8_lossy(&out.stdout).trim());
        let parallel = env::var("IPVSLB_GO_PARALLEL")
            .ok()
            .filter(|v| v.parse::<u32>().is_ok_and(|n| n > 0))
            .unwrap_or_else(|| "1".to_owned());
        Ok(Self { program, parallel })
    }

    /// Runs `nice -n 19 go <args>` in `dir`; returns stdout, or an error with stderr verbatim.
    fn run(&self, dir: &Path, args: &[&str]) -> Result<String, String> {
        let shown = format!("go {}", args.join(" "));
        println!("  $ {shown}");
        let out = Command::new("nice")
            .args(["-n", "19"])
            .arg(&self.program)
            .args(args)
            .current_dir(dir)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-buildvcs=false")
            .envs(go_caches())
            .output()
            .map_err(|e| format!("running {shown}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{shown}` in {} failed ({}):\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            ))
        }
    }

    /// Builds `package` into `output` (via a temporary name, so a partial file is never cached).
    fn build(&self, dir: &Path, ldflags: &str, package: &str, output: &Path) -> Result<(), String> {
        let tmp = output.with_extension("partial");
        let tmp_str = tmp.to_string_lossy();
        let ldflags = format!("-ldflags={ldflags}");
        self.run(
            dir,
            &[
                "build",
                "-p",
                &self.parallel,
                "-trimpath",
                &ldflags,
                "-o",
                &tmp_str,
                package,
            ],
        )?;
        fs::rename(&tmp, output)
            .map_err(|e| format!("moving {} to {}: {e}", tmp.display(), output.display()))
    }
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self, String> {
        let dir = env::temp_dir().join(format!("ipvslb-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds each `(package, output)` of `k8s.io/kubernetes` at `version`.
fn build_kubernetes(go: &Go, version: &str, targets: &[(&str, &Path)]) -> Result<(), String> {
    let (minor, staging_version) = staging_version(version)?;
    let scratch = Scratch::new(&format!("k8s-{version}"))?;
    let dir = &scratch.0;
    let names: Vec<&str> = targets
        .iter()
        .map(|(package, _)| package.rsplit('/').next().unwrap_or(package))
        .collect();
    let names = names.join(", ");
    println!("building {names} {version} in {}", dir.display());
    let started = Instant::now();
    let upstream = upstream_gomod(go, dir, &format!("k8s.io/kubernetes@{version}"))?;
    let staging = staging_modules(&upstream);
    if staging.is_empty() {
        return Err(format!(
            "no staging replace lines in the go.mod of k8s.io/kubernetes@{version}"
        ));
    }
    let mut gomod = format!(
        "module ipvslb.local/k8s-build\n\ngo {}\n\nrequire k8s.io/kubernetes {version}\n\nreplace (\n",
        go_directive(&upstream).unwrap_or("1.24")
    );
    for module in &staging {
        gomod.push_str(&format!("\t{module} => {module} {staging_version}\n"));
    }
    gomod.push_str(")\n");
    write(&dir.join("go.mod"), &gomod)?;
    let mut get = vec!["get".to_owned()];
    get.extend(
        targets
            .iter()
            .map(|(package, _)| format!("{package}@{version}")),
    );
    let get: Vec<&str> = get.iter().map(String::as_str).collect();
    go.run(dir, &get)?;
    println!(
        "  modules resolved in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    let mut ldflags = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (var, value) in [
            ("gitVersion", version),
            ("gitMajor", "1"),
            ("gitMinor", minor.as_str()),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ] {
            ldflags.push_str(&format!(" -X {pkg}.{var}={value}"));
        }
    }
    for (pkg, out) in targets {
        let t = Instant::now();
        go.build(dir, &ldflags, pkg, out)?;
        println!(
            "  built {} in {:.0}s",
            out.display(),
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "{names} {version} built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_etcd(go: &Go, version: &str, bins: &Binaries) -> Result<(), String> {
    let scratch = Scratch::new(&format!("etcd-{version}"))?;
    let dir = &scratch.0;
    println!("building etcd {version} in {}", dir.display());
    let started = Instant::now();
    let module = format!("go.etcd.io/etcd/server/v3@{version}");
    let upstream = upstream_gomod(go, dir, &module)?;
    let mut gomod = format!(
        "module ipvslb.local/etcd-build\n\ngo {}\n\nrequire go.etcd.io/etcd/server/v3 {version}\n\nreplace (\n",
        go_directive(&upstream).unwrap_or("1.24")
    );
    for module in ETCD_SIBLINGS {
        gomod.push_str(&format!("\t{module} => {module} {version}\n"));
    }
    gomod.push_str(")\n");
    write(&dir.join("go.mod"), &gomod)?;
    go.run(dir, &["get", &module])?;
    go.build(dir, "-s -w", "go.etcd.io/etcd/server/v3", &bins.etcd)?;
    write(&bins.etcd_stamp(), &format!("{version}\n"))?;
    println!(
        "etcd {version} built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_helm(go: &Go, version: &str, helm: &Path) -> Result<(), String> {
    let scratch = Scratch::new(&format!("helm-{version}"))?;
    let dir = &scratch.0;
    println!("building helm {version} in {}", dir.display());
    let started = Instant::now();
    let module = format!("helm.sh/helm/v4@{version}");
    let upstream = upstream_gomod(go, dir, &module)?;
    // Helm's go.mod replaces nothing today; a replace line would need pinning here as for etcd.
    if upstream
        .lines()
        .any(|l| l.trim_start().starts_with("replace"))
    {
        return Err(format!(
            "the go.mod of {module} has replace lines, which this build does not pin yet"
        ));
    }
    let gomod = format!(
        "module ipvslb.local/helm-build\n\ngo {}\n\nrequire helm.sh/helm/v4 {version}\n",
        go_directive(&upstream).unwrap_or("1.24")
    );
    write(&dir.join("go.mod"), &gomod)?;
    let package = "helm.sh/helm/v4/cmd/helm";
    go.run(dir, &["get", &format!("{package}@{version}")])?;
    let ldflags = format!("-s -w -X helm.sh/helm/v4/internal/version.version={version}");
    go.build(dir, &ldflags, package, helm)?;
    println!(
        "helm {version} built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Downloads `module@version` into the module cache and returns the text of its `go.mod`.
fn upstream_gomod(go: &Go, dir: &Path, module: &str) -> Result<String, String> {
    let info = go.run(dir, &["mod", "download", "-json", module])?;
    let path = crate::json_string(&info, "GoMod")
        .ok_or_else(|| format!("no GoMod in `go mod download` output:\n{info}"))?;
    fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))
}

/// `v1.37.2` -> (`37`, `v0.37.2`): the minor version and the staging repositories' version.
fn staging_version(version: &str) -> Result<(String, String), String> {
    let rest = version
        .strip_prefix("v1.")
        .ok_or_else(|| format!("expected a Kubernetes version like v1.37.2, got {version:?}"))?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if minor.is_empty() {
        return Err(format!(
            "expected a Kubernetes version like v1.37.2, got {version:?}"
        ));
    }
    Ok((minor, format!("v0.{rest}")))
}

/// The modules that `go.mod` text replaces with `./staging/src/...` paths.
fn staging_modules(gomod: &str) -> Vec<String> {
    gomod
        .lines()
        .filter_map(|line| {
            let (module, target) = line
                .trim()
                .trim_start_matches("replace ")
                .split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

/// The `go` directive of `go.mod` text.
fn go_directive(gomod: &str) -> Option<&str> {
    gomod
        .lines()
        .find_map(|line| line.strip_prefix("go "))
        .map(str::trim)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_versions() {
        assert_eq!(
            staging_version("v1.37.2").unwrap(),
            ("37".to_owned(), "v0.37.2".to_owned())
        );
        assert_eq!(
            staging_version("v1.36.0-rc.1").unwrap(),
            ("36".to_owned(), "v0.36.0-rc.1".to_owned())
        );
        assert!(staging_version("1.37.2").is_err());
    }

    #[test]
    fn finds_staging_replaces() {
        let gomod = "module k8s.io/kubernetes\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\texample.com/x/y => example.com/x/z v1.0.0\n)\nreplace k8s.io/kms => ./staging/src/k8s.io/kms\n";
        assert_eq!(
            staging_modules(gomod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kms"]
        );
        assert_eq!(go_directive(gomod), Some("1.26.0"));
    }
}
