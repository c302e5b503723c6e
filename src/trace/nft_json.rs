//! `nft -j list table|ruleset` JSON, turned into the same tables the text parsers
//! build: each rule's expressions are written back in nft's own statement syntax, so
//! one evaluator decides every form. Expressions this reader does not know become a
//! statement the evaluator reports as "unknown, not taken".

use serde_json::Value;

use super::core::TraceError;
use super::nftables::{BaseChain, Element, Rule, Table};

fn err(what: impl Into<String>) -> TraceError {
    TraceError::parse(0, what)
}

/// Short text of a JSON value for error messages (never the whole document).
fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// Parses the JSON listing into its tables.
pub(crate) fn parse(text: &str) -> Result<Vec<Table>, TraceError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| err(format!("nft JSON: {e}")))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| err("nft JSON: no \"nftables\" array"))?;
    let mut tables: Vec<Table> = Vec::new();
    let find = |tables: &mut Vec<Table>, o: &Value| -> Result<usize, TraceError> {
        let fam = o.get("family").and_then(Value::as_str).unwrap_or("ip");
        let name = o
            .get("table")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("nft JSON: object without a table: {}", brief(o))))?;
        let label = format!("{fam} {name}");
        if let Some(i) = tables.iter().position(|t| t.name == label) {
            return Ok(i);
        }
        tables.push(Table {
            name: label,
            ..Table::default()
        });
        Ok(tables.len() - 1)
    };
    for item in items {
        let Some((kind, o)) = item.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "table" => {
                let fam = o.get("family").and_then(Value::as_str).unwrap_or("ip");
                let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
                let label = format!("{fam} {name}");
                if !tables.iter().any(|t| t.name == label) {
                    tables.push(Table {
                        name: label,
                        ..Table::default()
                    });
                }
            }
            "chain" => {
                let i = find(&mut tables, o)?;
                let name = str_field(o, "name")?;
                tables[i].chains.entry(name.clone()).or_default();
                if let Some(hook) = o.get("hook").and_then(Value::as_str) {
                    let priority = o
                        .get("prio")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| err(format!("chain {name}: no priority")))?;
                    tables[i].base.insert(
                        name,
                        BaseChain {
                            hook: hook.to_string(),
                            priority: priority as i32,
                            policy_drop: o.get("policy").and_then(Value::as_str) == Some("drop"),
                        },
                    );
                }
            }
            "set" | "map" => {
                let i = find(&mut tables, o)?;
                let name = str_field(o, "name")?;
                let mut elems = Vec::new();
                for e in o
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    elems.push(element(e)?);
                }
                tables[i].elements.entry(name).or_default().extend(elems);
            }
            "element" => {
                let i = find(&mut tables, o)?;
                let name = str_field(o, "name")?;
                let mut elems = Vec::new();
                for e in o
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    elems.push(element(e)?);
                }
                tables[i].elements.entry(name).or_default().extend(elems);
            }
            "rule" => {
                let i = find(&mut tables, o)?;
                let chain = str_field(o, "chain")?;
                let exprs = o
                    .get("expr")
                    .and_then(Value::as_array)
                    .ok_or_else(|| err(format!("rule in {chain} without expressions")))?;
                let mut toks = Vec::new();
                for e in exprs {
                    statement(e, &mut toks);
                }
                if let Some(c) = o.get("comment").and_then(Value::as_str) {
                    toks.push("comment".into());
                    toks.push(format!("\"{c}\""));
                }
                tables[i]
                    .chains
                    .entry(chain)
                    .or_default()
                    .push(Rule::new(toks));
            }
            _ => {}
        }
    }
    Ok(tables)
}

fn str_field(o: &Value, f: &str) -> Result<String, TraceError> {
    o.get(f)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| err(format!("nft JSON: no {f:?} in {}", brief(o))))
}

/// One set element: a value, `{"concat": …}`, `{"prefix": …}`, `{"range": …}`,
/// `{"elem": {"val": …, "comment": …}}`, or a map entry `[key, verdict]`.
fn element(e: &Value) -> Result<Element, TraceError> {
    if let Some(pair) = e.as_array() {
        let [k, v] = pair.as_slice() else {
            return Err(err(format!("map element {}", brief(e))));
        };
        let mut el = element(k)?;
        let mut vt = Vec::new();
        verdict(v, &mut vt);
        el.value = Some(vt.join(" "));
        return Ok(el);
    }
    if let Some(inner) = e.get("elem") {
        let mut el = element(inner.get("val").unwrap_or(&Value::Null))?;
        el.comment = inner
            .get("comment")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Ok(el);
    }
    let key = value_text(e).ok_or_else(|| err(format!("set element {}", brief(e))))?;
    Ok(Element {
        key,
        value: None,
        comment: None,
    })
}

