use super::parse::tokenize;
use super::*;
use crate::trace::core::Outcome;

const TABLE: &str = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy services
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy service-X
add chain ip kube-proxy endpoint-A
add chain ip kube-proxy endpoint-B
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy service-X ip daddr 172.30.0.1 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-X numgen random mod 2 vmap { 0 : goto endpoint-A , 1 : goto endpoint-B }
add rule ip kube-proxy endpoint-A meta l4proto tcp dnat to 10.1.0.1:80
add rule ip kube-proxy endpoint-B meta l4proto tcp dnat to 10.1.0.2:80
add element ip kube-proxy service-ips { 172.30.0.1 . tcp . 80 : goto service-X }
"#;

fn pkt(src: &str) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: "172.30.0.1".parse().unwrap(),
        dport: 80,
        proto: "tcp".into(),
        from_node: false,
    }
}

#[test]
fn vmap_numgen_and_masquerade() {
    let t = Table::parse(TABLE).unwrap();
    let tr = t.trace(&pkt("10.0.0.9"), &[]);
    assert_eq!(tr.output(), "10.1.0.1:80, 10.1.0.2:80");
    assert!(!tr.masquerade);
    assert_eq!(tr.endpoints[0].probability, 0.5);
    let tr = t.trace(&pkt("192.168.9.9"), &[]);
    assert!(tr.masquerade);
}

#[test]
fn elements_parse_with_comments() {
    let e = parse_elements(
        &tokenize(r#"{ 172.30.0.046 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }"#)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        e,
        vec![Element {
            key: "172.30.0.46 . tcp . 80".to_string(),
            value: Some("goto reject-chain".to_string()),
            comment: Some("ns6/svc6:p80".into()),
        }]
    );
}

fn with(extra: &str) -> String {
    format!("{TABLE}{extra}\n")
}

#[test]
fn malformed_tables() {
    for (text, want) in [
        (with("add rule ip"), "truncated"),
        (with("add rule ip kube-proxy"), "truncated"),
        (with("add rule ip kube-proxy service-X"), "needs statements"),
        (
            with("add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto x"),
            "not closed",
        ),
        (
            with("add rule ip kube-proxy x comment \"open"),
            "unterminated quote",
        ),
        (
            "table ip kube-proxy {\n chain x {\n".to_string(),
            "truncated",
        ),
    ] {
        let e = Table::parse(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn undecidable_paths_are_explicit() {
    // An unknown statement in an endpoint chain: an explicit unknown step.
    let t = Table::parse(&with(
        "insert rule ip kube-proxy endpoint-B frobnicate 7 dnat to 10.1.0.9:80",
    ))
    .unwrap();
    let tr = t.trace(&pkt("10.0.0.9"), &[]);
    assert_eq!(tr.unknown_steps().count(), 1);
    // A loop ends the trace as unknown.
    let t = Table::parse(&with("insert rule ip kube-proxy endpoint-A jump services")).unwrap();
    let tr = t.trace(&pkt("10.0.0.9"), &[]);
    assert!(matches!(tr.outcome(), Outcome::Unknown { reason } if reason.contains("loop")));
    // A bad DNAT target ends it as unknown, never as an endpoint.
    let t = Table::parse(&with(
        "insert rule ip kube-proxy endpoint-A dnat to 999.1.1.1:99999",
    ))
    .unwrap();
    let tr = t.trace(&pkt("10.0.0.9"), &[]);
    assert!(
        matches!(tr.outcome(), Outcome::Unknown { .. }),
        "{:?}",
        tr.outcome()
    );
    // numgen with fewer branches than its modulus.
    let t = Table::parse(&with(
        "insert rule ip kube-proxy service-X numgen random mod 3 vmap { 0 : goto endpoint-A }",
    ))
    .unwrap();
    let tr = t.trace(&pkt("10.0.0.9"), &[]);
    assert!(matches!(tr.outcome(), Outcome::Unknown { .. }));
}
