//! `--metrics-listen ADDR`: a small HTTP/1.1 endpoint for operators.
//!
//! - `GET /metrics`: the counters in the Prometheus text format
//!   ([`Counters::prometheus`]);
//! - `GET /healthz`: `200 ok` while the process runs;
//! - anything else: 404, or 405 for a method other than GET/HEAD, or 400
//!   for a request that is not HTTP.
//!
//! One thread of its own, blocking, one request per connection
//! (`Connection: close`), each bounded (8 KiB of request, 2 s to send it
//! and 2 s to take the answer): a scraper every second is a few
//! microseconds of this thread, and the shards are never involved — the
//! counters are atomics they update anyway.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Counters;

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves it on a thread named `coremq-http` until the
/// process ends.
pub fn spawn(addr: SocketAddr, counters: Arc<Counters>, started: Instant) -> io::Result<()> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("--metrics-listen {addr}: {e}")))?;
    std::thread::Builder::new()
        .name("coremq-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let _ = serve(stream, &counters, started);
                    }
                    // No descriptor left (the broker's clients hold them):
                    // this scrape fails; wait rather than spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
    tracing::info!("metrics on http://{addr}/metrics");
    Ok(())
}

/// Answers one request on `stream`.
fn serve(mut stream: TcpStream, counters: &Counters, started: Instant) -> io::Result<()> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // The whole request within IO_TIMEOUT, not each read: a client that
    // trickles bytes does not hold the thread.
    let deadline = Instant::now() + IO_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        if head.len() >= MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                true,
            );
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, body, content_type) = answer(&head, counters, started);
    let head_only = head.starts_with(b"HEAD ");
    respond(
        &mut stream,
        status,
        content_type,
        body.as_bytes(),
        !head_only,
    )
}

/// Status line, body and content type for a request head.
fn answer(
    head: &[u8],
    counters: &Counters,
    started: Instant,
) -> (&'static str, String, &'static str) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "not an HTTP request\n".into(), TEXT);
    };
    if !version.starts_with(b"HTTP/1.") {
        return ("400 Bad Request", "not an HTTP/1.x request\n".into(), TEXT);
    }
    if method != b"GET" && method != b"HEAD" {
        return ("405 Method Not Allowed", "only GET\n".into(), TEXT);
    }
    // The path, without a query string.
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => (
            "200 OK",
            counters.prometheus(started.elapsed().as_secs()),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        b"/healthz" => ("200 OK", "ok\n".into(), TEXT),
        _ => ("404 Not Found", "try /metrics or /healthz\n".into(), TEXT),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> io::Result<()> {
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut bytes = response(status, allow, content_type, body);
    if !with_body {
        bytes.truncate(bytes.len() - body.len());
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

/// A whole `Connection: close` answer: `status` is the status line's code
/// and reason ("404 Not Found"), `extra` more header lines, each ending in
/// CRLF. Also the WebSocket listeners' refusals (`shard::layer`).
pub(crate) fn response(status: &str, extra: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_get_the_right_status() {
        let c = Counters::default();
        let t = Instant::now();
        let status = |req: &str| answer(req.as_bytes(), &c, t).0;
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), "200 OK");
        assert_eq!(status("HEAD /healthz HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(
            status("POST /metrics HTTP/1.1\r\n\r\n"),
            "405 Method Not Allowed"
        );
        assert_eq!(status("hello\r\n\r\n"), "400 Bad Request");
        assert_eq!(status("GET /metrics SMTP/1.0\r\n\r\n"), "400 Bad Request");
    }

    #[test]
    fn the_exposition_has_one_help_and_type_per_family() {
        let c = Counters::default();
        crate::metrics::bump(&c.connacks[4]);
        let text = c.prometheus(7);
        assert!(
            text.contains("coremq_connacks_total{code=\"4\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("coremq_uptime_seconds 7\n"));
        for family in ["coremq_connacks_total", "coremq_connections"] {
            let types = text
                .lines()
                .filter(|l| {
                    *l == format!("# TYPE {family} counter")
                        || *l == format!("# TYPE {family} gauge")
                })
                .count();
            assert_eq!(types, 1, "{family}");
        }
    }
}
