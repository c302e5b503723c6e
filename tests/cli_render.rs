//! The `kproxy render` command as a user runs it: exit codes, bad input, stdin, Lists.

use std::io::Write;
use std::process::{Command, Stdio};

fn kproxy(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kproxy");
    if let Some(input) = stdin {
        // kproxy may exit on bad flags before reading its input: a broken pipe is fine.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

const BAD: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 70000, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: shop}
spec:
  clusterIP: 10.96.0.300
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: badproto, namespace: shop}
spec:
  clusterIP: 10.96.0.22
  ports: [{name: http, port: 80, protocol: ICMP}]
---
apiVersion: v1
kind: Service
metadata: {name: dupports, namespace: shop}
spec:
  clusterIP: 10.96.0.23
  ports: [{name: a, port: 80}, {name: a, port: 81}]
---
apiVersion: v1
kind: Service
metadata: {name: notanumber, namespace: shop}
spec:
  clusterIP: 10.96.0.24
  ports: [{name: a, port: eighty}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan-1, namespace: shop}
addressType: IPv4
endpoints: [{addresses: [10.244.1.9]}]
ports: [{name: http, port: 8080}]
"#;

#[test]
fn renders_from_stdin() {
    let (code, out, err) = kproxy(&["render", "--snapshot", "-"], Some(GOOD));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("-A KUBE-SERVICES -m comment --comment \"shop/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.20 --dport 80 -j KUBE-SVC-"));
    assert!(out.contains("--to-destination 10.244.1.5:8080"));
}

#[test]
fn malformed_objects_are_skipped_with_one_warning_each() {
    let input = format!("{GOOD}{BAD}");
    let (code, out, err) = kproxy(&["render", "--snapshot", "-"], Some(&input));
    assert_eq!(code, 0, "{err}");
    // The good service still renders.
    assert!(out.contains("--to-destination 10.244.1.5:8080"), "{out}");
    for name in [
        "badport",
        "badip",
        "badproto",
        "dupports",
        "notanumber",
        "orphan-1",
    ] {
        let n = err
            .lines()
            .filter(|l| l.contains(&format!("shop/{name}")))
            .count();
        assert_eq!(n, 1, "one warning naming {name}:\n{err}");
        assert!(!out.contains(name), "{name} must not render");
    }
}

#[test]
fn unreadable_input_exits_2_with_one_line() {
    for (args, stdin) in [
        (
            vec!["render", "--snapshot", "/nonexistent/cluster.yaml"],
            None,
        ),
        (
            vec!["render", "--snapshot", "-"],
            Some("just: some\nyaml: true\n"),
        ),
        (vec!["render", "--snapshot", "-"], Some("{ not yaml")),
        (
            vec!["render", "--snapshot", "-", "--mode", "ipvs"],
            Some(GOOD),
        ),
        (
            vec!["render", "--snapshot", "-", "--ip-family", "ipv5"],
            Some(GOOD),
        ),
        (
            vec!["render", "--snapshot", "-", "--local-address", "nope"],
            Some(GOOD),
        ),
    ] {
        let (code, out, err) = kproxy(&args, stdin);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn kubectl_list_json_is_accepted() {
    let list = r#"{"apiVersion":"v1","kind":"List","items":[
      {"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"n"},
       "spec":{"clusterIP":"10.96.1.1","ports":[{"port":53,"protocol":"UDP","name":"dns"}]}},
      {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a-x","namespace":"n",
       "labels":{"kubernetes.io/service-name":"a"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["10.244.0.7"],"conditions":{"ready":true}}],
       "ports":[{"name":"dns","port":5353,"protocol":"UDP"}]}]}"#;
    let (code, out, err) = kproxy(&["render", "--snapshot", "-"], Some(list));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("-m udp -p udp -j DNAT --to-destination 10.244.0.7:5353"),
        "{out}"
    );
}
