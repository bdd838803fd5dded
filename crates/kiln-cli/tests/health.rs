//! `kiln health` against small stand-in servers: 200 passes, anything else fails with one line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn health(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("health").args(args);
    for var in ["KILN_HTTP_PORT", "KILN_HEALTH_URL", "KILN_HEALTH_TIMEOUT_SECS"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads one request head from `s` and returns its request line.
fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string()
}

/// A server on 127.0.0.1 that answers one request with `status` and `body`, and returns the
/// request line it got.
fn one_shot(status: &'static str, body: &'static str) -> (u16, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let line = read_request(&mut s);
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(response.as_bytes()).unwrap();
        line
    });
    (port, handle)
}

#[test]
fn http_200_exits_zero() {
    let (port, server) = one_shot("200 OK", "");
    let url = format!("http://127.0.0.1:{port}/v2/health/ready");
    let (ok, out, err) = health(&["--url", &url], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("HTTP 200"), "{out}");
    assert_eq!(server.join().unwrap(), "GET /v2/health/ready HTTP/1.1");
}

#[test]
fn the_default_url_follows_kiln_http_port() {
    let (port, server) = one_shot("200 OK", "");
    let (ok, out, err) = health(&[], &[("KILN_HTTP_PORT", &port.to_string())]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("http://127.0.0.1:{port}/v2/health/ready")),
        "{out}"
    );
    assert_eq!(server.join().unwrap(), "GET /v2/health/ready HTTP/1.1");
    let (ok, _, err) = health(&[], &[("KILN_HTTP_PORT", "http")]);
    assert!(
        !ok && err.contains("KILN_HTTP_PORT=\"http\" is not a port number"),
        "{err}"
    );
}

#[test]
fn not_ready_exits_non_zero_with_the_status() {
    let (port, server) = one_shot("503 Service Unavailable", "shutting down");
    let url = format!("http://127.0.0.1:{port}/v2/health/ready");
    let (ok, out, err) = health(&["--url", &url], &[]);
    assert!(!ok, "{out}");
    assert!(
        err.starts_with("error: ") && err.contains("HTTP 503 Service Unavailable: shutting down"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    server.join().unwrap();
}

#[test]
fn a_refused_connection_exits_non_zero() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v2/health/ready");
    let (ok, out, err) = health(&["--url", &url], &[]);
    assert!(!ok, "{out}");
    assert!(err.contains(&format!("GET {url}: cannot connect")), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

#[test]
fn a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and read, never answer; the thread ends when the client hangs up.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let url = format!("http://127.0.0.1:{port}/v2/health/ready");
    let start = Instant::now();
    let (ok, _, err) = health(&["--url", &url, "--timeout-secs", "1"], &[]);
    assert!(!ok && err.contains("no response within 1s"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    server.join().unwrap();
}

#[test]
fn bad_urls_are_rejected_before_connecting() {
    let (ok, _, err) = health(&["--url", "https://127.0.0.1:8000/v2/health/ready"], &[]);
    assert!(!ok && err.contains("only http:// URLs are supported"), "{err}");
    let (ok, _, err) = health(&["--url", "127.0.0.1:8000"], &[]);
    assert!(!ok && err.contains("needs a scheme and host"), "{err}");
}
