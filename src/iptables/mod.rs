//! iptables mode: hashed chain names, the restore-text renderer, its normalizer.

pub mod names;
pub mod normalize;
pub mod render;
