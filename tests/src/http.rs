//! One raw HTTP/1.1 client for the tests, over TCP or the node's unix socket: the whole
//! answer comes back, head included, so tests can assert on status lines and headers.

use std::io::{Read, Write};
use std::path::Path;

/// Where a request goes.
pub enum To<'a> {
    Tcp(&'a str),
    Unix(&'a Path),
}

/// One request with these headers and body (`Connection: close`); the whole raw answer.
pub fn http(to: To, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream: Box<dyn ReadWrite> = match to {
        To::Tcp(addr) => Box::new(std::net::TcpStream::connect(addr).unwrap()),
        To::Unix(sock) => Box::new(std::os::unix::net::UnixStream::connect(sock).unwrap()),
    };
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The status code of a raw answer (0 when there is none).
pub fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// POST to a local HTTP endpoint; returns the status code.
pub fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    status_of(&http(To::Tcp(addr), "POST", path, headers, body))
}

/// One request over the node's unix socket with a JSON body.
pub fn http_over_unix(sock: &Path, method: &str, path: &str, body: &str) -> String {
    http_with_headers(
        sock,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// A request over a unix socket with these headers and body.
pub fn http_with_headers(
    sock: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    http(To::Unix(sock), method, path, headers, body.as_bytes())
}

/// A GET over TCP, with a bearer token if given.
pub fn http_tcp(addr: &str, path: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(To::Tcp(addr), "GET", path, &headers, b"")
}
