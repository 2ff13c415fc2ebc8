//! Starting and stopping etcd and kube-apiserver on 127.0.0.1.
//!
//! Everything lives in one directory:
//!
//! | path                  | what                                                        |
//! |-----------------------|-------------------------------------------------------------|
//! | `kubeconfig`          | admin kubeconfig (static token, user `admin` in `system:masters`) |
//! | `bin/kubectl`         | link to the cached `kubectl`                                |
//! | `pki/`                | CA, serving certificate, service-account keys               |
//! | `tokens.csv`          | the static token file                                       |
//! | `etcd-data/`          | etcd's data                                                 |
//! | `apiserver-certs/`    | kube-apiserver's `--cert-dir` (unused, kept out of `/var/run`) |
//! | `*.pid`, `*.log`      | process ids and output of `etcd` and `kube-apiserver`       |

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::build::Binaries;
use super::certs::Pki;

/// The Service ClusterIP range the API server is started with.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

/// The service-account token issuer (and audience) the API server is started with.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The name of the admin user the kubeconfig authenticates as (member of `system:masters`).
pub const ADMIN_USER: &str = "admin";

/// The process names, in stop order.
const PROCESSES: [&str; 2] = ["kube-apiserver", "etcd"];

/// Environment variables removed from every child process, so loopback traffic stays direct.
const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// How to start a test API server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding all state; created if missing.
    pub dir: PathBuf,
    /// The binaries to run.
    pub binaries: Binaries,
    /// Put both processes in their own process group so they outlive the caller and ignore its
    /// Ctrl-C (for `cargo xtask apiserver start`). When false they share the caller's process
    /// group, so a Ctrl-C in a terminal reaches them too.
    pub detach: bool,
    /// How long to wait for etcd and then for `/readyz`.
    pub ready_timeout: Duration,
    /// Extra `kube-apiserver` flags, appended after the defaults.
    pub extra_apiserver_args: Vec<String>,
}

impl Options {
    /// Options with defaults: not detached, 60 s timeout, no extra flags.
    pub fn new(dir: &Path, binaries: Binaries) -> Self {
        Self {
            dir: dir.to_path_buf(),
            binaries,
            detach: false,
            ready_timeout: Duration::from_secs(60),
            extra_apiserver_args: Vec::new(),
        }
    }
}

/// A running etcd + kube-apiserver pair. Dropping it stops both and cleans the directory unless
/// [`Server::detach`] was called.
#[derive(Debug)]
pub struct Server {
    /// The state directory.
    pub dir: PathBuf,
    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub url: String,
    /// etcd's client URL, `http://127.0.0.1:<port>`.
    #[allow(dead_code, reason = "for test harnesses")]
    pub etcd_url: String,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The `kubectl` link in the state directory.
    pub kubectl: PathBuf,
    /// The admin bearer token.
    #[allow(dead_code, reason = "for test harnesses")]
    pub token: String,
    /// The CA certificate that signed the serving certificate.
    #[allow(dead_code, reason = "for test harnesses")]
    pub ca_cert: PathBuf,
    /// The started processes in start order (etcd first), while owned.
    children: Vec<(&'static str, Child)>,
}

impl Server {
    /// A `kubectl --kubeconfig <kubeconfig>` command to add arguments to.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Leaves both processes running; [`stop`] with the directory stops them later.
    pub fn detach(mut self) {
        self.children.clear();
    }

    /// Stops both processes and removes the state directory's contents.
    #[allow(dead_code, reason = "for test harnesses")]
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown(false)
    }

    /// Stops both processes and removes the state directory's contents but the logs.
    pub fn stop_keeping_logs(mut self) -> Result<(), String> {
        self.shutdown(true)
    }

