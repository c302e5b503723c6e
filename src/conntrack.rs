//! Stale UDP/SCTP conntrack cleanup over netlink (ctnetlink), after every successful
//! apply: a datagram flow keeps going to the endpoint its conntrack entry names, even
//! after that endpoint left the service, until the entry is deleted.
//!
//! The decision is pure ([`stale_flows`]): a flow to a service IP:port (cluster IP,
//! external IP, LB VIP) or NodePort is stale when its reply source is not a serving
//! endpoint of that service port. That also covers a service going to zero endpoints
//! (nothing serves) and 0 -> N (entries created while the service rejected have the
//! service IP itself as reply source). The netlink part only lists and deletes.

#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::model::{IpFamily, Protocol, ProxyState};
use crate::sys::socket::NetlinkSocket;

/// One conntrack entry, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// L4 protocol number.
    pub proto: u8,
    /// Original direction source.
    pub(crate) orig_src: IpAddr,
    /// Original direction destination (the service address).
    pub(crate) orig_dst: IpAddr,
    /// Original source port.
    pub(crate) orig_sport: u16,
    /// Original destination port (the service port or NodePort).
    pub(crate) orig_dport: u16,
    /// Reply direction source (the endpoint, after DNAT).
    pub(crate) reply_src: IpAddr,
}

/// The flows to delete, given the current rules' state.
pub(crate) fn stale_flows(flows: &[Flow], state: &ProxyState) -> Vec<Flow> {
    let mut by_dest: HashMap<(IpAddr, u8, u16), HashSet<IpAddr>> = HashMap::new();
    let mut by_nodeport: HashMap<(u8, u16), HashSet<IpAddr>> = HashMap::new();
    for p in &state.ports {
        let proto = p.svc.name.protocol;
        if proto == Protocol::Tcp {
            continue;
        }
        let serving: HashSet<IpAddr> = p
            .endpoints
            .iter()
            .filter(|e| e.serving)
            .map(|e| e.ip)
            .collect();
        let n = proto.number();
        for ip in std::iter::once(&p.svc.cluster_ip)
            .chain(p.svc.external_ips.iter())
            .chain(p.svc.lb_ips.iter())
        {
            by_dest
                .entry((*ip, n, p.svc.port))
                .or_default()
                .extend(serving.iter().copied());
        }
        if p.svc.node_port != 0 {
            by_nodeport
                .entry((n, p.svc.node_port))
                .or_default()
                .extend(serving.iter().copied());
        }
    }
    flows
        .iter()
        .filter(|f| {
            if let Some(serving) = by_dest.get(&(f.orig_dst, f.proto, f.orig_dport)) {
                return !serving.contains(&f.reply_src);
            }
            if let Some(serving) = by_nodeport.get(&(f.proto, f.orig_dport)) {
                // Only flows that were (or should have been) DNATed by the NodePort:
                // the reply then comes from an endpoint, or from the node itself when
                // nothing was there.
                return !serving.contains(&f.reply_src);
            }
            false
        })
        .cloned()
        .collect()
}

/// A conntrack netlink failure.
#[derive(Debug, thiserror::Error)]
#[error("conntrack {what}: {source}")]
pub struct ConntrackError {
    what: &'static str,
    source: std::io::Error,
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        let adv = len.div_ceil(4) * 4;
        b = &b[adv.min(b.len())..];
    }
    out
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = (4 + data.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

fn nested(ty: u16, inner: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_attr(&mut b, ty | NLA_F_NESTED, inner);
    b
}

struct Tuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: u8,
    sport: u16,
    dport: u16,
}

