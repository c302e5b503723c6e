//! The small HTTP servers kube-proxy runs (`/healthz`, `/livez`, health-check node
//! ports, `/metrics` and its neighbours), on hyper and the daemon's tokio runtime.
//! One request per connection (`Connection: close`, as upstream's clients expect of
//! these endpoints and as our own tests read them), no `Date` header, header names in
//! title case: responses are byte for byte what the earlier hand-written server sent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONNECTION, CONTENT_LENGTH};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

/// A response.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers besides Content-Length and Connection.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: String,
}

/// What a handler sees of a request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The path, query included.
    pub path: String,
    /// The `Accept` header ("" when absent), for content negotiation.
    pub accept: String,
}

/// A running server; stops accepting (and frees its port) when dropped.
pub struct Server {
    addr: SocketAddr,
    // Dropping the sender ends the accept loop; requests in flight still finish.
    _stop: oneshot::Sender<()>,
}

impl Server {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A handler: a plain function of the request (the endpoints only read shared state).
type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// How long a client may take to send its request head (the old server's read
/// timeout): a silent client must not hold a connection forever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The runtime the servers run on: the caller's (the daemon enters its runtime before
/// starting them), else one of our own for callers outside any runtime (one-shot
/// commands and tests), started once.
fn runtime() -> std::io::Result<Handle> {
    if let Ok(h) = Handle::try_current() {
        return Ok(h);
    }
    static OWN: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let own = OWN.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kproxy-http")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match own {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(std::io::Error::other(format!(
            "starting a runtime for the HTTP server: {e}"
        ))),
    }
}

/// Turns the handler's response into hyper's, adding Content-Length and
/// `Connection: close` after the handler's headers, in the order the old server wrote
/// them (hyper keeps the order given).
fn to_hyper(resp: Response) -> hyper::Response<Full<Bytes>> {
    let len = resp.body.len();
    let mut b = hyper::Response::builder().status(resp.status);
    for (k, v) in &resp.headers {
        b = b.header(*k, v.as_str());
    }
    b.header(CONTENT_LENGTH, len)
        .header(CONNECTION, "close")
        .body(Full::new(Bytes::from(resp.body)))
        .unwrap_or_else(|e| {
            // Only a handler's own header value could be invalid here.
            tracing::warn!(error = %e, "invalid HTTP response; answering 500");
            let mut r = hyper::Response::new(Full::new(Bytes::new()));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
}

/// Answers one request. The handler runs on the blocking pool: it takes std locks
/// (metrics, the cluster state) that the sync loop may hold, and must not stall the
/// runtime's workers, which also drive the watchers.
async fn respond(
    handler: Arc<Handler>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let request = Request {
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
        accept: req
            .headers()
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    let resp = tokio::task::spawn_blocking(move || handler(&request))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "HTTP handler failed; answering 500");
            Response {
                status: 500,
                headers: vec![],
                body: String::new(),
            }
        });
    Ok(to_hyper(resp))
}

/// Accepts connections until `stop` fires (or its sender is dropped).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: Arc<Handler>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(Arc::clone(&handler), req));
            let conn = http1::Builder::new()
                .keep_alive(false)
                .title_case_headers(true)
                .auto_date_header(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// Serves `handler(request)` on `addr` until the returned [`Server`] is dropped. The
/// address is bound before returning, so a bind error is the caller's to report.
pub fn serve(
    addr: SocketAddr,
    handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
) -> std::io::Result<Server> {
    let rt = runtime()?;
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let listener = {
        let _in_runtime = rt.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    let (tx, rx) = oneshot::channel();
    rt.spawn(accept_loop(listener, Arc::new(handler), rx));
    Ok(Server { addr, _stop: tx })
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
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes on the wire are the old hand-written server's: status line, the
    /// handler's headers, Content-Length, Connection: close, no Date.
    #[test]
    fn response_bytes_are_unchanged() {
        let server = serve("127.0.0.1:0".parse().unwrap(), |req: &Request| Response {
            status: if req.path == "/x?y=1" { 200 } else { 404 },
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body: format!("{{\"accept\":{:?}}}", req.accept),
        })
        .unwrap();
        let (code, head, body) = get_accepting(server.addr(), "/x?y=1", Some("text/plain"));
        assert_eq!(code, 200);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: 23\r\nConnection: close"
        );
        assert_eq!(body, "{\"accept\":\"text/plain\"}");
        let (code, head, _) = get(server.addr(), "/");
        assert_eq!(code, 404);
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    }

    #[test]
    fn dropping_the_server_frees_its_port() {
        let server = serve("127.0.0.1:0".parse().unwrap(), |_: &Request| Response {
            status: 200,
            headers: vec![],
            body: String::new(),
        })
        .unwrap();
        let addr = server.addr();
        drop(server);
        let t = std::time::Instant::now();
        while std::net::TcpListener::bind(addr).is_err() {
            assert!(t.elapsed() < Duration::from_secs(5), "port still bound");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
