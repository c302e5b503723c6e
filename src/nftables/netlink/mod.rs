//! nftables over netlink, by layer: [`encode`] turns a [`Transaction`] into one batch
//! (pure), the socket ([`crate::sys::socket`]) carries it, [`read`] reads a table back;
//! the libnftnl objects underneath live in [`crate::sys::nftnl`], the only unsafe code.
//!
//! The batch is all-or-nothing: the kernel commits it only if every message succeeds,
//! and an error names the operation (by the message's sequence number) that failed.
//! Completion is detected without per-message ACKs (which would flood the socket on
//! big syncs): the kernel processes a batch synchronously inside `sendmsg`, so after it
//! returns we ask for the ruleset generation and read until its reply; every error of
//! the batch arrives before it.

mod abi;
pub(crate) mod encode;
mod read;

use abi::{NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NFT_MSG_NEWGEN, NLM_F_ACK};
use encode::{encode_into, AnonNames};

use super::existing::{Existing, TableContents};
use super::interface::NftInterface;
use super::text::op_line;
use super::transaction::{Family, Set, Transaction};
use crate::sys::nftnl::NlMsg;
use crate::sys::socket::{NetlinkSocket, NLMSG_DONE, NLMSG_ERROR};
use crate::sys::SysError;

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure.
    #[error("netlink {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel refused an operation; the whole batch was rolled back.
    #[error("kernel refused operation {index} `{op}`: {source}")]
    Refused {
        /// 0-based index of the operation in the transaction.
        index: usize,
        /// The operation in nft syntax.
        op: String,
        /// The errno.
        source: std::io::Error,
    },
    /// An operation uses an object the netlink encoder does not write yet (the `maps`
    /// layout's data maps, interval keys and map-based DNAT); apply it with `nft -f`.
    #[error("operation {index}: the netlink encoder does not support {what} yet")]
    Unsupported {
        /// 0-based index of the operation in the transaction.
        index: usize,
        /// What is not supported.
        what: &'static str,
    },
    /// An operation could not be encoded (a name with a NUL byte, a value too long).
    #[error("cannot encode: {0}")]
    Encode(#[from] SysError),
}

/// Bytes per receive: a dump of a large table comes in datagrams of up to this size.
const RECV_BUFFER: usize = 1 << 20;

/// A netlink socket to the current network namespace's nftables.
pub struct Netlink {
    sock: NetlinkSocket,
    names: AnonNames,
    /// The last batch's buffer, encoded into again: a cold sync sends ~50 batches of
    /// a few hundred KiB, and a fresh buffer each time was fresh pages to fault in
    /// and zero.
    buffer: Vec<u8>,
}

impl Netlink {
    /// Opens a socket.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let sock = NetlinkSocket::open(RECV_BUFFER).map_err(|source| NetlinkError::Io {
            what: "open socket",
            source,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let names = AnonNames::new(nanos ^ (u64::from(sock.port_id()) << 32));
        Ok(Netlink {
            sock,
            names,
            buffer: Vec::new(),
        })
    }

    /// Applies a transaction as one atomic batch.
    pub fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        if tx.is_empty() {
            return Ok(());
        }
        // Sequence numbers are taken after encoding, once the count is known.
        let first = self.sock.take_seqs(0);
        let buffer = std::mem::take(&mut self.buffer);
        let mut batch = encode_into(tx, first, &mut self.names, buffer)?;
        self.sock.take_seqs(batch.next_seq.wrapping_sub(first));
        let io = |what| move |source| NetlinkError::Io { what, source };
        self.sock.send(&batch.bytes).map_err(io("send batch"))?;
        self.buffer = std::mem::take(&mut batch.bytes);
        // The batch ran inside sendmsg; its errors are queued before this reply.
        let gen_seq = self.sock.take_seqs(1);
        let getgen = NlMsg::new(NFT_MSG_GETGEN, 0, NLM_F_ACK, gen_seq).finish()?;
        self.sock.send(&getgen).map_err(io("send getgen"))?;
        let mut first_err: Option<(u32, i32)> = None;
        self.sock
            .recv_until(|frame| {
                if let Some(errno) = frame.error().filter(|e| *e != 0) {
                    first_err.get_or_insert((frame.seq, errno));
                }
                let newgen =
                    frame.ty >> 8 == NFNL_SUBSYS_NFTABLES && frame.ty & 0xff == NFT_MSG_NEWGEN;
                frame.seq == gen_seq
                    && (frame.ty == NLMSG_DONE || frame.ty == NLMSG_ERROR || newgen)
            })
            .map_err(io("receive"))?;
        if let Some((seq, errno)) = first_err {
            let index = batch.op_of(seq).unwrap_or(0);
            return Err(NetlinkError::Refused {
                index,
                op: tx
                    .ops
                    .get(index)
                    .map(|o| op_line(tx.family, &tx.table, o))
                    .unwrap_or_default(),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(())
    }

    /// Deletes our table of a family; a missing table is fine.
    pub fn delete_table(&mut self, family: Family, table: &str) -> Result<(), NetlinkError> {
        NftInterface::delete_table(self, family, table)
    }
}

impl NftInterface for Netlink {
    type Error = NetlinkError;

    fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        Netlink::apply(self, tx)
    }

    fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        Netlink::read_table(self, family, table)
    }

    fn read_contents(
        &mut self,
        family: Family,
        table: &str,
        declared: &dyn Fn(&str) -> Option<Set>,
    ) -> Result<Option<TableContents>, NetlinkError> {
        Netlink::read_contents(self, family, table, declared)
    }

    fn generation(&mut self) -> Result<Option<u32>, NetlinkError> {
        Netlink::generation(self)
    }

    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        Netlink::chain_exists(self, family, table, chain)
    }

    fn is_not_found(e: &NetlinkError) -> bool {
        matches!(e, NetlinkError::Refused { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
    }
}

/// A netlink connection opened on first use, so that building a dataplane cannot fail
/// and costs nothing until it syncs.
#[derive(Default)]
pub struct LazyNetlink {
    socket: Option<Netlink>,
}

impl LazyNetlink {
    fn socket(&mut self) -> Result<&mut Netlink, NetlinkError> {
        match &mut self.socket {
            Some(s) => Ok(s),
            none => Ok(none.insert(Netlink::open()?)),
        }
    }
}

impl NftInterface for LazyNetlink {
    type Error = NetlinkError;

    fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        self.socket()?.apply(tx)
    }

    fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        self.socket()?.read_table(family, table)
    }

    fn read_contents(
        &mut self,
        family: Family,
        table: &str,
        declared: &dyn Fn(&str) -> Option<Set>,
    ) -> Result<Option<TableContents>, NetlinkError> {
        self.socket()?.read_contents(family, table, declared)
    }

    fn generation(&mut self) -> Result<Option<u32>, NetlinkError> {
        self.socket()?.generation()
    }

    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        self.socket()?.chain_exists(family, table, chain)
    }

    fn is_not_found(e: &NetlinkError) -> bool {
        <Netlink as NftInterface>::is_not_found(e)
    }
}
