//! iptables mode: hashed chain names, the restore-text renderer, its normalizer, and
//! the applier (the only part that runs iptables).

pub mod apply;
pub mod chunk;
pub mod dataplane;
pub mod names;
pub mod normalize;
pub mod render;
