//! Tiny TCP and UDP echo servers that answer with their own name and the client address
//! they saw, and the clients that talk to them.
//!
//! Protocol: the client sends one line (TCP) or one datagram (UDP); the server answers
//! `<server-name> <client-ip>:<client-port>\n`. A TCP connection may carry any number
//! of exchanges, which is how the live-change case checks that an established
//! connection survives a sync.

use std::fmt;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::Netns;

/// How often blocked server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What a server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The answering server's (pod's) name.
    pub(crate) server: String,
    /// The client address the server saw.
    pub(crate) peer: SocketAddr,
}

/// The result of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A server answered.
    Reply(Reply),
    /// The connection (or datagram) was refused: TCP RST or ICMP unreachable.
    Refused,
    /// Nothing came back within the timeout.
    TimedOut,
    /// Anything else (unreachable network, reset mid-way, garbage reply).
    Error(String),
}

impl Outcome {
    /// The reply, if a server answered.
    pub(crate) fn reply(&self) -> Option<&Reply> {
        match self {
            Outcome::Reply(r) => Some(r),
            _ => None,
        }
    }

    /// The answering server, or a bracketed word for failures (for tallies).
    pub(crate) fn label(&self) -> String {
        match self {
            Outcome::Reply(r) => r.server.clone(),
            Outcome::Refused => "<refused>".into(),
            Outcome::TimedOut => "<timed out>".into(),
            Outcome::Error(_) => "<error>".into(),
        }
    }

    fn from_io(e: &io::Error) -> Outcome {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::TimedOut,
            _ => Outcome::Error(e.to_string()),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reply(r) => write!(f, "reply {:?}", format!("{} {}", r.server, r.peer)),
            Outcome::Refused => f.write_str("refused"),
            Outcome::TimedOut => f.write_str("no answer (timed out)"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Parses `<name> <ip:port>`.
fn parse_reply(line: &str) -> Outcome {
    let line = line.trim_end();
    match line.split_once(' ') {
        Some((name, peer)) => match peer.parse::<SocketAddr>() {
            Ok(peer) => Outcome::Reply(Reply {
                server: name.to_string(),
                peer,
            }),
            Err(_) => Outcome::Error(format!("unparsable reply {line:?}")),
        },
        None => Outcome::Error(format!("unparsable reply {line:?}")),
    }
}

fn answer(name: &str, peer: SocketAddr) -> String {
    // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; show them as IPv4.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("{name} {peer}\n")
}

/// A running echo server (TCP and UDP on one port, both families) inside a namespace.
pub(crate) struct EchoServer {
    stop: Arc<AtomicBool>,
    main: Option<JoinHandle<Option<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EchoServer {
    /// Starts the server in `ns` and returns once it listens.
    pub(crate) fn start(ns: &Netns, name: &str, port: u16) -> Result<EchoServer, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let name = name.to_string();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let main = ns.spawn_in(move || {
            // "[::]" with the default bindv6only=0 accepts both families on one socket.
            let bound = TcpListener::bind(("::", port)).and_then(|t| {
                t.set_nonblocking(true)?;
                let u = UdpSocket::bind(("::", port))?;
                u.set_nonblocking(true)?;
                Ok((t, u))
            });
            match bound {
                Ok((tcp, udp)) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(&name, &tcp, &udp, &stop2, &conns2);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("echo server {name}: bind :{port}: {e}")));
                }
            }
        })?;
        let server = EchoServer {
            stop,
            main: Some(main),
            conns,
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("echo server did not start within 10s".into()),
        }
    }

