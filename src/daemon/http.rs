//! Tiny HTTP/1.1 servers on std threads for the fixed, tiny endpoints kube-proxy serves
//! (`/healthz`, `/livez`, health-check node ports, `/metrics`): one request per
//! connection, no keep-alive, bounded request size.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A response.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers besides Content-Length and Connection.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: String,
}

/// A running server; stops (and frees its port) when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Server {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it notices.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What a handler sees of a request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `GET`, …
    pub method: String,
    /// The path, query included.
    pub path: String,
    /// The `Accept` header ("" when absent), for content negotiation.
    pub accept: String,
}

fn handle(mut stream: TcpStream, handler: &(dyn Fn(&Request) -> Response + Send + Sync)) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("GET").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    // Read the headers (bounded), keeping Accept.
    let mut accept = String::new();
    for _ in 0..100 {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {
                if let Some((k, v)) = h.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("accept") {
                        accept = v.trim().to_string();
                    }
                }
            }
        }
    }
    let resp = handler(&Request {
        method,
        path,
        accept,
    });
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        resp.body.len(),
        resp.body
    ));
    let _ = stream.write_all(out.as_bytes());
}

/// Serves `handler(request)` on `addr` until the returned [`Server`] is dropped.
pub fn serve(
    addr: SocketAddr,
    handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(s) = conn {
                let h = Arc::clone(&handler);
                std::thread::spawn(move || handle(s, h.as_ref()));
            }
        }
    });
    Ok(Server { stop, addr })
}

/// Test helper: one `GET` over a fresh connection; (status, head, body).
#[cfg(test)]
pub(crate) fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    get_accepting(addr, path, None)
}

/// Test helper: one `GET` with an optional `Accept` header.
#[cfg(test)]
pub(crate) fn get_accepting(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n{accept}\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}
