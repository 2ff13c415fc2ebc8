//! The guest's side of the way to the API server: a listener on the director's port 6443 (its
//! loopback for `ipvslb` and `kubectl`, its segment address for the nodes' kube-proxy) that
//! relays each connection to qemu's forwarded address, which reaches the host's API server.

use std::net::{Shutdown, TcpListener, TcpStream};

/// qemu's forwarded address for the API server.
const UPSTREAM: &str = "10.0.2.100:6443";

/// Starts the relay in the background.
pub fn start() -> Result<(), String> {
    let listener =
        TcpListener::bind("0.0.0.0:6443").map_err(|e| format!("listening on :6443: {e}"))?;
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(up) = TcpStream::connect(UPSTREAM) {
                    pipe(down, up);
                }
            });
        }
    });
    Ok(())
}

/// Copies both ways until either side closes.
fn pipe(down: TcpStream, up: TcpStream) {
    let (Ok(mut down_read), Ok(mut up_read)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    let (mut down_write, mut up_write) = (down, up);
    let upward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut down_read, &mut up_write);
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_read, &mut down_write);
    let _ = down_write.shutdown(Shutdown::Write);
    let _ = upward.join();
}
