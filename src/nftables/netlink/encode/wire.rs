//! Netlink messages and attributes written directly into a batch buffer, byte for
//! byte as libnftnl (through libmnl) writes them: the element messages of a large
//! sync are written this way (see [`super::elem`]); every other object still goes
//! through libnftnl.

use crate::nftables::netlink::abi::NFNL_SUBSYS_NFTABLES;
use crate::sys::SysError;

/// `NLA_F_NESTED`, which libmnl sets on every nest.
const NLA_F_NESTED: u16 = 0x8000;
/// `NLM_F_REQUEST`, which libnftnl sets on every message.
const NLM_F_REQUEST: u16 = 0x1;

/// Starts a message: netlink header (its length filled by [`msg_end`]) and nfgenmsg
/// (`family`, version 0, resource id 0). Returns where it starts.
pub(super) fn msg_start(out: &mut Vec<u8>, ty: u16, family: u8, flags: u16, seq: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | ty).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.extend_from_slice(&[family, 0, 0, 0]);
    start
}

/// Writes the length of the message started at `start` (attributes keep it aligned).
pub(super) fn msg_end(out: &mut [u8], start: usize) -> Result<(), SysError> {
    let len = out.len() - start;
    let len32 = u32::try_from(len).map_err(|_| SysError::TooLong {
        what: "a netlink message",
        len,
    })?;
    out[start..start + 4].copy_from_slice(&len32.to_ne_bytes());
    Ok(())
}

/// Starts an attribute whose payload follows; [`end`] writes its length and pads it.
pub(super) fn start(out: &mut Vec<u8>, ty: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&ty.to_ne_bytes());
    at
}

/// Starts a nest (its type flagged nested, as libmnl does).
pub(super) fn nest(out: &mut Vec<u8>, ty: u16) -> usize {
    start(out, ty | NLA_F_NESTED)
}

/// Ends the attribute (or nest) started at `at`: its length without padding, then
/// zeros up to the next 4-byte boundary.
pub(super) fn end(out: &mut Vec<u8>, at: usize) -> Result<(), SysError> {
    let len = out.len() - at;
    let len16 = u16::try_from(len).map_err(|_| SysError::TooLong {
        what: "a netlink attribute",
        len,
    })?;
    out[at..at + 2].copy_from_slice(&len16.to_ne_bytes());
    out.resize(out.len().next_multiple_of(4), 0);
    Ok(())
}

/// A whole attribute.
pub(super) fn put(out: &mut Vec<u8>, ty: u16, payload: &[u8]) -> Result<(), SysError> {
    let at = start(out, ty);
    out.extend_from_slice(payload);
    end(out, at)
}

/// A string attribute, NUL-terminated.
pub(super) fn put_strz(out: &mut Vec<u8>, ty: u16, s: &str) -> Result<(), SysError> {
    if s.as_bytes().contains(&0) {
        return Err(SysError::Nul(s.to_string()));
    }
    let at = start(out, ty);
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    end(out, at)
}

/// A 32-bit attribute in network byte order.
pub(super) fn put_be32(out: &mut Vec<u8>, ty: u16, v: u32) -> Result<(), SysError> {
    put(out, ty, &v.to_be_bytes())
}
