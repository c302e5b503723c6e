//! A netfilter netlink socket and the reading of its replies: frames, errors and
//! acknowledgements. nftables (batches, dumps) and conntrack (dumps, deletes) share it.

use std::os::unix::io::AsRawFd;

/// `NLMSG_ERROR`: an error or (code 0) an acknowledgement.
pub(crate) const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub(crate) const NLMSG_DONE: u16 = 3;
/// The netlink header's size.
const NLMSG_HDRLEN: usize = 16;

/// One netlink message as received.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame<'a> {
    /// The message type (for nfnetlink: subsystem << 8 | message).
    pub(crate) ty: u16,
    /// Its sequence number.
    pub(crate) seq: u32,
    /// What follows the netlink header.
    pub(crate) payload: &'a [u8],
    /// The whole message, header included.
    pub(crate) bytes: &'a [u8],
}

impl Frame<'_> {
    /// For an `NLMSG_ERROR` frame, its errno (0 for an acknowledgement).
    pub(crate) fn error(&self) -> Option<i32> {
        if self.ty != NLMSG_ERROR {
            return None;
        }
        let b = self.payload.get(..4)?;
        Some(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The netlink messages in one datagram; stops at the first malformed one.
pub(crate) fn frames(buf: &[u8]) -> impl Iterator<Item = Frame<'_>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(off..)?;
        let h = rest.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let frame = Frame {
            ty: u16::from_ne_bytes([h[4], h[5]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
            bytes: &rest[..len],
        };
        off += len.div_ceil(4) * 4;
        Some(frame)
    })
}

/// A netfilter netlink socket in the current network namespace, with its own
/// sequence numbers.
pub(crate) struct NetlinkSocket {
    sock: mnl::Socket,
    seq: u32,
    buf: Vec<u8>,
}

// SAFETY: the socket is owned exclusively by this value (no aliasing pointers are
// kept) and a netlink socket may be used from any thread; `&mut self` on every use
// rules out concurrent use.
unsafe impl Send for NetlinkSocket {}

impl NetlinkSocket {
    /// Opens and binds a socket; `recv_size` is the receive buffer per datagram.
    pub(crate) fn open(recv_size: usize) -> std::io::Result<NetlinkSocket> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter)?;
        // Start from the clock, as libmnl users do, so replies to an earlier process
        // on a reused port id are not mistaken for ours.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(NetlinkSocket {
            sock,
            seq,
            buf: vec![0; recv_size],
        })
    }

    /// This socket's netlink port id (unique among the namespace's open sockets).
    pub(crate) fn port_id(&self) -> u32 {
        self.sock.portid()
    }

    /// The next `n` sequence numbers; returns the first.
    pub(crate) fn take_seqs(&mut self, n: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(n);
        first
    }

    /// Sends one datagram.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() > 200_000 {
            self.grow_sndbuf(bytes.len());
        }
        self.sock.send(bytes).map(|_| ())
    }

    /// Lets one large batch go in a single `sendmsg` (best effort: without
    /// CAP_NET_ADMIN the send fails and says so).
    fn grow_sndbuf(&self, len: usize) {
        let size: i32 = len.saturating_mul(2).min(i32::MAX as usize / 2) as i32;
        // SAFETY: plain setsockopt on our own fd with an int option of the right size.
        unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &size as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as u32,
            );
        }
    }

    /// Reads datagrams, handing every frame to `f`, until `f` says the reply it waits
    /// for is complete.
    pub(crate) fn recv_until(
        &mut self,
        mut f: impl FnMut(&Frame<'_>) -> bool,
    ) -> std::io::Result<()> {
        loop {
            let n = self.sock.recv_raw(&mut self.buf)?;
            let mut done = false;
            for frame in frames(&self.buf[..n]) {
                done |= f(&frame);
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Reads the reply to request `seq` (a dump or an acknowledged request) and hands
    /// each of its data frames to `f`; the kernel's error, if it sent one, is the
    /// result.
    pub(crate) fn recv_reply(
        &mut self,
        seq: u32,
        mut f: impl FnMut(&Frame<'_>),
    ) -> std::io::Result<Result<(), i32>> {
        let mut errno = 0;
        self.recv_until(|frame| {
            if frame.seq != seq {
                return false;
            }
            match frame.error() {
                Some(code) => {
                    errno = code;
                    true
                }
                None if frame.ty == NLMSG_DONE => true,
                None => {
                    f(frame);
                    false
                }
            }
        })?;
        Ok(if errno == 0 { Ok(()) } else { Err(errno) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn frames_are_split_and_errors_decoded() {
        let mut buf = msg(0x0a03, 7, &[1, 2, 3]);
        buf.extend(msg(NLMSG_ERROR, 8, &(-2i32).to_ne_bytes()));
        buf.extend(msg(NLMSG_ERROR, 9, &0i32.to_ne_bytes()));
        let got: Vec<_> = frames(&buf).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (got[0].ty, got[0].seq, got[0].payload),
            (0x0a03, 7, &[1u8, 2, 3][..])
        );
        assert_eq!(got[0].bytes.len(), 19);
        assert_eq!(got[0].error(), None);
        assert_eq!(got[1].error(), Some(2));
        assert_eq!(got[2].error(), Some(0));
    }

    #[test]
    fn a_malformed_frame_ends_the_walk() {
        let mut buf = msg(1, 1, &[]);
        buf.extend_from_slice(&[200, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(frames(&buf).count(), 1);
        assert_eq!(frames(&[0u8; 8]).count(), 0);
    }
}
