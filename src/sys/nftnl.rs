//! libnftnl objects as Rust owners.
//!
//! Each wrapper owns one libnftnl object and frees it on drop, so an early return can
//! never leak one; ownership that moves into a parent (an expression into its rule, an
//! element into its set) is moved in Rust too. Every allocation is checked for NULL,
//! every string for NUL bytes, every length for its C type.
//!
//! libnftnl writes a message's attributes without knowing the buffer's size, so each
//! wrapper keeps an upper bound of what it will write (its `budget`: every attribute
//! it was given, with room for the attribute header, padding and nesting), and
//! [`NlMsg`] grows its buffer to that bound before libnftnl writes. The length libnftnl
//! reports is checked against the buffer afterwards, so a wrong bound is an error, not
//! a silently truncated message.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_void};
use std::ptr::NonNull;

use nftnl_sys as sys;

use super::SysError;

/// netlink + nfgenmsg header bytes.
const HEADER: usize = 20;
/// Room for one attribute besides its payload: its header, padding, and up to two
/// enclosing nests (generous: libnftnl's largest wrapping is three 4-byte headers).
const PER_ATTR: usize = 16;
/// Room for what an object writes besides the attributes it was given (its own list
/// and expression nests, the expression name).
const PER_OBJECT: usize = 96;

thread_local! {
    /// One scratch buffer per thread: libnftnl writes every byte of a message
    /// (headers, attributes, padding), so it need not be zeroed per message, which at
    /// 100k+ messages per sync is most of the encoding time. Stored as `u32` words so
    /// the netlink header in it is always 4-byte aligned.
    static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn cstring(s: &str) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError::Nul(s.to_string()))
}

fn c_len(what: &'static str, len: usize) -> Result<u32, SysError> {
    // Netlink attribute lengths are 16 bits; anything longer cannot be sent.
    if len > usize::from(u16::MAX) - PER_ATTR {
        return Err(SysError::TooLong { what, len });
    }
    Ok(len as u32)
}

/// One netlink message under construction.
pub(crate) struct NlMsg {
    words: Vec<u32>,
}

impl NlMsg {
    /// A message with its netlink and nfgenmsg headers written.
    pub(crate) fn new(ty: u16, family: u8, flags: u16, seq: u32) -> NlMsg {
        let mut words = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let mut m = NlMsg { words: Vec::new() };
        if words.len() < HEADER / 4 + 64 {
            words.resize(HEADER / 4 + 64, 0);
        }
        m.words = words;
        // SAFETY: the buffer holds more than the 20 header bytes libnftnl writes here,
        // and is 4-byte aligned as `nlmsghdr` needs.
        unsafe {
            sys::nftnl_nlmsg_build_hdr(
                m.words.as_mut_ptr() as *mut c_char,
                ty,
                u16::from(family),
                flags,
                seq,
            );
        }
        m
    }

    fn capacity(&self) -> usize {
        self.words.len() * 4
    }

    /// The length in the header (what has been written so far).
    fn len(&self) -> usize {
        self.words.first().map_or(0, |w| *w as usize)
    }

    /// Makes room for `more` bytes after what is written, then returns the header
    /// for libnftnl to append to.
    fn reserve(&mut self, more: usize) -> *mut libc::nlmsghdr {
        let need = (self.len() + more).div_ceil(4);
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
        self.words.as_mut_ptr() as *mut libc::nlmsghdr
    }

    /// Checks that libnftnl stayed inside the buffer.
    fn check(&self) -> Result<(), SysError> {
        if self.len() > self.capacity() {
            return Err(SysError::Overflow {
                len: self.len(),
                capacity: self.capacity(),
            });
        }
        Ok(())
    }

    /// The message's bytes (padded to 4, as netlink frames are).
    pub(crate) fn finish(self) -> Result<Vec<u8>, SysError> {
        let mut out = Vec::new();
        self.append_to(&mut out)?;
        Ok(out)
    }

    /// Appends the message's bytes (padded to 4) to `out`, e.g. a batch.
    pub(crate) fn append_to(self, out: &mut Vec<u8>) -> Result<(), SysError> {
        self.check()?;
        let words = self.len().div_ceil(4);
        // SAFETY: any initialized `u32`s are valid bytes; the slice covers `words`
        // whole words of the buffer (`check` made sure they are inside it).
        let bytes =
            unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, words * 4) };
        // The header's length stays the unpadded one, as libnftnl wrote it.
        out.extend_from_slice(bytes);
        SCRATCH.with(|s| *s.borrow_mut() = self.words);
        Ok(())
    }
}