    fn shutdown(&mut self, keep_logs: bool) -> Result<(), String> {
        // Newest first: kube-apiserver, then the etcd it depends on.
        for (name, mut child) in self.children.drain(..).rev() {
            terminate(name, child.id());
            // Reap it (terminate waited for it to stop, or killed it).
            let _ = child.kill();
            let _ = child.wait();
        }
        clean(&self.dir, keep_logs)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Keep the logs of a failing test.
        if !self.children.is_empty()
            && let Err(e) = self.shutdown(std::thread::panicking())
        {
            eprintln!("stopping the test API server: {e}");
        }
    }
}

/// Starts etcd and kube-apiserver as `options` say and waits until `/readyz` answers `ok`.
pub fn start(options: &Options) -> Result<Server, String> {
    let dir = absolute(&options.dir)?;
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for name in PROCESSES {
        if let Some(pid) = read_pid(&dir, name)
            && is_running(pid, name)
        {
            return Err(format!(
                "{name} (pid {pid}) is already running for {}; stop it first",
                dir.display()
            ));
        }
    }
    clean(&dir, false)?;
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;

    let pki = Pki::generate(&dir.join("pki"))?;
    let token = random_hex(16)?;
    let tokens = dir.join("tokens.csv");
    write(
        &tokens,
        &format!("{token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
    )?;
    let [etcd_port, peer_port, api_port] = free_ports()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let url = format!("https://127.0.0.1:{api_port}");

    let kubeconfig = dir.join("kubeconfig");
    write(&kubeconfig, &kubeconfig_text(&url, &pki.ca_cert, &token)?)?;
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).map_err(|e| format!("creating {}: {e}", bin.display()))?;
    let kubectl = bin.join("kubectl");
    let _ = fs::remove_file(&kubectl);
    std::os::unix::fs::symlink(&options.binaries.kubectl, &kubectl)
        .map_err(|e| format!("linking {}: {e}", kubectl.display()))?;

    let mut server = Server {
        dir: dir.clone(),
        url,
        etcd_url: etcd_url.clone(),
        kubeconfig,
        kubectl,
        token,
        ca_cert: pki.ca_cert.clone(),
        children: Vec::new(),
    };
    let launched = launch(
        &mut server,
        options,
        &pki,
        &tokens,
        [etcd_port, peer_port, api_port],
    );
    match launched {
        Ok(()) => Ok(server),
        Err(e) => {
            let _ = server.shutdown(true);
            Err(format!("{e}\n(logs kept in {})", dir.display()))
        }
    }
}

