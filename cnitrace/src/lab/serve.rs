//! The small HTTP server the lab runs inside pods (jellyfin's 8096) and the external host.

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::Duration,
};

use anyhow::{Context, Result};

/// Serves `200 OK` with a one-line body naming the server, until killed.
pub fn serve(port: u16, name: &str) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind 0.0.0.0:{port}"))?;
    let body = format!("{name}: hello from the cnitrace lab\n");
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            // Read the whole request head: closing with unread data would reset the connection.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
            let _ = s.write_all(reply.as_bytes());
        });
    }
    Ok(())
}