macro_rules! object {
    (
        $(#[$doc:meta])* $name:ident, $raw:ty, $what:literal,
        alloc: $alloc:path, free: $free:path,
        set_str: $set_str:path, set_u32: $set_u32:path, set_data: $set_data:path,
        build: $build:path
    ) => {
        $(#[$doc])*
        pub(crate) struct $name {
            ptr: NonNull<$raw>,
            budget: usize,
        }

        impl $name {
            /// A fresh, empty object.
            pub(crate) fn new() -> Result<Self, SysError> {
                // SAFETY: plain allocation; NULL is checked below.
                let p = unsafe { $alloc() };
                let ptr = NonNull::new(p).ok_or(SysError::Alloc($what))?;
                Ok($name { ptr, budget: PER_OBJECT })
            }

            /// Sets a string attribute (libnftnl copies it).
            pub(crate) fn str(&mut self, attr: u32, s: &str) -> Result<&mut Self, SysError> {
                let c = cstring(s)?;
                self.budget += c_len($what, s.len() + 1)? as usize + PER_ATTR;
                // SAFETY: live object; `c` is a valid C string for the call's duration.
                let rc = unsafe { $set_str(self.ptr.as_ptr(), attr as u16, c.as_ptr()) };
                if rc < 0 {
                    return Err(SysError::Attribute { what: $what, attr: attr as u16 });
                }
                Ok(self)
            }

            /// Sets a 32-bit attribute.
            pub(crate) fn u32(&mut self, attr: u32, v: u32) -> &mut Self {
                self.budget += 4 + PER_ATTR;
                // SAFETY: live object; the attribute is a u32 one by its caller's choice.
                unsafe { $set_u32(self.ptr.as_ptr(), attr as u16, v) };
                self
            }

            /// Sets a binary attribute (libnftnl copies it).
            pub(crate) fn data(&mut self, attr: u32, d: &[u8]) -> Result<&mut Self, SysError> {
                let len = c_len($what, d.len())?;
                self.budget += d.len() + PER_ATTR;
                // SAFETY: live object; libnftnl copies `len` bytes from `d`.
                let rc = unsafe {
                    $set_data(self.ptr.as_ptr(), attr as u16, d.as_ptr() as *const c_void, len)
                };
                if rc < 0 {
                    return Err(SysError::Attribute { what: $what, attr: attr as u16 });
                }
                Ok(self)
            }

            /// Appends the object's attributes to `msg`.
            pub(crate) fn build(&self, msg: &mut NlMsg) -> Result<(), SysError> {
                let nlh = msg.reserve(self.budget);
                // SAFETY: `nlh` heads a buffer with room for `budget` more bytes, an
                // upper bound of what the object writes.
                unsafe { $build(nlh, self.ptr.as_ptr()) };
                msg.check()
            }

            // Read-back looks at chains, rules and sets; tables share the macro.
            #[allow(dead_code)]
            fn get_str(&self, attr: u32) -> Option<String> {
                // SAFETY: live object; a non-NULL result is a NUL-terminated string
                // owned by the object, copied before the object can change.
                unsafe {
                    let p = object!(@get_str $name)(self.ptr.as_ptr(), attr as u16);
                    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                }
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the object is owned here and freed once.
                unsafe { $free(self.ptr.as_ptr()) };
            }
        }
    };
    (@get_str Table) => { sys::nftnl_table_get_str };
    (@get_str Chain) => { sys::nftnl_chain_get_str };
    (@get_str Rule) => { sys::nftnl_rule_get_str };
    (@get_str Set) => { sys::nftnl_set_get_str };
}

object!(
    /// A table.
    Table, sys::nftnl_table, "a table",
    alloc: sys::nftnl_table_alloc, free: sys::nftnl_table_free,
    set_str: sys::nftnl_table_set_str, set_u32: sys::nftnl_table_set_u32,
    set_data: sys::nftnl_table_set_data, build: sys::nftnl_table_nlmsg_build_payload
);

object!(
    /// A chain.
    Chain, sys::nftnl_chain, "a chain",
    alloc: sys::nftnl_chain_alloc, free: sys::nftnl_chain_free,
    set_str: sys::nftnl_chain_set_str, set_u32: sys::nftnl_chain_set_u32,
    set_data: sys::nftnl_chain_set_data, build: sys::nftnl_chain_nlmsg_build_payload
);

object!(
    /// A rule.
    Rule, sys::nftnl_rule, "a rule",
    alloc: sys::nftnl_rule_alloc, free: sys::nftnl_rule_free,
    set_str: sys::nftnl_rule_set_str, set_u32: sys::nftnl_rule_set_u32,
    set_data: sys::nftnl_rule_set_data, build: sys::nftnl_rule_nlmsg_build_payload
);

object!(
    /// A set or map.
    Set, sys::nftnl_set, "a set",
    alloc: sys::nftnl_set_alloc, free: sys::nftnl_set_free,
    set_str: sys::nftnl_set_set_str, set_u32: sys::nftnl_set_set_u32,
    set_data: sys::nftnl_set_set_data, build: sys::nftnl_set_nlmsg_build_payload
);

/// Checks that `msg` is one whole netlink message (its header's length fits in it).
fn whole_message(msg: &[u8]) -> bool {
    msg.len() >= HEADER
        && u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize <= msg.len()
}

/// An owned, 4-byte aligned copy of a message for libnftnl's parsers.
fn aligned(msg: &[u8]) -> Vec<u32> {
    msg.chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect()
}

impl Chain {
    /// Parses a chain from a kernel message; `None` if libnftnl cannot.
    pub(crate) fn parse(msg: &[u8]) -> Option<Chain> {
        if !whole_message(msg) {
            return None;
        }
        let words = aligned(msg);
        let c = Chain::new().ok()?;
        // SAFETY: `words` holds one whole, aligned netlink message; `c` is live.
        let rc =
            unsafe { sys::nftnl_chain_nlmsg_parse(words.as_ptr() as *const _, c.ptr.as_ptr()) };
        (rc >= 0).then_some(c)
    }

    /// Its table and name.
    pub(crate) fn table_and_name(&self) -> Option<(String, String)> {
        Some((
            self.get_str(sys::NFTNL_CHAIN_TABLE)?,
            self.get_str(sys::NFTNL_CHAIN_NAME)?,
        ))
    }
}

impl Rule {
    /// Parses a rule from a kernel message; `None` if libnftnl cannot.
    pub(crate) fn parse(msg: &[u8]) -> Option<Rule> {
        if !whole_message(msg) {
            return None;
        }
        let words = aligned(msg);
        let r = Rule::new().ok()?;
        // SAFETY: `words` holds one whole, aligned netlink message; `r` is live.
        let rc = unsafe { sys::nftnl_rule_nlmsg_parse(words.as_ptr() as *const _, r.ptr.as_ptr()) };
        (rc >= 0).then_some(r)
    }

    /// Its table and chain.
    pub(crate) fn table_and_chain(&self) -> Option<(String, String)> {
        Some((
            self.get_str(sys::NFTNL_RULE_TABLE)?,
            self.get_str(sys::NFTNL_RULE_CHAIN)?,
        ))
    }

    /// Its user data (nft's comment TLVs), copied out.
    pub(crate) fn userdata(&self) -> Option<Vec<u8>> {
        let mut len = 0u32;
        // SAFETY: live rule; a non-NULL result points at `len` bytes the rule owns,
        // copied before the rule can change.
        unsafe {
            let p = sys::nftnl_rule_get_data(
                self.ptr.as_ptr(),
                sys::NFTNL_RULE_USERDATA as u16,
                &mut len,
            ) as *const u8;
            (!p.is_null()).then(|| std::slice::from_raw_parts(p, len as usize).to_vec())
        }
    }

    /// Appends an expression; the rule owns it from now on.
    pub(crate) fn add_expr(&mut self, e: Expr) {
        self.budget += e.budget;
        let raw = e.ptr.as_ptr();
        // Ownership moves to the rule, which frees it: `e` must not.
        std::mem::forget(e);
        // SAFETY: both objects are live; the rule takes the expression.
        unsafe { sys::nftnl_rule_add_expr(self.ptr.as_ptr(), raw) };
    }
}

impl Set {
    /// Sets a 64-bit attribute.
    pub(crate) fn u64(&mut self, attr: u32, v: u64) -> &mut Self {
        self.budget += 8 + PER_ATTR;
        // SAFETY: live object; the attribute is a u64 one.
        unsafe { sys::nftnl_set_set_u64(self.ptr.as_ptr(), attr as u16, v) };
        self
    }

    /// Adds an element; the set owns it from now on.
    pub(crate) fn add_elem(&mut self, e: SetElem) {
        self.budget += e.budget;
        let raw = e.ptr.as_ptr();
        // Ownership moves to the set, which frees it: `e` must not.
        std::mem::forget(e);
        // SAFETY: both objects are live; the set takes the element.
        unsafe { sys::nftnl_set_elem_add(self.ptr.as_ptr(), raw) };
    }

    /// Appends the set's elements (not its definition) to `msg`.
    pub(crate) fn build_elems(&self, msg: &mut NlMsg) -> Result<(), SysError> {
        let nlh = msg.reserve(self.budget);
        // SAFETY: as in `build`: room for `budget` more bytes.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, self.ptr.as_ptr()) };
        msg.check()
    }

    /// Parses a set definition from a kernel message.
    pub(crate) fn parse(msg: &[u8]) -> Option<Set> {
        if !whole_message(msg) {
            return None;
        }
        let words = aligned(msg);
        let s = Set::new().ok()?;
        // SAFETY: one whole, aligned message; `s` is live.
        let rc = unsafe { sys::nftnl_set_nlmsg_parse(words.as_ptr() as *const _, s.ptr.as_ptr()) };
        (rc >= 0).then_some(s)
    }

    /// Parses a set's elements from a kernel message.
    pub(crate) fn parse_elems(msg: &[u8]) -> Option<Set> {
        if !whole_message(msg) {
            return None;
        }
        let words = aligned(msg);
        let s = Set::new().ok()?;
        // SAFETY: one whole, aligned message; `s` is live.
        let rc =
            unsafe { sys::nftnl_set_elems_nlmsg_parse(words.as_ptr() as *const _, s.ptr.as_ptr()) };
        (rc >= 0).then_some(s)
    }

    /// Its name.
    pub(crate) fn name(&self) -> Option<String> {
        self.get_str(sys::NFTNL_SET_NAME)
    }

    /// Its default element timeout in milliseconds, when it has one.
    pub(crate) fn timeout_ms(&self) -> Option<u64> {
        let attr = sys::NFTNL_SET_TIMEOUT as u16;
        // SAFETY: live object; the attribute is read only when set, and it is a u64.
        unsafe {
            sys::nftnl_set_is_set(self.ptr.as_ptr(), attr)
                .then(|| sys::nftnl_set_get_u64(self.ptr.as_ptr(), attr))
        }
    }

    /// Its elements, copied out.
    pub(crate) fn elems(&self) -> Vec<ElemView> {
        let mut out = Vec::new();
        // SAFETY: the iterator walks elements owned by the live set and is destroyed
        // before returning; every element is read (and copied) while both live.
        unsafe {
            let it = sys::nftnl_set_elems_iter_create(self.ptr.as_ptr());
            if it.is_null() {
                return out;
            }
            loop {
                let e = sys::nftnl_set_elems_iter_next(it);
                if e.is_null() {
                    break;
                }
                // A binary attribute, copied out (None when the element has none).
                let bytes = |attr: u32| {
                    let mut len = 0u32;
                    let p = sys::nftnl_set_elem_get(e, attr as u16, &mut len) as *const u8;
                    (!p.is_null()).then(|| std::slice::from_raw_parts(p, len as usize).to_vec())
                };
                let key = bytes(sys::NFTNL_SET_ELEM_KEY);
                let key_end = bytes(sys::NFTNL_SET_ELEM_KEY_END);
                let data = bytes(sys::NFTNL_SET_ELEM_DATA);
                // Not `nftnl_set_elem_get_u32`: it dereferences the attribute without
                // checking that the element has one (set elements have no verdict).
                let mut vlen = 0u32;
                let vp = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_VERDICT as u16, &mut vlen);
                let verdict = (!vp.is_null() && vlen >= 4)
                    .then(|| std::ptr::read_unaligned(vp as *const i32));
                let cp = sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16);
                let chain =
                    (!cp.is_null()).then(|| CStr::from_ptr(cp).to_string_lossy().into_owned());
                out.push(ElemView {
                    key,
                    key_end,
                    data,
                    verdict,
                    chain,
                });
            }
            sys::nftnl_set_elems_iter_destroy(it);
        }
        out
    }
}

