//! kproxy: a Rust replacement for Kubernetes' kube-proxy.
