//! The probes server of the real binary under hostile clients. No API server is needed: the
//! binary points at a closed port and keeps retrying, which must not touch its liveness.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Ipvslb, body, status};

const SECOND: Duration = Duration::from_secs(1);

/// A kubeconfig for a cluster that is not there.
fn nowhere(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n\
         clusters: [{name: c, cluster: {server: \"https://127.0.0.1:9\"}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: x, context: {cluster: c, user: u}}]\n",
    )
    .unwrap();
    path
}

fn wait_for(what: &str, ipvslb: &mut Ipvslb, timeout: Duration, check: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answer = ipvslb.get("/healthz");
        if check(&answer) {
            return;
        }
        assert!(
            ipvslb.exited().is_none(),
            "ipvslb exited while waiting for {what}:\n{}",
            ipvslb.logs()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last answer {answer:?}\n{}",
            ipvslb.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_slow_and_malformed_clients_and_a_descriptor_shortage_do_not_stop_the_health_answers() {
    let dir = std::env::temp_dir().join(format!("ipvslb-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Few descriptors, so that idle clients can exhaust them.
    let mut ipvslb = Ipvslb::spawn(
        &nowhere(&dir),
        "test.ipvslb.io/probes",
        "probes-test",
        &[],
        "ulimit -n 64 &&",
        dir.join("ipvslb.log"),
    );
    wait_for("a first /healthz answer", &mut ipvslb, 20 * SECOND, |a| {
        status(a) == Some(200)
    });

    // More idle connections than the process has descriptors.
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&ipvslb.probes.parse().unwrap(), SECOND).ok())
        .collect();
    assert!(idle.len() > 64, "only {} connections opened", idle.len());
    // Clients that send a request a byte a second, never finishing it.
    let probes = ipvslb.probes.clone();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let probes = probes.clone();
            std::thread::spawn(move || {
                let Ok(mut stream) = TcpStream::connect(&probes) else {
                    return;
                };
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: yes"
                    .iter()
                    .cycle()
                    .take(40)
                {
                    if stream.write_all(&[*byte]).is_err() {
                        return; // cut off by the server: what it should do
                    }
                    std::thread::sleep(SECOND);
                }
            })
        })
        .collect();

    wait_for(
        "/healthz to answer again through the idle and slow clients",
        &mut ipvslb,
        60 * SECOND,
        |a| status(a) == Some(200) && body(a) == "ok\n",
    );

    // Garbage gets an answer (or a closed connection), not a stuck one.
    for garbage in [
        &b"\x00\x01\x02 not http\r\n\r\n"[..],
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(&ipvslb.probes).unwrap();
        stream.set_read_timeout(Some(30 * SECOND)).unwrap();
        stream.write_all(garbage).unwrap();
        let mut answer = String::new();
        match stream.read_to_string(&mut answer) {
            Ok(_) => assert!(
                answer.is_empty() || status(&answer) == Some(400),
                "{garbage:?} answered {answer:?}"
            ),
            Err(e) => assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "{garbage:?} left the connection open"
            ),
        }
    }

    // The server closed every idle connection rather than hold it.
    for mut stream in idle {
        stream.set_read_timeout(Some(30 * SECOND)).unwrap();
        let mut rest = Vec::new();
        if let Err(e) = stream.read_to_end(&mut rest) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "an idle connection was held open"
            );
        }
    }
    for thread in slow {
        thread.join().unwrap();
    }
    wait_for("/healthz after it all", &mut ipvslb, 20 * SECOND, |a| {
        status(a) == Some(200)
    });
    let ready = ipvslb.get("/readyz");
    assert_eq!(status(&ready), Some(503), "no cluster, not ready: {ready}");
    assert!(
        body(&ready).contains("Service"),
        "the reason names a kind: {ready}"
    );
    assert!(ipvslb.exited().is_none(), "{}", ipvslb.logs());
}
