//! A fake Kubernetes API server speaking the real list/watch protocol over HTTP:
//! lists with `metadata.resourceVersion`, chunked `?watch=true` streams of JSON events
//! (ADDED / MODIFIED / DELETED / BOOKMARK), `410 Gone` (an ERROR event with an Expired
//! Status) for a resourceVersion older than what it keeps, label selectors of the form
//! `!label` and field selector `metadata.name=…`. Tests can drop every open watch
//! (a disconnect) and compact the event history (so resuming gets 410).
//!
//! Fault injection ([`FakeApi::inject`]): the next requests of a scope (lists, watches
//! or both) answer with an HTTP error status (500, 410 Gone, 504 …), hang and then drop
//! the connection (a timeout), or answer only after a delay (a slow server). Raw JSON
//! objects that do not match the typed API ([`FakeApi::apply_raw`]) test bad objects.
// Each including crate uses a different part, through a private module.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The kinds it serves: (path, list kind).
const KINDS: [(&str, &str); 4] = [
    ("/api/v1/services", "ServiceList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
    ),
    ("/api/v1/nodes", "NodeList"),
    ("/apis/networking.k8s.io/v1/servicecidrs", "ServiceCIDRList"),
];

#[derive(Default)]
struct Store {
    rv: u64,
    /// path -> key -> object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// (rv, path, event type, object)
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// Events at or below this rv were compacted away.
    compacted: u64,
    /// Bumped to drop every open watch.
    generation: u64,
    /// While set, every request's connection is closed at once (server down).
    down: bool,
    /// Faults still to serve, in order; a request takes the first whose scope matches.
    faults: Vec<(Scope, Fault, usize)>,
    /// Faults served so far.
    faults_served: usize,
    /// Keep at most this many events (older ones are compacted away); 0 = all.
    history_limit: usize,
    /// Requests answered so far (lists, watches).
    requests: (usize, usize),
}

/// What a fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers with this HTTP status and a `Status` body (500, 410, 504 …).
    Status(u16),
    /// Reads the request, says nothing for this long, then drops the connection.
    Hang(Duration),
    /// Answers normally after this long.
    Delay(Duration),
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// List requests (`GET` without `watch`).
    Lists,
    /// Watch requests.
    Watches,
    /// Both.
    All,
}

/// The fake server; it serves until dropped (its threads stop with the process).
#[derive(Clone)]
pub struct FakeApi {
    store: Arc<(Mutex<Store>, Condvar)>,
    /// Where it listens.
    pub addr: SocketAddr,
}

fn path_of(kind: &str) -> &'static str {
    match kind {
        "Service" => KINDS[0].0,
        "EndpointSlice" => KINDS[1].0,
        "Node" => KINDS[2].0,
        _ => KINDS[3].0,
    }
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or("")
    )
}

fn matches(obj: &Value, label_sel: &str, field_sel: &str) -> bool {
    for sel in label_sel.split(',').filter(|s| !s.is_empty()) {
        if let Some(l) = sel.strip_prefix('!') {
            if obj["metadata"]["labels"].get(l).is_some() {
                return false;
            }
        }
    }
    for sel in field_sel.split(',').filter(|s| !s.is_empty()) {
        if let Some(name) = sel.strip_prefix("metadata.name=") {
            if obj["metadata"]["name"].as_str() != Some(name) {
                return false;
            }
        }
    }
    true
}

fn decode(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v as char);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { ' ' } else { b[i] as char });
        i += 1;
    }
    out
}