fn parse_tuple(b: &[u8]) -> Tuple {
    let mut t = Tuple {
        src: None,
        dst: None,
        proto: 0,
        sport: 0,
        dport: 0,
    };
    for (ty, v) in attrs(b) {
        match ty {
            CTA_TUPLE_IP => {
                for (k, a) in attrs(v) {
                    let ip = match a.len() {
                        4 => <[u8; 4]>::try_from(a).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(a).ok().map(IpAddr::from),
                        _ => None,
                    };
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => t.src = ip,
                        CTA_IP_V4_DST | CTA_IP_V6_DST => t.dst = ip,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a) in attrs(v) {
                    match (k, a.len()) {
                        (CTA_PROTO_NUM, 1) => t.proto = a[0],
                        (CTA_PROTO_SRC_PORT, 2) => t.sport = u16::from_be_bytes([a[0], a[1]]),
                        (CTA_PROTO_DST_PORT, 2) => t.dport = u16::from_be_bytes([a[0], a[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

fn header(ty: u16, flags: u16, seq: u32, family: u8, payload_len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + payload_len);
    m.extend_from_slice(&((20 + payload_len) as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0);
    m.extend_from_slice(&0u16.to_be_bytes());
    m
}

fn af(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => libc::AF_INET as u8,
        IpFamily::V6 => libc::AF_INET6 as u8,
    }
}

/// Opens a netfilter socket for one request.
fn open() -> Result<NetlinkSocket, ConntrackError> {
    NetlinkSocket::open(1 << 16).map_err(|source| ConntrackError {
        what: "open socket",
        source,
    })
}

/// Sends one request and reads its reply, handing each data payload to `f`; the
/// kernel's error, if it sent one, is the result.
fn request(
    sock: &mut NetlinkSocket,
    build: impl FnOnce(u32) -> Vec<u8>,
    what: &'static str,
    mut f: impl FnMut(&[u8]),
) -> Result<(), ConntrackError> {
    let seq = sock.take_seqs(1);
    sock.send(&build(seq))
        .map_err(|source| ConntrackError { what, source })?;
    sock.recv_reply(seq, |frame| f(frame.payload))
        .map_err(|source| ConntrackError {
            what: "receive",
            source,
        })?
        .map_err(|errno| ConntrackError {
            what: "request",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Lists the family's conntrack entries.
pub fn list(family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
    let mut sock = open()?;
    let mut flows = Vec::new();
    let dump = |seq| header(IPCTNL_MSG_CT_GET, NLM_F_DUMP, seq, af(family), 0);
    request(&mut sock, dump, "send dump", |payload| {
        // nfgenmsg (4 bytes), then attributes.
        let Some(body) = payload.get(4..) else { return };
        let mut orig = None;
        let mut reply = None;
        for (ty, v) in attrs(body) {
            match ty {
                CTA_TUPLE_ORIG => orig = Some(parse_tuple(v)),
                CTA_TUPLE_REPLY => reply = Some(parse_tuple(v)),
                _ => {}
            }
        }
        if let (Some(o), Some(r)) = (orig, reply) {
            if let (Some(os), Some(od), Some(rs)) = (o.src, o.dst, r.src) {
                flows.push(Flow {
                    proto: o.proto,
                    orig_src: os,
                    orig_dst: od,
                    orig_sport: o.sport,
                    orig_dport: o.dport,
                    reply_src: rs,
                });
            }
        }
    })?;
    Ok(flows)
}

/// Deletes one entry by its original tuple; an entry already gone is fine.
pub fn delete(flow: &Flow) -> Result<(), ConntrackError> {
    let mut sock = open()?;
    let (family, src_ty, dst_ty) = match flow.orig_src {
        IpAddr::V4(_) => (IpFamily::V4, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        IpAddr::V6(_) => (IpFamily::V6, CTA_IP_V6_SRC, CTA_IP_V6_DST),
    };
    let bytes = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut ip = Vec::new();
    put_attr(&mut ip, src_ty, &bytes(&flow.orig_src));
    put_attr(&mut ip, dst_ty, &bytes(&flow.orig_dst));
    let mut proto = Vec::new();
    put_attr(&mut proto, CTA_PROTO_NUM, &[flow.proto]);
    put_attr(
        &mut proto,
        CTA_PROTO_SRC_PORT,
        &flow.orig_sport.to_be_bytes(),
    );
    put_attr(
        &mut proto,
        CTA_PROTO_DST_PORT,
        &flow.orig_dport.to_be_bytes(),
    );
    let mut tuple = nested(CTA_TUPLE_IP, &ip);
    tuple.extend(nested(CTA_TUPLE_PROTO, &proto));
    let body = nested(CTA_TUPLE_ORIG, &tuple);
    let build = |seq| {
        let mut req = header(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, seq, af(family), body.len());
        req.extend_from_slice(&body);
        req
    };
    match request(&mut sock, build, "send delete", |_| {}) {
        Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Lists, decides and deletes; returns how many entries were deleted.
pub(crate) fn reconcile(state: &ProxyState) -> Result<usize, ConntrackError> {
    let flows = list(state.family)?;
    let stale = stale_flows(&flows, state);
    for f in &stale {
        delete(f)?;
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterState, NodeContext};

    fn state(endpoints: &[&str]) -> ProxyState {
        let eps: String = endpoints
            .iter()
            .map(|ip| format!("  - addresses: [{ip}]\n"))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: k}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, namespace: k, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nendpoints:\n{}ports: [{{name: dns, port: 53, protocol: UDP}}]\n",
            if eps.is_empty() { "  []\n".to_string() } else { eps }
        );
        let snap = crate::snapshot::load_str(&yaml, "t").unwrap();
        let st: ClusterState = snap.state;
        st.proxy_state(IpFamily::V4, &NodeContext::default())
    }

    fn flow(dst: &str, dport: u16, reply: &str) -> Flow {
        Flow {
            proto: 17,
            orig_src: "10.244.1.9".parse().unwrap(),
            orig_dst: dst.parse().unwrap(),
            orig_sport: 40000,
            orig_dport: dport,
            reply_src: reply.parse().unwrap(),
        }
    }

    #[test]
    fn removed_endpoint_flows_are_stale() {
        let st = state(&["10.244.0.2"]);
        let flows = vec![
            flow("10.96.0.10", 53, "10.244.0.2"),
            flow("10.96.0.10", 53, "10.244.0.3"),
            flow("10.96.0.10", 54, "10.244.0.3"),
            flow("172.18.0.2", 30053, "10.244.0.9"),
        ];
        let stale = stale_flows(&flows, &st);
        assert_eq!(stale, vec![flows[1].clone(), flows[3].clone()]);
    }

    #[test]
    fn zero_endpoints_and_back() {
        // N -> 0: every flow to the service is stale.
        let st = state(&[]);
        assert_eq!(
            stale_flows(&[flow("10.96.0.10", 53, "10.244.0.2")], &st).len(),
            1
        );
        // 0 -> N: the un-NATed entry (reply from the service IP itself) is stale.
        let st = state(&["10.244.0.2"]);
        assert_eq!(
            stale_flows(&[flow("10.96.0.10", 53, "10.96.0.10")], &st).len(),
            1
        );
    }
}
