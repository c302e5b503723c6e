//! The kernel's C interfaces, wrapped: the only `unsafe` code in kproxy lives here.
//!
//! - [`nftnl`]: libnftnl objects (tables, chains, rules, expressions, sets, elements)
//!   as owners that free themselves, with NULL and length checks, serialized into
//!   netlink messages whose buffers grow to fit and refuse to overflow.
//! - [`socket`]: a netfilter netlink socket (libmnl) and the safe reading of netlink
//!   frames and acknowledgements, shared by nftables and conntrack.
//!
//! Everything above this module is safe Rust.

pub(crate) mod nftnl;
pub(crate) mod socket;

/// A failure at the C boundary.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// libnftnl could not allocate an object (out of memory, or an unknown
    /// expression name).
    #[error("libnftnl could not allocate {0}")]
    Alloc(&'static str),
    /// A string passed to C contained a NUL byte.
    #[error("name with NUL byte: {0:?}")]
    Nul(String),
    /// A value was too long for its netlink attribute.
    #[error("{what} of {len} bytes is too long for netlink")]
    TooLong {
        /// What was being encoded.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// libnftnl refused an attribute.
    #[error("libnftnl refused attribute {attr} of {what}")]
    Attribute {
        /// The object kind.
        what: &'static str,
        /// The attribute number.
        attr: u16,
    },
    /// A message came out longer than its buffer: a bug in the size accounting,
    /// reported instead of sending a truncated message.
    #[error("netlink message of {len} bytes overflowed its {capacity}-byte buffer")]
    Overflow {
        /// The length libnftnl wrote into the header.
        len: usize,
        /// The buffer's size.
        capacity: usize,
    },
}