impl FakeApi {
    /// Starts listening on 127.0.0.1 (of the calling thread's network namespace).
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake apiserver");
        let addr = listener.local_addr().unwrap();
        let api = FakeApi {
            store: Arc::new((
                Mutex::new(Store {
                    rv: 100,
                    ..Store::default()
                }),
                Condvar::new(),
            )),
            addr,
        };
        let a2 = api.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let a = a2.clone();
                std::thread::spawn(move || a.handle(conn));
            }
        });
        api
    }

    /// A kubeconfig pointing at the server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }

    /// Creates or replaces an object (from YAML).
    pub fn apply(&self, yaml: &str) {
        let mut obj: Value = serde_yaml_ng::from_str(yaml).expect("object yaml");
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{}", key_of(&obj)));
        let path = path_of(obj["kind"].as_str().unwrap_or(""));
        let key = key_of(&obj);
        let existed = st
            .objects
            .entry(path)
            .or_default()
            .insert(key, obj.clone())
            .is_some();
        st.events
            .push((rv, path, if existed { "MODIFIED" } else { "ADDED" }, obj));
        st.trim_history();
        cv.notify_all();
    }

    /// Creates or replaces an object given as JSON text, stored as it is: fields of the
    /// wrong type reach the client unchanged (a bad object in a list or watch event).
    /// It needs `kind` and `metadata.name`.
    pub fn apply_raw(&self, json_text: &str) {
        let mut obj: Value = serde_json::from_str(json_text).expect("object json");
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let path = path_of(obj["kind"].as_str().unwrap_or(""));
        let key = key_of(&obj);
        let existed = st
            .objects
            .entry(path)
            .or_default()
            .insert(key, obj.clone())
            .is_some();
        st.events
            .push((rv, path, if existed { "MODIFIED" } else { "ADDED" }, obj));
        st.trim_history();
        cv.notify_all();
    }

    /// Queues a fault for the next `count` requests in `scope` (after those queued
    /// before it).
    pub fn inject(&self, scope: Scope, fault: Fault, count: usize) {
        let (lock, cv) = &*self.store;
        lock.lock().unwrap().faults.push((scope, fault, count));
        cv.notify_all();
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.store.0.lock().unwrap().faults.clear();
    }

    /// How many faulty answers were served.
    pub fn faults_served(&self) -> usize {
        self.store.0.lock().unwrap().faults_served
    }

    /// Requests answered: (lists, watches).
    pub fn requests(&self) -> (usize, usize) {
        self.store.0.lock().unwrap().requests
    }

    /// Keeps at most `n` events of history (a long churn run would otherwise keep every
    /// version of every object); a watch resuming from before them gets 410.
    pub fn set_history_limit(&self, n: usize) {
        let mut st = self.store.0.lock().unwrap();
        st.history_limit = n;
        st.trim_history();
    }

    /// Creates every object of a `kind: List` (or a single object) given as YAML/JSON.
    pub fn apply_all(&self, text: &str) {
        let v: Value = serde_yaml_ng::from_str(text).expect("yaml");
        let items = if v["kind"].as_str() == Some("List") {
            v["items"].as_array().cloned().unwrap_or_default()
        } else {
            vec![v]
        };
        for item in items {
            self.apply(&item.to_string());
        }
    }

    /// Deletes an object; `quiet` skips the DELETED event (as if it happened while
    /// watches were down and the history was lost).
    pub fn delete(&self, kind: &str, ns: &str, name: &str, quiet: bool) {
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let path = path_of(kind);
        if let Some(mut obj) = st
            .objects
            .entry(path)
            .or_default()
            .remove(&format!("{ns}/{name}"))
        {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if !quiet {
                st.events.push((rv, path, "DELETED", obj));
            }
        }
        cv.notify_all();
    }

    /// Drops every open watch connection.
    pub fn disconnect_watches(&self) {
        let (lock, cv) = &*self.store;
        lock.lock().unwrap().generation += 1;
        cv.notify_all();
    }

    /// Takes the server down (connections dropped, watches closed) or back up.
    pub fn set_down(&self, down: bool) {
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().unwrap();
        st.down = down;
        st.generation += 1;
        cv.notify_all();
    }

    /// Forgets the event history: resuming from an older resourceVersion gets 410.
    pub fn compact(&self) {
        let (lock, _) = &*self.store;
        let mut st = lock.lock().unwrap();
        st.compacted = st.rv;
        st.events.clear();
    }

    /// Takes the fault for this request, if one is queued for its scope.
    fn take_fault(&self, watch: bool) -> Option<Fault> {
        let mut st = self.store.0.lock().unwrap();
        if watch {
            st.requests.1 += 1;
        } else {
            st.requests.0 += 1;
        }
        let i = st.faults.iter().position(|(scope, _, n)| {
            *n > 0
                && match scope {
                    Scope::All => true,
                    Scope::Lists => !watch,
                    Scope::Watches => watch,
                }
        })?;
        let fault = st.faults[i].1;
        st.faults[i].2 -= 1;
        if st.faults[i].2 == 0 {
            st.faults.remove(i);
        }
        st.faults_served += 1;
        Some(fault)
    }

    fn handle(&self, stream: TcpStream) {
        if self.store.0.lock().unwrap().down {
            return;
        }
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => break,
                Ok(_) if h == "\r\n" => break,
                _ => {}
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let q: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), decode(v)))
            .collect();
        let Some((kpath, list_kind)) = KINDS.iter().find(|(p, _)| *p == path) else {
            let _ = write_response(
                stream,
                404,
                &json!({"kind":"Status","code":404}).to_string(),
            );
            return;
        };
        let labels = q.get("labelSelector").cloned().unwrap_or_default();
        let fields = q.get("fieldSelector").cloned().unwrap_or_default();
        let is_watch = q.get("watch").map(String::as_str) == Some("true")
            || q.get("watch").map(String::as_str) == Some("1");
        match self.take_fault(is_watch) {
            Some(Fault::Status(code)) => {
                let reason = match code {
                    410 => "Expired",
                    500 => "InternalError",
                    503 => "ServiceUnavailable",
                    504 => "Timeout",
                    429 => "TooManyRequests",
                    _ => "InternalError",
                };
                let body = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":format!("injected fault: {code}"),"reason":reason,"code":code});
                let _ = write_response(stream, code, &body.to_string());
                return;
            }
            Some(Fault::Hang(d)) => {
                std::thread::sleep(d);
                return;
            }
            Some(Fault::Delay(d)) => std::thread::sleep(d),
            None => {}
        }
        if is_watch {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(300u64);
            self.watch(
                stream,
                kpath,
                from,
                &labels,
                &fields,
                Duration::from_secs(timeout),
            );
        } else {
            let (lock, _) = &*self.store;
            let st = lock.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .get(kpath)
                .map(|m| {
                    m.values()
                        .filter(|o| matches(o, &labels, &fields))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let body = json!({
                "apiVersion": "v1",
                "kind": list_kind,
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            });
            drop(st);
            let _ = write_response(stream, 200, &body.to_string());
        }
    }

    fn watch(
        &self,
        mut stream: TcpStream,
        path: &'static str,
        from: u64,
        labels: &str,
        fields: &str,
        timeout: Duration,
    ) {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let chunk = |s: &mut TcpStream, v: &Value| -> bool {
            let body = format!("{}\n", v);
            s.write_all(format!("{:x}\r\n{body}\r\n", body.len()).as_bytes())
                .is_ok()
                && s.flush().is_ok()
        };
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().unwrap();
        let generation = st.generation;
        if from != 0 && from < st.compacted {
            drop(st);
            let status = json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}});
            let _ = chunk(&mut stream, &status);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        let mut sent = from;
        let deadline = Instant::now() + timeout;
        let mut last_bookmark = Instant::now();
        loop {
            // Events are in rv order: skip what was sent without scanning it (a churn
            // run keeps tens of thousands).
            let start = st.events.partition_point(|(rv, ..)| *rv <= sent);
            let pending: Vec<(u64, &'static str, Value)> = st.events[start..]
                .iter()
                .filter(|(rv, p, _, o)| *rv > sent && *p == path && matches(o, labels, fields))
                .map(|(rv, _, t, o)| (*rv, *t, o.clone()))
                .collect();
            let latest = st.rv;
            drop(st);
            for (rv, t, o) in pending {
                if !chunk(&mut stream, &json!({"type": t, "object": o})) {
                    return;
                }
                sent = sent.max(rv);
            }
            // Every event up to `latest` that this watch wants was in `pending`.
            sent = sent.max(latest);
            if last_bookmark.elapsed() > Duration::from_secs(1) {
                let kind = match path {
                    p if p.ends_with("services") => "Service",
                    p if p.ends_with("endpointslices") => "EndpointSlice",
                    p if p.ends_with("nodes") => "Node",
                    _ => "ServiceCIDR",
                };
                let bm = json!({"type":"BOOKMARK","object":{"kind":kind,"apiVersion":"v1","metadata":{"resourceVersion": latest.to_string()}}});
                if !chunk(&mut stream, &bm) {
                    return;
                }
                last_bookmark = Instant::now();
            }
            st = lock.lock().unwrap();
            if st.generation != generation || Instant::now() > deadline || sent < st.compacted {
                drop(st);
                let _ = stream.write_all(b"0\r\n\r\n");
                return;
            }
            st = cv.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
            if st.generation != generation {
                drop(st);
                let _ = stream.write_all(b"0\r\n\r\n");
                return;
            }
        }
    }
}

impl Store {
    fn trim_history(&mut self) {
        if self.history_limit == 0 || self.events.len() <= self.history_limit {
            return;
        }
        let drop = self.events.len() - self.history_limit;
        self.compacted = self.events[drop - 1].0;
        self.events.drain(..drop);
    }
}

fn write_response(mut s: TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    s.write_all(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}