/// One element of a parsed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ElemView {
    /// The key bytes, if it has a key.
    pub(crate) key: Option<Vec<u8>>,
    /// The last key of an interval (concatenated interval sets).
    pub(crate) key_end: Option<Vec<u8>>,
    /// A data-map value (`addr . port` of an endpoint).
    pub(crate) data: Option<Vec<u8>>,
    /// The verdict code (map elements).
    pub(crate) verdict: Option<i32>,
    /// The verdict's chain (jump/goto).
    pub(crate) chain: Option<String>,
}

/// An expression, until it is added to a rule.
pub(crate) struct Expr {
    ptr: NonNull<sys::nftnl_expr>,
    budget: usize,
}

impl Expr {
    /// A fresh expression of kind `name` (`payload`, `cmp`, …).
    pub(crate) fn new(name: &str) -> Result<Expr, SysError> {
        let n = cstring(name)?;
        // SAFETY: `n` is a valid C string; libnftnl copies what it needs. An unknown
        // name yields NULL, checked below.
        let p = unsafe { sys::nftnl_expr_alloc(n.as_ptr()) };
        let ptr = NonNull::new(p).ok_or(SysError::Alloc("an expression"))?;
        Ok(Expr {
            ptr,
            budget: PER_OBJECT + name.len(),
        })
    }

