//! The API server's validation rules for the fields kproxy writes into rules.
//!
//! Every string that reaches a renderer (namespaces, Service names, port names) passes
//! one of these checks first, so that no object can smuggle a newline, a quote or a
//! brace into `iptables-restore` input or an nftables batch. The rules are the API
//! server's own (apimachinery's `IsDNS1123Label`, `IsDNS1035Label`,
//! `IsDNS1123Subdomain`, `IsValidPortName`, `IsValidLabelValue`), so a real cluster's
//! objects always pass and only hand-made or corrupted input is refused.

use std::fmt::Write as _;

/// Longest DNS-1123 / DNS-1035 label.
pub(crate) const LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain.
pub(crate) const SUBDOMAIN_MAX: usize = 253;
/// Longest IANA service name (port name).
pub(crate) const PORT_NAME_MAX: usize = 15;
/// Longest ClientIP affinity timeout the API server accepts (one day).
pub(crate) const AFFINITY_TIMEOUT_MAX: i32 = 86_400;

/// How much of a refused value a message quotes: enough to recognise it, never the
/// whole of a 10 MB string.
const SHOWN_MAX: usize = 64;

/// A refused value, escaped (`{:?}`) and cut to a readable length, for log messages.
pub fn shown(s: &str) -> String {
    if s.chars().count() <= SHOWN_MAX {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(SHOWN_MAX).collect();
    let mut out = format!("{head:?}");
    let _ = write!(out, "… ({} bytes)", s.len());
    out
}

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` without the length limit.
fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) => {
            lower_alnum(f) && lower_alnum(l) && b.iter().all(|&c| lower_alnum(c) || c == b'-')
        }
        _ => false,
    }
}

/// A DNS-1123 label (namespaces): at most 63 of `a-z`, `0-9`, `-`, alphanumeric at both ends.
pub(crate) fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > LABEL_MAX {
        return Err(format!("{} is longer than {LABEL_MAX} bytes", shown(s)));
    }
    if !label_chars(s) {
        return Err(format!(
            "{} is not a DNS-1123 label (lower-case letters, digits and '-', alphanumeric at both ends)",
            shown(s)
        ));
    }
    Ok(())
}

/// A DNS-1035 label (Service names): a DNS-1123 label that starts with a letter.
pub(crate) fn dns1035_label(s: &str) -> Result<(), String> {
    dns1123_label(s)?;
    if !s.as_bytes().first().is_some_and(u8::is_ascii_lowercase) {
        return Err(format!(
            "{} is not a DNS-1035 label (must start with a letter)",
            shown(s)
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain (EndpointSlice, Node and ServiceCIDR names): dot-separated
/// labels, at most 253 bytes.
pub(crate) fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > SUBDOMAIN_MAX {
        return Err(format!("{} is longer than {SUBDOMAIN_MAX} bytes", shown(s)));
    }
    if !s.split('.').all(label_chars) {
        return Err(format!(
            "{} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')",
            shown(s)
        ));
    }
    Ok(())
}

/// An IANA service name, as the API server checks port names: at most 15 of `a-z`,
/// `0-9`, `-`, at least one letter, no `-` at either end and no `--`. Empty is allowed
/// (an unnamed port).
pub fn port_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let b = s.as_bytes();
    let problem = if s.len() > PORT_NAME_MAX {
        Some("longer than 15 bytes")
    } else if !b.iter().all(|&c| lower_alnum(c) || c == b'-') {
        Some("only lower-case letters, digits and '-' are allowed")
    } else if !b.iter().any(u8::is_ascii_lowercase) {
        Some("must contain a letter")
    } else if b.first() == Some(&b'-') || b.last() == Some(&b'-') {
        Some("must not start or end with '-'")
    } else if s.contains("--") {
        Some("must not contain '--'")
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!("port name {}: {p}", shown(s))),
        None => Ok(()),
    }
}

/// A label value (the `kubernetes.io/service-name` label, zone names): at most 63 of
/// alphanumerics, `-`, `_`, `.`, alphanumeric at both ends; empty is allowed.
pub(crate) fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let b = s.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
    if s.len() > LABEL_MAX
        || !edge(b.first())
        || !edge(b.last())
        || !b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(format!("{} is not a valid label value", shown(s)));
    }
    Ok(())
}

/// A ClientIP affinity timeout: 1 to 86400 seconds, as the API server requires.
pub fn affinity_timeout(t: i32) -> Result<u32, String> {
    if (1..=AFFINITY_TIMEOUT_MAX).contains(&t) {
        // In range 1..=86400, so the conversion cannot fail; fall back to an error anyway.
        u32::try_from(t).map_err(|_| format!("session affinity timeout {t}"))
    } else {
        Err(format!(
            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1-{AFFINITY_TIMEOUT_MAX}"
        ))
    }
}

/// Checks an optional enum field against the values the API server accepts.
pub(crate) fn one_of(field: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), String> {
    match value {
        None | Some("") => Ok(()),
        Some(v) if allowed.contains(&v) => Ok(()),
        Some(v) => Err(format!(
            "{field} {}: not one of {}",
            shown(v),
            allowed.join(", ")
        )),
    }
}

/// Re-checks a converted Service before it is derived into ports: a Service inserted
/// without going through `from_k8s` (tests, generators, future callers) must not reach
/// a renderer with a name that is unsafe in its output either.
pub(crate) fn renderable(svc: &super::Service) -> Result<(), String> {
    dns1123_label(&svc.key.namespace).map_err(|m| format!("namespace {m}"))?;
    dns1035_label(&svc.key.name).map_err(|m| format!("name {m}"))?;
    for p in &svc.ports {
        port_name(&p.name)?;
    }
    if let Some(t) = svc.affinity_timeout {
        affinity_timeout(i32::try_from(t).unwrap_or(i32::MAX))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "ns-1", "0abc", &"a".repeat(63)] {
            assert!(dns1123_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a b",
            "a\nb",
            "a\"",
            "a}",
            "a.b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(dns1123_label(bad).is_err(), "{bad:?}");
        }
        assert!(dns1035_label("svc1").is_ok());
        assert!(dns1035_label("1svc").is_err());
    }

    #[test]
    fn subdomains() {
        assert!(dns1123_subdomain("svc-abc12.x").is_ok());
        assert!(dns1123_subdomain(&format!("{0}.{0}.{0}", "a".repeat(63))).is_ok());
        for bad in ["", "a..b", ".a", "a.", "A.b", "a_b", &"a".repeat(254)] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_names() {
        for ok in ["", "http", "p80", "dns-tcp", "a", &"a".repeat(15)] {
            assert!(port_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "80",
            "-http",
            "http-",
            "a--b",
            "HTTP",
            "a\"b",
            "a}b",
            "a\nb",
            "a\0b",
            &"a".repeat(16),
        ] {
            assert!(port_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_values() {
        for ok in ["", "svc", "Svc_1.x", &"a".repeat(63)] {
            assert!(label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "a\n", &"a".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn affinity_timeouts() {
        assert_eq!(affinity_timeout(1), Ok(1));
        assert_eq!(affinity_timeout(86_400), Ok(86_400));
        for bad in [0, -1, 86_401, i32::MAX] {
            assert!(affinity_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shown_is_bounded_and_escaped() {
        let long = "x".repeat(10 << 20);
        assert!(shown(&long).len() < 100);
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn enums() {
        assert!(one_of("f", None, &["A"]).is_ok());
        assert!(one_of("f", Some(""), &["A"]).is_ok());
        assert!(one_of("f", Some("A"), &["A"]).is_ok());
        assert!(one_of("f", Some("a"), &["A"]).is_err());
    }
}
