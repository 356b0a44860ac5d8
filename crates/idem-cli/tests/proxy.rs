//! `idem proxy` through the real binary, in front of a small upstream: a keyed POST runs once
//! upstream and its retry is replayed; the same key with another body is refused; requests no
//! rule covers pass through; SIGTERM stops it. The layer's behaviour in depth is tested in
//! `crates/idem-http/tests`; this checks the command wires it up (store, rules, principal).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An HTTP/1.1 upstream that answers every request `201` with a body counting the requests.
fn upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let answer = format!("request {n}");
                let _ = write!(
                    conn,
                    "HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\nset-cookie: s=1\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    (port, hits)
}

/// One request with `Connection: close`; returns the status, the head and the body.
fn request(port: u16, head: &str, body: &str) -> (u16, String, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        conn,
        "{head}\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_keyed_post_runs_once_upstream_and_its_retry_is_replayed() {
    let (up, hits) = upstream();
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut proxy = Proxy(
        Command::new(env!("CARGO_BIN_EXE_idem"))
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &format!("http://127.0.0.1:{up}"),
                "--store",
                &format!("sqlite:{}", dir.path().join("idem.db").display()),
                "--rule",
                "POST:/orders=required",
                "--principal-header",
                "x-api-key",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "idem proxy did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let order = "POST /orders HTTP/1.1\r\nx-api-key: alice\r\nidempotency-key: \"order-1\"";

    let (status, head, body) = request(port, order, "{\"item\":1}");
    assert_eq!((status, body.as_str()), (201, "request 1"), "{head}");
    assert!(
        head.contains("set-cookie"),
        "the first answer is passed as it is: {head}"
    );

    // The retry: replayed, not run again, without the cookie.
    let (status, head, body) = request(port, order, "{\"item\":1}");
    assert_eq!((status, body.as_str()), (201, "request 1"), "{head}");
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    assert!(!head.contains("set-cookie"), "{head}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // The same key with another body: refused before it reaches the upstream.
    let (status, _, body) = request(port, order, "{\"item\":2}");
    assert_eq!(status, 422, "{body}");
    // Another client's same key is another request.
    let bob = order.replace("alice", "bob");
    let (status, _, body) = request(port, &bob, "{\"item\":1}");
    assert_eq!((status, body.as_str()), (201, "request 2"));
    // A required key missing: 400; a route no rule covers passes through.
    let (status, _, _) = request(port, "POST /orders HTTP/1.1\r\nx-api-key: alice", "{}");
    assert_eq!(status, 400);
    let (status, _, body) = request(port, "GET /health HTTP/1.1", "");
    assert_eq!((status, body.as_str()), (201, "request 3"));
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let pid = rustix::process::Pid::from_raw(i32::try_from(proxy.0.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = proxy.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "idem proxy ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "idem proxy exited with {status}");
}