    /// Sets a 32-bit attribute.
    pub(crate) fn u32(mut self, attr: u32, v: u32) -> Self {
        self.budget += 4 + PER_ATTR;
        // SAFETY: live expression; the attribute is a u32 one.
        unsafe { sys::nftnl_expr_set_u32(self.ptr.as_ptr(), attr as u16, v) };
        self
    }

    /// Sets an 8-bit attribute.
    pub(crate) fn u8(mut self, attr: u32, v: u8) -> Self {
        self.budget += 4 + PER_ATTR;
        // SAFETY: as above, for a u8 attribute.
        unsafe { sys::nftnl_expr_set_u8(self.ptr.as_ptr(), attr as u16, v) };
        self
    }

    /// Sets a 64-bit attribute.
    pub(crate) fn u64(mut self, attr: u32, v: u64) -> Self {
        self.budget += 8 + PER_ATTR;
        // SAFETY: as above, for a u64 attribute.
        unsafe { sys::nftnl_expr_set_u64(self.ptr.as_ptr(), attr as u16, v) };
        self
    }

    /// Sets a binary attribute (libnftnl copies it).
    pub(crate) fn data(mut self, attr: u32, d: &[u8]) -> Result<Self, SysError> {
        let len = c_len("an expression", d.len())?;
        self.budget += d.len() + PER_ATTR;
        // SAFETY: libnftnl copies `len` bytes from `d`.
        let rc = unsafe {
            sys::nftnl_expr_set(
                self.ptr.as_ptr(),
                attr as u16,
                d.as_ptr() as *const c_void,
                len,
            )
        };
        if rc < 0 {
            return Err(SysError::Attribute {
                what: "an expression",
                attr: attr as u16,
            });
        }
        Ok(self)
    }

