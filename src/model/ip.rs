//! "Sloppy" IP and CIDR parsing as upstream does it: IPv4 octets with leading zeros are
//! read as decimal (`172.30.0.041` is `172.30.0.41`), and CIDRs lose their host bits.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Parses an IP address, accepting zero-padded IPv4 octets as decimal.
pub(crate) fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // std rejects leading zeros (they would be octal in some libcs); Go's sloppy parser
    // reads them as decimal, and Services in the wild carry such addresses.
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (slot, part) in octets.iter_mut().zip(parts) {
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse::<u8>().ok()?;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses a CIDR sloppily (surrounding whitespace trimmed, zero-padded octets and prefix
/// accepted) and masks off the host bits.
pub(crate) fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, len) = s.split_once('/')?;
    let ip = parse_ip_sloppy(addr)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ipv4() {
        assert_eq!(
            parse_ip_sloppy("172.30.0.041"),
            Some("172.30.0.41".parse().unwrap())
        );
        assert_eq!(
            parse_ip_sloppy("10.180.00.001"),
            Some("10.180.0.1".parse().unwrap())
        );
        assert_eq!(parse_ip_sloppy("1.2.3.256"), None);
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("nope"), None);
        assert_eq!(
            parse_ip_sloppy("FD00::0001"),
            Some("fd00::1".parse().unwrap())
        );
    }

    #[test]
    fn sloppy_cidr() {
        assert_eq!(
            parse_cidr_sloppy(" 203.0.113.000/025"),
            Some("203.0.113.0/25".parse().unwrap())
        );
        assert_eq!(
            parse_cidr_sloppy("1.2.3.4/28"),
            Some("1.2.3.0/28".parse().unwrap())
        );
        assert_eq!(parse_cidr_sloppy("1.2.3.4/33"), None);
        assert_eq!(parse_cidr_sloppy("1.2.3.4"), None);
    }
}