    /// Stops every thread of the server (idempotent).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.main.take() {
            let _ = h.join();
        }
        let handles: Vec<_> = match self.conns.lock() {
            Ok(mut g) => g.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    name: &str,
    tcp: &TcpListener,
    udp: &UdpSocket,
    stop: &Arc<AtomicBool>,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: udp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, POLL.as_millis() as libc::c_int) };
        if n <= 0 {
            continue;
        }
        while let Ok((stream, peer)) = tcp.accept() {
            let (name, stop) = (name.to_string(), stop.clone());
            let h = std::thread::spawn(move || serve_conn(&name, stream, peer, &stop));
            match conns.lock() {
                Ok(mut g) => g.push(h),
                Err(p) => p.into_inner().push(h),
            }
        }
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            // A lost answer shows up as a client timeout, which is what tests look at.
            let _ = udp.send_to(answer(name, peer).as_bytes(), peer);
        }
    }
}

fn serve_conn(name: &str, mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    pending.drain(..=pos);
                    if stream.write_all(answer(name, peer).as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TCP connection from an optional source address, with a connect timeout.
/// std cannot bind before connecting, hence the raw socket calls.
pub(crate) fn tcp_connect(
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(src) = src else {
        return TcpStream::connect_timeout(&dst, timeout);
    };
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    check(raw)?;
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (sa, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: `sa` is valid for `len` bytes.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    })?;
    let (da, dlen) = sockaddr(dst);
    // SAFETY: `da` is valid for `dlen` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &da as *const _ as *const libc::sockaddr,
            dlen,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        check(n)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut err: libc::c_int = 0;
        let mut elen = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` and `elen` are valid out-pointers of the right size.
        check(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut _ as *mut libc::c_void,
                &mut elen,
            )
        })?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// One request/answer on an open TCP connection.
pub(crate) fn tcp_exchange_on(stream: &mut TcpStream, msg: &str, timeout: Duration) -> Outcome {
    if let Err(e) = stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .and_then(|_| stream.write_all(format!("{msg}\n").as_bytes()))
    {
        return Outcome::from_io(&e);
    }
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Outcome::Error(format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&got)
                ))
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') {
                    return parse_reply(&String::from_utf8_lossy(&got));
                }
            }
            Err(e) => return Outcome::from_io(&e),
        }
    }
}

/// Connect, one exchange, close.
pub(crate) fn tcp_once(
    src: Option<IpAddr>,
    dst: SocketAddr,
    msg: &str,
    timeout: Duration,
) -> Outcome {
    match tcp_connect(src, dst, timeout) {
        Ok(mut s) => tcp_exchange_on(&mut s, msg, timeout),
        Err(e) => Outcome::from_io(&e),
    }
}

/// A connected UDP socket from `src` (address and port may be unspecified/0).
pub(crate) fn udp_socket(src: Option<SocketAddr>, dst: SocketAddr) -> io::Result<UdpSocket> {
    let src = src.unwrap_or_else(|| {
        let any: IpAddr = if dst.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        SocketAddr::new(any, 0)
    });
    let s = UdpSocket::bind(src)?;
    // Connecting makes ICMP errors (REJECT) visible as ECONNREFUSED on recv.
    s.connect(dst)?;
    Ok(s)
}

/// One datagram and its answer on a connected UDP socket.
pub(crate) fn udp_exchange_on(sock: &UdpSocket, msg: &str, timeout: Duration) -> Outcome {
    if let Err(e) = sock.set_read_timeout(Some(timeout)) {
        return Outcome::from_io(&e);
    }
    if let Err(e) = sock.send(msg.as_bytes()) {
        return Outcome::from_io(&e);
    }
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        Ok(n) => parse_reply(&String::from_utf8_lossy(&buf[..n])),
        Err(e) => Outcome::from_io(&e),
    }
}

/// Fresh socket, one datagram, close.
pub(crate) fn udp_once(
    src: Option<IpAddr>,
    dst: SocketAddr,
    msg: &str,
    timeout: Duration,
) -> Outcome {
    match udp_socket(src.map(|ip| SocketAddr::new(ip, 0)), dst) {
        Ok(s) => udp_exchange_on(&s, msg, timeout),
        Err(e) => Outcome::from_io(&e),
    }
}