    /// Sets a string attribute (libnftnl copies it).
    pub(crate) fn str(mut self, attr: u32, s: &str) -> Result<Self, SysError> {
        let c = cstring(s)?;
        self.budget += c_len("an expression", s.len() + 1)? as usize + PER_ATTR;
        // SAFETY: `c` is a valid C string; libnftnl duplicates it.
        let rc = unsafe { sys::nftnl_expr_set_str(self.ptr.as_ptr(), attr as u16, c.as_ptr()) };
        if rc < 0 {
            return Err(SysError::Attribute {
                what: "an expression",
                attr: attr as u16,
            });
        }
        Ok(self)
    }
}

impl Drop for Expr {
    fn drop(&mut self) {
        // SAFETY: an expression still owned here was never handed to a rule.
        unsafe { sys::nftnl_expr_free(self.ptr.as_ptr()) };
    }
}

/// A set element, until it is added to a set.
pub(crate) struct SetElem {
    ptr: NonNull<sys::nftnl_set_elem>,
    budget: usize,
}

impl SetElem {
    /// A fresh element.
    pub(crate) fn new() -> Result<SetElem, SysError> {
        // SAFETY: plain allocation; NULL is checked below.
        let p = unsafe { sys::nftnl_set_elem_alloc() };
        let ptr = NonNull::new(p).ok_or(SysError::Alloc("a set element"))?;
        Ok(SetElem {
            ptr,
            budget: PER_OBJECT,
        })
    }