/// Starts etcd, waits for it, starts kube-apiserver, waits for `/readyz`.
fn launch(
    server: &mut Server,
    options: &Options,
    pki: &Pki,
    tokens: &Path,
    [etcd_port, peer_port, api_port]: [u16; 3],
) -> Result<(), String> {
    let dir = server.dir.clone();
    let etcd_url = server.etcd_url.clone();
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let deadline = Instant::now() + options.ready_timeout;

    let etcd_args = vec![
        "--name=default".to_owned(),
        format!("--data-dir={}", dir.join("etcd-data").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        "--unsafe-no-fsync=true".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    spawn(server, options, "etcd", &options.binaries.etcd, &etcd_args)?;
    wait_until(server, deadline, "etcd /health", || {
        http_get(etcd_port, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
    })?;

    let mut api_args = vec![
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={api_port}"),
        format!("--etcd-servers={etcd_url}"),
        format!("--cert-dir={}", dir.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        format!("--token-auth-file={}", tokens.display()),
        "--authorization-mode=RBAC".to_owned(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", pki.sa_pub.display()),
        format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        // No controller-manager creates `default` ServiceAccounts, so Pods would be refused.
        "--disable-admission-plugins=ServiceAccount".to_owned(),
        // A loopback address may not be an endpoint of the `kubernetes` Service.
        "--endpoint-reconciler-type=none".to_owned(),
        "--allow-privileged=true".to_owned(),
        "--profiling=false".to_owned(),
    ];
    api_args.extend(options.extra_apiserver_args.iter().cloned());
    spawn(
        server,
        options,
        "kube-apiserver",
        &options.binaries.kube_apiserver,
        &api_args,
    )?;
    let mut probe = server.kubectl_command();
    probe
        .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
        .stdin(Stdio::null());
    wait_until(server, deadline, "kube-apiserver /readyz", || {
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, api_port)),
            Duration::from_millis(200),
        )
        .is_ok()
            && probe
                .output()
                .is_ok_and(|out| out.status.success() && out.stdout.starts_with(b"ok"))
    })
}

/// Stops the processes recorded in `dir` (by their pid files) and removes what [`start`] wrote
/// there; `*.log` files stay when `keep_logs` is set.
pub fn stop(dir: &Path, keep_logs: bool) -> Result<(), String> {
    let dir = absolute(dir)?;
    if !dir.exists() {
        return Ok(());
    }
    for name in PROCESSES {
        match read_pid(&dir, name) {
            Some(pid) if is_running(pid, name) => {
                terminate(name, pid);
                println!("stopped {name} (pid {pid})");
            }
            Some(pid) => println!("{name} (pid {pid}) was not running"),
            None => {}
        }
    }
    clean(&dir, keep_logs)
}

fn spawn(
    server: &mut Server,
    options: &Options,
    name: &'static str,
    program: &Path,
    args: &[String],
) -> Result<(), String> {
    let log_path = server.dir.join(format!("{name}.log"));
    let log =
        File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&server.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    if options.detach {
        cmd.process_group(0);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    write(
        &server.dir.join(format!("{name}.pid")),
        &format!("{}\n", child.id()),
    )?;
    server.children.push((name, child));
    Ok(())
}

/// Polls `ready` every 100 ms until it holds, a started process exits, or `deadline` passes.
fn wait_until(
    server: &mut Server,
    deadline: Instant,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    loop {
        for (name, child) in &mut server.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log = server.dir.join(format!("{name}.log"));
                return Err(format!(
                    "{name} exited ({status}) while waiting for {what}; last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                ));
            }
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = server
                .children
                .iter()
                .map(|(name, _)| {
                    let log = server.dir.join(format!("{name}.log"));
                    format!("--- {}:\n{}", log.display(), tail(&log, 20))
                })
                .collect();
            return Err(format!("timed out waiting for {what}\n{}", logs.join("\n")));
        }
        sleep(Duration::from_millis(100));
    }
}

/// Sends SIGTERM to `pid`, waits up to 15 s for it to go, then sends SIGKILL.
fn terminate(name: &str, pid: u32) {
    signal("TERM", pid);
    let deadline = Instant::now() + Duration::from_secs(15);
    while is_running(pid, name) {
        if Instant::now() >= deadline {
            signal("KILL", pid);
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_running(pid, name) && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
            }
            return;
        }
        sleep(Duration::from_millis(50));
    }
}

fn signal(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `name`.
fn is_running(pid: u32, name: &str) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = fs::read(proc.join("cmdline")) else {
        return false;
    };
    let zombie = fs::read_to_string(proc.join("stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    });
    !zombie
        && cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| String::from_utf8_lossy(argv0).ends_with(name))
}

fn read_pid(dir: &Path, name: &str) -> Option<u32> {
    fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes what [`start`] writes in `dir` (logs too unless `keep_logs`), then `dir` if empty.
fn clean(dir: &Path, keep_logs: bool) -> Result<(), String> {
    let mut paths = vec![
        "kubeconfig".to_owned(),
        "tokens.csv".to_owned(),
        "bin/kubectl".to_owned(),
        "bin".to_owned(),
        "pki".to_owned(),
        "etcd-data".to_owned(),
        "apiserver-certs".to_owned(),
    ];
    for name in PROCESSES {
        paths.push(format!("{name}.pid"));
        if !keep_logs {
            paths.push(format!("{name}.log"));
        }
    }
    for rel in paths {
        let path = dir.join(&rel);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let result = if meta.is_dir() {
            // `bin` may hold files someone else put there: only remove it when empty.
            if rel == "bin" {
                fs::remove_dir(&path).or(Ok(()))
            } else {
                fs::remove_dir_all(&path)
            }
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    let _ = fs::remove_dir(dir);
    Ok(())
}

/// Three distinct free TCP ports on 127.0.0.1 (held open together while choosing).
fn free_ports() -> Result<[u16; 3], String> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("finding a free port on 127.0.0.1: {e}"))?;
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|e| format!("finding a free port on 127.0.0.1: {e}"))?
            .port();
    }
    Ok(ports)
}

/// A plain HTTP/1.0 GET on 127.0.0.1; the whole response, or `None` on any failure.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.starts_with("HTTP/1.").then_some(response)
}

fn kubeconfig_text(url: &str, ca_cert: &Path, token: &str) -> Result<String, String> {
    let ca = fs::read(ca_cert).map_err(|e| format!("reading {}: {e}", ca_cert.display()))?;
    Ok(format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ipvslb-test
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: {ADMIN_USER}
  user:
    token: {token}
contexts:
- name: ipvslb-test
  context:
    cluster: ipvslb-test
    user: {ADMIN_USER}
    namespace: default
current-context: ipvslb-test
preferences: {{}}
",
        ca = base64(&ca)
    ))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn random_hex(len: usize) -> Result<String, String> {
    let mut bytes = vec![0; len];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn absolute(dir: &Path) -> Result<PathBuf, String> {
    std::path::absolute(dir).map_err(|e| format!("resolving {}: {e}", dir.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    /// Starts a server from the cached binaries, uses it, stops it.
    #[test]
    fn starts_serves_and_stops() {
        let versions = crate::apiserver::build::Versions::from_env();
        let bins = crate::apiserver::build::cached(&versions)
            .unwrap_or_else(|e| panic!("{e}\nrun `cargo xtask apiserver build` first"));
        let dir =
            std::env::temp_dir().join(format!("ipvslb-apiserver-test-{}", std::process::id()));
        let server = start(&Options::new(&dir, bins)).unwrap();
        assert!(server.url.starts_with("https://127.0.0.1:"));
        assert!(server.etcd_url.starts_with("http://127.0.0.1:"));
        assert!(server.ca_cert.is_file());
        assert!(
            fs::read_to_string(&server.kubeconfig)
                .unwrap()
                .contains(&server.token)
        );
        let out = server
            .kubectl_command()
            .args(["auth", "can-i", "*", "*"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
        let out = server
            .kubectl_command()
            .args(["get", "ns", "-o", "name"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));
        let pids: Vec<u32> = PROCESSES.iter().filter_map(|p| read_pid(&dir, p)).collect();
        assert_eq!(pids.len(), 2);
        server.stop().unwrap();
        assert!(
            pids.iter()
                .zip(PROCESSES)
                .all(|(pid, name)| !is_running(*pid, name))
        );
        assert!(!dir.exists());
    }

    /// A kube-apiserver that cannot start: the error carries its log, etcd is stopped, logs stay.
    #[test]
    fn failed_start_reports_and_cleans_up() {
        let versions = crate::apiserver::build::Versions::from_env();
        let bins = crate::apiserver::build::cached(&versions)
            .unwrap_or_else(|e| panic!("{e}\nrun `cargo xtask apiserver build` first"));
        let dir =
            std::env::temp_dir().join(format!("ipvslb-apiserver-fail-{}", std::process::id()));
        let mut options = Options::new(&dir, bins);
        options
            .extra_apiserver_args
            .push("--no-such-flag".to_owned());
        let err = start(&options).unwrap_err();
        assert!(err.contains("kube-apiserver exited"), "{err}");
        assert!(err.contains("no-such-flag"), "{err}");
        assert!(dir.join("kube-apiserver.log").is_file());
        assert!(!dir.join("etcd-data").exists());
        stop(&dir, false).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports().unwrap();
        assert!(a != b && b != c && a != c);
    }
}
