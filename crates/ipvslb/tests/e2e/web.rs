//! whoami, the demo's pods: an HTTP server that answers with its name and the address the
//! request came from, and the client that asks it through the VIP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `whoami NAME ADDR:PORT...`: serves until killed.
pub fn serve(args: &[String]) -> Result<(), String> {
    let (name, addrs) = args.split_first().ok_or("whoami NAME ADDR:PORT...")?;
    let mut threads = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let listener = TcpListener::bind(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || answer(&name, stream));
            }
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Reads the request head and answers as traefik/whoami does (the lines the test reads).
fn answer(name: &str, mut stream: TcpStream) {
    let remote = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut request = String::new();
    if let Ok(clone) = stream.try_clone() {
        let mut reader = BufReader::new(clone);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line == "\r\n" || line == "\n" {
                break;
            }
            request.push_str(&line);
            line.clear();
        }
    }
    let first = request.lines().next().unwrap_or_default();
    // A long download in pieces: a line naming the pod every tenth of a second for that many
    // seconds, over one connection.
    if let Some(seconds) = first
        .strip_prefix("GET /stream/")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
    {
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
        );
        for _ in 0..seconds * 10 {
            if writeln!(stream, "Hostname: {name}").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    // A long download: the answer comes after a while, over one connection.
    if first.starts_with("GET /slow ") {
        std::thread::sleep(SLOW);
    }
    let body = format!("Hostname: {name}\nRemoteAddr: {remote}\n{first}\n");
    let _ = write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// How long `GET /slow` takes to answer.
pub const SLOW: Duration = Duration::from_secs(4);

/// One answer seen by the client.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When the answer (or the failure) came, in milliseconds since the epoch.
    pub at_ms: u128,
    /// The pod and the address it saw, or what went wrong.
    pub outcome: Result<(String, IpAddr), String>,
}

impl Answer {
    pub fn pod(&self) -> Option<&str> {
        self.outcome.as_ref().ok().map(|(pod, _)| pod.as_str())
    }
    pub fn remote(&self) -> Option<IpAddr> {
        self.outcome.as_ref().ok().map(|(_, remote)| *remote)
    }
}

/// Milliseconds since the epoch: the clock shared by every process in the VM.
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// `ask ADDR:PORT COUNT EVERY_MS [PATH]`: makes COUNT requests (0: until killed) for PATH
/// (default `/`), one every EVERY_MS, printing a line per answer: `<ms> ok <pod> <remote>` or
/// `<ms> err <what>`.
pub fn ask(args: &[String]) -> Result<(), String> {
    let (addr, count, every, path) = match args {
        [addr, count, every] => (addr, count, every, "/"),
        [addr, count, every, path] => (addr, count, every, path.as_str()),
        _ => return Err("ask ADDR:PORT COUNT EVERY_MS [PATH]".to_owned()),
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: u64 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let every = Duration::from_millis(every.parse().map_err(|e| format!("{every}: {e}"))?);
    // A poller must not sit in one attempt long: its lines time what it saw.
    let connect = if every.is_zero() {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(500)
    };
    let read = if path == "/" {
        Duration::from_secs(2)
    } else {
        SLOW * 2
    };
    let mut done = 0;
    while count == 0 || done < count {
        let answer = get(addr, path, connect, read);
        let at = now_ms();
        match answer {
            Ok((pod, remote)) => println!("{at} ok {pod} {remote}"),
            Err(e) => println!("{at} err {}", e.replace('\n', " ")),
        }
        done += 1;
        std::thread::sleep(every);
    }
    Ok(())
}

/// One `GET path` to `addr`: the pod's name and the address it saw.
fn get(
    addr: SocketAddr,
    path: &str,
    connect: Duration,
    read: Duration,
) -> Result<(String, IpAddr), String> {
    let mut stream = TcpStream::connect_timeout(&addr, connect).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(read)).ok();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("reading: {e}"))?;
    let field = |name: &str| {
        response
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
    };
    let pod = field("Hostname:").ok_or_else(|| format!("no Hostname in {response:?}"))?;
    let remote = field("RemoteAddr:").ok_or_else(|| format!("no RemoteAddr in {response:?}"))?;
    let remote: SocketAddr = remote.parse().map_err(|e| format!("{remote}: {e}"))?;
    Ok((pod, remote.ip()))
}

/// Parses the lines [`ask`] printed.
pub fn parse(output: &str) -> Vec<Answer> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.splitn(3, ' ');
            let at_ms = words.next()?.parse().ok()?;
            let outcome = match words.next()? {
                "ok" => {
                    let rest = words.next()?;
                    let (pod, remote) = rest.split_once(' ')?;
                    Ok((pod.to_owned(), remote.parse().ok()?))
                }
                _ => Err(words.next().unwrap_or_default().to_owned()),
            };
            Some(Answer { at_ms, outcome })
        })
        .collect()
}

/// `streams ADDR:PORT COUNT SECONDS`: COUNT downloads of SECONDS each at once, then a line per
/// download: `<local port> ok <pod> <lines>` when it went to its end from one pod, or
/// `<local port> broken <why>`.
pub fn streams(args: &[String]) -> Result<(), String> {
    let [addr, count, seconds] = args else {
        return Err("streams ADDR:PORT COUNT SECONDS".to_owned());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: usize = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let seconds: u64 = seconds.parse().map_err(|e| format!("{seconds}: {e}"))?;
    let downloads: Vec<_> = (0..count)
        .map(|_| std::thread::spawn(move || download(addr, seconds)))
        .collect();
    for download in downloads {
        match download.join() {
            Ok(line) => println!("{line}"),
            Err(_) => println!("0 broken the download thread panicked"),
        }
    }
    Ok(())
}

/// One download of [`streams`], as its line.
fn download(addr: SocketAddr, seconds: u64) -> String {
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => return format!("0 broken connecting: {e}"),
    };
    let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    // Long enough for a retransmission after a lost director; a stall beyond it is a break.
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    if let Err(e) = write!(
        stream,
        "GET /stream/{seconds} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    ) {
        return format!("{port} broken sending: {e}");
    }
    let mut pods = std::collections::BTreeSet::new();
    let mut lines = 0u64;
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => {
                if let Some(pod) = line.strip_prefix("Hostname: ") {
                    pods.insert(pod.trim().to_owned());
                    lines += 1;
                }
            }
            Err(e) => return format!("{port} broken after {lines} lines: {e}"),
        }
    }
    let expected = seconds * 10;
    match (pods.len(), lines == expected) {
        (1, true) => format!(
            "{port} ok {} {lines}",
            pods.first().cloned().unwrap_or_default()
        ),
        (1, false) => format!("{port} broken ended after {lines} of {expected} lines"),
        _ => format!("{port} broken answered by {pods:?}"),
    }
}
