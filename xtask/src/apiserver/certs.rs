//! Test certificates made with the `openssl` command: a CA, a serving certificate for 127.0.0.1
//! signed by it, and a service-account signing key pair. All keys are ECDSA P-256.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The certificate files of one test API server.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (PEM): trust anchor for clients and client-certificate CA of the server.
    pub ca_cert: PathBuf,
    /// The CA private key (PEM).
    pub ca_key: PathBuf,
    /// The API server's serving certificate (PEM), valid for 127.0.0.1 and localhost.
    pub serving_cert: PathBuf,
    /// The serving certificate's private key (PEM).
    pub serving_key: PathBuf,
    /// The service-account token signing key (PEM, private).
    pub sa_key: PathBuf,
    /// The service-account token verification key (PEM, public).
    pub sa_pub: PathBuf,
}

impl Pki {
    /// Generates a fresh set of files in `dir`, replacing any there.
    pub fn generate(dir: &Path) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                "req",
                "-x509",
                "-days",
                "3650",
                "-subj",
                "/CN=ipvslb-test-ca",
            ],
            &ec,
            &[("-keyout", &pki.ca_key), ("-out", &pki.ca_cert)],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        let csr = dir.join("apiserver.csr");
        openssl(
            &["req", "-new", "-subj", "/CN=kube-apiserver"],
            &ec,
            &[("-keyout", &pki.serving_key), ("-out", &csr)],
            &[],
        )?;
        let ext = dir.join("apiserver.ext");
        fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc\n",
        )
        .map_err(|e| format!("writing {}: {e}", ext.display()))?;
        openssl(
            &["x509", "-req", "-days", "3650", "-set_serial", "2"],
            &[],
            &[
                ("-in", &csr),
                ("-CA", &pki.ca_cert),
                ("-CAkey", &pki.ca_key),
                ("-extfile", &ext),
                ("-out", &pki.serving_cert),
            ],
            &[],
        )?;
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            &[],
            &[("-out", &pki.sa_key)],
            &[],
        )?;
        openssl(
            &["pkey", "-pubout"],
            &[],
            &[("-in", &pki.sa_key), ("-out", &pki.sa_pub)],
            &[],
        )?;
        let _ = fs::remove_file(csr);
        let _ = fs::remove_file(ext);
        Ok(pki)
    }
}

/// Runs `openssl` with `args`, `more`, each `(flag, path)` pair and `tail`, in that order.
fn openssl(
    args: &[&str],
    more: &[&str],
    files: &[(&str, &Path)],
    tail: &[&str],
) -> Result<(), String> {
    let mut cmd = Command::new("openssl");
    cmd.args(args).args(more);
    for (flag, path) in files {
        cmd.arg(flag).arg(path);
    }
    cmd.args(tail);
    let out = cmd
        .output()
        .map_err(|e| format!("running openssl (is it installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`openssl {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}