    /// Sets a binary attribute (libnftnl copies it).
    pub(crate) fn data(&mut self, attr: u32, d: &[u8]) -> Result<&mut Self, SysError> {
        let len = c_len("a set element", d.len())?;
        self.budget += d.len() + PER_ATTR;
        // SAFETY: libnftnl copies `len` bytes from `d`.
        let rc = unsafe {
            sys::nftnl_set_elem_set(
                self.ptr.as_ptr(),
                attr as u16,
                d.as_ptr() as *const c_void,
                len,
            )
        };
        if rc < 0 {
            return Err(SysError::Attribute {
                what: "a set element",
                attr: attr as u16,
            });
        }
        Ok(self)
    }

    /// Sets a 32-bit attribute.
    pub(crate) fn u32(&mut self, attr: u32, v: u32) -> &mut Self {
        self.budget += 4 + PER_ATTR;
        // SAFETY: live element; the attribute is a u32 one.
        unsafe { sys::nftnl_set_elem_set_u32(self.ptr.as_ptr(), attr as u16, v) };
        self
    }

    /// Sets a string attribute (libnftnl copies it).
    pub(crate) fn str(&mut self, attr: u32, s: &str) -> Result<&mut Self, SysError> {
        let c = cstring(s)?;
        self.budget += c_len("a set element", s.len() + 1)? as usize + PER_ATTR;
        // SAFETY: `c` is a valid C string; libnftnl duplicates it.
        let rc = unsafe { sys::nftnl_set_elem_set_str(self.ptr.as_ptr(), attr as u16, c.as_ptr()) };
        if rc < 0 {
            return Err(SysError::Attribute {
                what: "a set element",
                attr: attr as u16,
            });
        }
        Ok(self)
    }
}

impl Drop for SetElem {
    fn drop(&mut self) {
        // SAFETY: an element still owned here was never handed to a set.
        unsafe { sys::nftnl_set_elem_free(self.ptr.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_grows_to_fit_and_reports_its_length() {
        let mut t = Table::new().unwrap();
        let long = "x".repeat(3000);
        t.str(sys::NFTNL_TABLE_NAME, &long).unwrap();
        let mut m = NlMsg::new(0, 2, 0, 7);
        t.build(&mut m).unwrap();
        let bytes = m.finish().unwrap();
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert!(len > 3000, "the whole name is in the message ({len})");
        assert_eq!(bytes.len(), len.div_ceil(4) * 4);
        assert_eq!(
            u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            7
        );
    }

    #[test]
    fn bad_input_is_refused_not_truncated() {
        let mut t = Table::new().unwrap();
        assert!(matches!(
            t.str(sys::NFTNL_TABLE_NAME, "a\0b"),
            Err(SysError::Nul(_))
        ));
        assert!(matches!(
            Expr::new("no-such-expression"),
            Err(SysError::Alloc(_))
        ));
        let mut e = SetElem::new().unwrap();
        assert!(matches!(
            e.data(sys::NFTNL_SET_ELEM_KEY, &vec![0; 70_000]),
            Err(SysError::TooLong { .. })
        ));
    }

    #[test]
    fn a_chain_round_trips_through_its_message() {
        let mut c = Chain::new().unwrap();
        c.str(sys::NFTNL_CHAIN_TABLE, "kube-proxy").unwrap();
        c.str(sys::NFTNL_CHAIN_NAME, "services").unwrap();
        let mut m = NlMsg::new(3, 2, 0, 1);
        c.build(&mut m).unwrap();
        let bytes = m.finish().unwrap();
        let parsed = Chain::parse(&bytes).unwrap();
        assert_eq!(
            parsed.table_and_name(),
            Some(("kube-proxy".into(), "services".into()))
        );
        assert!(
            Chain::parse(&bytes[..10]).is_none(),
            "a short message is refused"
        );
    }
}