/// A constant (address, port, protocol, prefix, range, concatenation) as nft prints it.
fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(
            crate::model::ip::parse_ip_sloppy(s)
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| s.clone()),
        ),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(m) => {
            if let Some(p) = m.get("prefix") {
                let addr = p.get("addr").and_then(Value::as_str)?;
                let len = p.get("len").and_then(Value::as_u64)?;
                return Some(format!("{addr}/{len}"));
            }
            if let Some(r) = m.get("range").and_then(Value::as_array) {
                let a = value_text(r.first()?)?;
                let b = value_text(r.get(1)?)?;
                return Some(format!("{a}-{b}"));
            }
            if let Some(c) = m.get("concat").and_then(Value::as_array) {
                return c
                    .iter()
                    .map(value_text)
                    .collect::<Option<Vec<_>>>()
                    .map(|p| p.join(" . "));
            }
            None
        }
        _ => None,
    }
}

/// An expression on the left of a match or in a vmap key.
fn selector(v: &Value, out: &mut Vec<String>) -> bool {
    let Some((k, o)) = v.as_object().and_then(|m| m.iter().next()) else {
        return false;
    };
    match k.as_str() {
        "payload" => {
            let (Some(p), Some(f)) = (
                o.get("protocol").and_then(Value::as_str),
                o.get("field").and_then(Value::as_str),
            ) else {
                return false;
            };
            out.push(p.into());
            out.push(f.into());
        }
        "meta" => {
            let Some(key) = o.get("key").and_then(Value::as_str) else {
                return false;
            };
            out.push("meta".into());
            out.push(key.into());
        }
        "ct" => {
            let Some(key) = o.get("key").and_then(Value::as_str) else {
                return false;
            };
            out.push("ct".into());
            out.push(key.into());
        }
        "fib" => {
            let flags: Vec<&str> = match o.get("flags") {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            out.push("fib".into());
            out.push(flags.join(" . "));
            out.push(
                o.get("result")
                    .and_then(Value::as_str)
                    .unwrap_or("type")
                    .into(),
            );
        }
        "concat" => {
            let Some(parts) = o.as_array() else {
                return false;
            };
            for (n, p) in parts.iter().enumerate() {
                if n > 0 {
                    out.push(".".into());
                }
                if !selector(p, out) {
                    return false;
                }
            }
        }
        "&" | "|" | "^" => {
            let Some([a, b]) = o.as_array().map(Vec::as_slice) else {
                return false;
            };
            if !selector(a, out) {
                return false;
            }
            out.push(k.clone());
            match value_text(b) {
                Some(t) => out.push(t),
                None => return false,
            }
        }
        "numgen" => {
            out.push("numgen".into());
            out.push(o.get("mode").and_then(Value::as_str).unwrap_or("?").into());
            out.push("mod".into());
            out.push(o.get("mod").map(|m| m.to_string()).unwrap_or_default());
            if o.get("offset")
                .and_then(Value::as_u64)
                .is_some_and(|x| x != 0)
            {
                // An offset shifts the keys; say so rather than guess.
                out.push("offset".into());
            }
        }
        _ => return false,
    }
    true
}

/// The right side of a match: a constant, `@set`, or an anonymous set.
fn right(v: &Value, out: &mut Vec<String>) -> bool {
    if let Some(s) = v.as_str() {
        out.push(s.to_string());
        return true;
    }
    if let Some(list) = v.as_array() {
        // `ct state { established, related }` comes as a plain list of names.
        let names: Option<Vec<&str>> = list.iter().map(Value::as_str).collect();
        return match names {
            Some(n) => {
                out.push(n.join(","));
                true
            }
            None => false,
        };
    }
    if let Some(items) = v.get("set").and_then(Value::as_array) {
        out.push("{".into());
        for (n, it) in items.iter().enumerate() {
            if n > 0 {
                out.push(",".into());
            }
            match value_text(it) {
                Some(t) => out.push(t),
                None => return false,
            }
        }
        out.push("}".into());
        return true;
    }
    match value_text(v) {
        Some(t) => {
            out.push(t);
            true
        }
        None => false,
    }
}

fn verdict(v: &Value, out: &mut Vec<String>) -> bool {
    let Some((k, o)) = v.as_object().and_then(|m| m.iter().next()) else {
        return false;
    };
    match k.as_str() {
        "jump" | "goto" => {
            let Some(t) = o.get("target").and_then(Value::as_str) else {
                return false;
            };
            out.push(k.clone());
            out.push(t.to_string());
        }
        "accept" | "drop" | "return" | "continue" => out.push(k.clone()),
        _ => return false,
    }
    true
}

/// One statement of a rule, appended as tokens; unknown ones as `unknown-json:<kind>`.
fn statement(e: &Value, out: &mut Vec<String>) {
    let Some((k, o)) = e.as_object().and_then(|m| m.iter().next()) else {
        out.push("unknown-json".into());
        return;
    };
    let start = out.len();
    let ok = match k.as_str() {
        "match" => {
            let op = o.get("op").and_then(Value::as_str).unwrap_or("==");
            let left = o.get("left").unwrap_or(&Value::Null);
            let r = o.get("right").unwrap_or(&Value::Null);
            selector(left, out)
                && match op {
                    "==" | "in" => true,
                    "!=" => {
                        out.push("!=".into());
                        true
                    }
                    _ => false,
                }
                && right(r, out)
        }
        "vmap" => {
            let key = o.get("key").unwrap_or(&Value::Null);
            let data = o.get("data").unwrap_or(&Value::Null);
            selector(key, out) && {
                out.push("vmap".into());
                match data {
                    Value::String(s) => {
                        out.push(s.clone());
                        true
                    }
                    _ => match data.get("set").and_then(Value::as_array) {
                        Some(items) => {
                            out.push("{".into());
                            let mut ok = true;
                            for (n, it) in items.iter().enumerate() {
                                if n > 0 {
                                    out.push(",".into());
                                }
                                let Some([kv, vv]) = it.as_array().map(Vec::as_slice) else {
                                    ok = false;
                                    break;
                                };
                                match value_text(kv) {
                                    Some(t) => out.push(t),
                                    None => ok = false,
                                }
                                out.push(":".into());
                                ok &= verdict(vv, out);
                            }
                            out.push("}".into());
                            ok
                        }
                        None => false,
                    },
                }
            }
        }
        "jump" | "goto" | "accept" | "drop" | "return" | "continue" => verdict(e, out),
        "reject" => {
            out.push("reject".into());
            true
        }
        "counter" => {
            out.push("counter".into());
            true
        }
        "masquerade" | "snat" => {
            out.push(k.clone());
            true
        }
        "log" => {
            out.push("log".into());
            true
        }
        "dnat" => {
            let addr = o.get("addr").and_then(value_text);
            let port = o.get("port").and_then(Value::as_u64);
            match addr {
                Some(a) => {
                    out.push("dnat".into());
                    out.push("to".into());
                    out.push(match (a.contains(':'), port) {
                        (true, Some(p)) => format!("[{a}]:{p}"),
                        (false, Some(p)) => format!("{a}:{p}"),
                        (_, None) => a,
                    });
                    true
                }
                None => false,
            }
        }
        "mangle" => {
            // meta mark set <expr>
            let key = o.get("key").unwrap_or(&Value::Null);
            let value = o.get("value").unwrap_or(&Value::Null);
            let mut lhs = Vec::new();
            selector(key, &mut lhs) && {
                out.extend(lhs);
                out.push("set".into());
                selector(value, out)
                    || match value_text(value) {
                        Some(t) => {
                            out.push(t);
                            true
                        }
                        None => false,
                    }
            }
        }
        "set" => {
            // update/add @set { elem }: affinity bookkeeping.
            out.push(
                o.get("op")
                    .and_then(Value::as_str)
                    .unwrap_or("update")
                    .into(),
            );
            out.push(o.get("set").and_then(Value::as_str).unwrap_or("@?").into());
            out.push("{".into());
            out.push("}".into());
            true
        }
        _ => false,
    };
    if !ok {
        out.truncate(start);
        out.push(format!("unknown-json:{k}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_come_back_as_nft_text() {
        let j = r#"{"nftables":[{"table":{"family":"ip","name":"kube-proxy"}},
          {"chain":{"family":"ip","table":"kube-proxy","name":"nat-prerouting","type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
          {"rule":{"family":"ip","table":"kube-proxy","chain":"s","expr":[
            {"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.0.0.0","len":8}}}},
            {"mangle":{"key":{"meta":{"key":"mark"}},"value":{"|":[{"meta":{"key":"mark"}},16384]}}},
            {"vmap":{"key":{"numgen":{"mode":"random","mod":2,"offset":0}},"data":{"set":[[0,{"goto":{"target":"a"}}],[1,{"goto":{"target":"b"}}]]}}},
            {"dnat":{"addr":"10.1.0.1","port":80}},
            {"frob":{}}]}}]}"#;
        let t = parse(j).unwrap();
        assert_eq!(t[0].name, "ip kube-proxy");
        assert_eq!(
            t[0].chains["s"][0].text,
            "ip saddr != 10.0.0.0/8 meta mark set meta mark | 16384 numgen random mod 2 vmap { 0 : goto a , 1 : goto b } dnat to 10.1.0.1:80 unknown-json:frob"
        );
        assert_eq!(t[0].base["nat-prerouting"].priority, -100);
    }

    #[test]
    fn errors_are_short() {
        let big = format!(
            "{{\"nftables\": [{{\"rule\": {{\"x\": \"{}\"}}}}]}}",
            "y".repeat(40_000)
        );
        let e = parse(&big).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
    }
}
