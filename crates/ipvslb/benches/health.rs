//! The health checks' cost at a thousand backends (`cargo bench -p ipvslb --bench health`).
//!
//! 1,000 TCP listeners on loopback stand for the backends. The prober checks all of them every
//! second for `SECONDS` seconds; the baseline is the same connects made by a plain loop paced
//! the same way, in the same process and run. Printed: the CPU time of each and their ratio,
//! and how evenly the probes arrive (the busiest 10 ms against the mean).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpu_time::ProcessTime;
use ipvslb::health::{self, Checks};
use ipvslb::metrics::Metrics;
use ipvslb_core::ServiceName;
use ipvslb_core::health::{Check, Probe, Target};
use tokio::net::{TcpListener, TcpStream};

const BACKENDS: usize = 1000;
const SECONDS: u64 = 10;

/// Listeners that accept and close, recording when each connection came.
async fn backends(arrivals: Arc<Mutex<Vec<Instant>>>) -> Vec<SocketAddr> {
    let mut addrs = Vec::with_capacity(BACKENDS);
    for _ in 0..BACKENDS {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        addrs.push(listener.local_addr().expect("its address"));
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Ok(mut a) = arrivals.lock() {
                    a.push(Instant::now());
                }
                drop(stream);
            }
        });
    }
    addrs
}

/// The busiest 10 ms of `arrivals` against the mean over `span`.
fn burstiness(arrivals: &[Instant], start: Instant, span: Duration) -> (usize, f64) {
    let buckets = (span.as_millis() / 10) as usize;
    let mut counts = vec![0usize; buckets.max(1)];
    for at in arrivals.iter().filter(|at| **at >= start) {
        let i = (at.duration_since(start).as_millis() / 10) as usize;
        if let Some(c) = counts.get_mut(i) {
            *c += 1;
        }
    }
    let busiest = counts.iter().copied().max().unwrap_or(0);
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    (busiest, mean)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let addrs = backends(arrivals.clone()).await;
    let span = Duration::from_secs(SECONDS);

    // Baseline: a loop connecting to each backend once a second, evenly paced.
    let gap = Duration::from_secs(1) / BACKENDS as u32;
    let cpu0 = ProcessTime::now();
    let start = Instant::now();
    let mut next = start;
    for _ in 0..SECONDS {
        for addr in &addrs {
            next += gap;
            tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            let _ = TcpStream::connect(addr).await;
        }
    }
    let baseline = cpu0.elapsed();
    let baseline_wall = start.elapsed();

    // The prober over the same backends.
    if let Ok(mut a) = arrivals.lock() {
        a.clear();
    }
    let check = Check {
        probe: Probe::Tcp,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    };
    let targets: BTreeSet<Target> = addrs
        .iter()
        .map(|a| Target {
            address: a.ip(),
            port: a.port(),
            check: check.clone(),
        })
        .collect();
    let checks = Arc::new(Checks::default());
    checks.register(&ServiceName::new("bench", "thousand"), targets);
    let (requeue, _requeued) = futures::channel::mpsc::unbounded();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let cpu0 = ProcessTime::now();
    let start = Instant::now();
    let prober = tokio::spawn(health::run(
        checks.clone(),
        health::Config { max_in_flight: 256 },
        requeue,
        metrics,
        shutdown,
    ));
    tokio::time::sleep(span).await;
    let probed = cpu0.elapsed();
    let _ = stop.send(true);
    let _ = prober.await;
    let seen = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
    // The first second spreads the first probes; count from then on.
    let steady = start + Duration::from_secs(1);
    let (busiest, mean) = burstiness(&seen, steady, span - Duration::from_secs(1));
    let down = checks.down().len();

    println!("health checks of {BACKENDS} backends every 1 s, over {SECONDS} s:");
    println!(
        "  baseline (a paced connect loop, {:.1} s): {} ms CPU, {:.1}% of one core",
        baseline_wall.as_secs_f64(),
        baseline.as_millis(),
        100.0 * baseline.as_secs_f64() / baseline_wall.as_secs_f64()
    );
    println!(
        "  prober: {} ms CPU, {:.1}% of one core; {} probes arrived; {down} targets down",
        probed.as_millis(),
        100.0 * probed.as_secs_f64() / span.as_secs_f64(),
        seen.len()
    );
    println!("  busiest 10 ms: {busiest} probes, mean {mean:.1}");
    println!(
        "prober/baseline = {:.2}",
        probed.as_secs_f64() / baseline.as_secs_f64().max(0.001)
    );
    println!("burst/mean = {:.2}", busiest as f64 / mean.max(0.001));
}
