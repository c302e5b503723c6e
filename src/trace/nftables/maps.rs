//! The maps layout's own expressions (`--nftables-layout=maps`, table `kproxy`):
//! `dnat ip to KEY [. numgen random mod N] map @backends` (a data-map lookup, every
//! index of a random pick followed with 1/N), and `ct status dnat` (true in the
//! postrouting pass the tracer runs per DNAT destination, where the layout decides
//! hairpin masquerade from its `endpoint . endpoint` set). Concatenated lookups
//! (`ip daddr . meta l4proto . th dport @set`), interval sets of prefixes and the
//! session-affinity verdict maps need nothing beyond the common matcher.

use super::eval::{Flow, Tracer};
use super::Rule;
use crate::trace::core::Packet;

/// The key of a `dnat … map` statement: packet fields, and the modulus of a trailing
/// `numgen random mod N`.
struct MapKey {
    fields: Vec<String>,
    numgen: Option<usize>,
    map: String,
}

/// `addr . port` data (as parsed: `10.0.0.1 8080`, `10.0.0.1 . 8080`) as a DNAT
/// target (`10.0.0.1:8080`, `[fd00::1]:8080`).
fn target(data: &str) -> Option<String> {
    let parts: Vec<&str> = data.split_whitespace().filter(|t| *t != ".").collect();
    match parts.as_slice() {
        [ip, port] if ip.contains(':') => Some(format!("[{ip}]:{port}")),
        [ip, port] => Some(format!("{ip}:{port}")),
        _ => None,
    }
}

impl Tracer<'_> {
    /// Reads `dnat [ip|ip6] to KEY map @M` from `i` (at `dnat`); `None` when the
    /// statement is another DNAT form.
    fn map_key(&self, toks: &[String], i: usize, p: &Packet) -> Option<Result<MapKey, String>> {
        if !toks[i..].iter().any(|t| t == "map") {
            return None;
        }
        let mut j = i + 1;
        if matches!(toks.get(j).map(String::as_str), Some("ip" | "ip6")) {
            j += 1;
        }
        if toks.get(j).map(String::as_str) != Some("to") {
            return Some(Err("dnat map form".into()));
        }
        j += 1;
        let mut fields = Vec::new();
        let mut numgen = None;
        loop {
            if toks.get(j).map(String::as_str) == Some("numgen") {
                let n = match (
                    toks.get(j + 1).map(String::as_str),
                    toks.get(j + 2).map(String::as_str),
                    toks.get(j + 3).and_then(|n| n.parse::<usize>().ok()),
                ) {
                    (Some("random"), Some("mod"), Some(n)) if n > 0 => n,
                    _ => return Some(Err("numgen form in a dnat key".into())),
                };
                numgen = Some(n);
                j += 4;
            } else {
                match self.selector_value(toks, &mut j, p) {
                    Some(v) => fields.push(v),
                    None => return Some(Err("dnat map key component".into())),
                }
            }
            if toks.get(j).map(String::as_str) == Some(".") {
                j += 1;
                continue;
            }
            break;
        }
        match (toks.get(j).map(String::as_str), toks.get(j + 1)) {
            (Some("map"), Some(m)) if m.starts_with('@') => Some(Ok(MapKey {
                fields,
                numgen,
                map: m[1..].to_string(),
            })),
            _ => Some(Err("dnat map needs a named map".into())),
        }
    }

    /// `dnat … map @M`: the data map's endpoint for the packet's key, or for a key
    /// ending in `numgen random mod N` every index with 1/N. No element: the rule does
    /// not apply (the kernel's lookup fails and the rule stops). `None`: not this form.
    pub(super) fn dnat_map(
        &mut self,
        chain: &str,
        r: &Rule,
        toks: &[String],
        i: usize,
        p: &Packet,
    ) -> Option<Flow> {
        let key = match self.map_key(toks, i, p)? {
            Ok(k) => k,
            Err(why) => {
                self.walk.unknown(chain, &r.text, &why);
                return Some(Flow::Continue);
            }
        };
        let base = key.fields.join(" . ");
        let lookup = |t: &Tracer<'_>, k: &str| -> Option<String> {
            t.find_element(&key.map, k)
                .and_then(|e| e.value.as_deref())
                .and_then(target)
        };
        let Some(n) = key.numgen else {
            let Some(dest) = lookup(self, &base) else {
                return Some(Flow::Continue);
            };
            self.walk.dnat(chain, &r.text, &dest);
            return Some(Flow::Stop);
        };
        let targets: Vec<Option<String>> = (0..n)
            .map(|idx| lookup(self, &format!("{base} . {idx}")))
            .collect();
        if targets.iter().all(Option::is_none) {
            return Some(Flow::Continue);
        }
        if targets.iter().any(Option::is_none) {
            // Some random picks would find no element and go on to the next rule:
            // never written by kproxy, and not something to guess about.
            self.walk.abort(format!(
                "@{} lacks some of the indices 0..{n} for {base} in {chain}: {}",
                key.map, r.text
            ));
            return Some(Flow::Stop);
        }
        self.walk
            .choice(chain, &r.text, &vec![1.0 / n as f64; n], "endpoints");
        for dest in targets.into_iter().flatten() {
            let saved = self.walk.scale(1.0 / n as f64);
            let ok = self.walk.dnat(chain, &r.text, &dest);
            self.walk.restore(saved);
            if !ok {
                return Some(Flow::Stop);
            }
        }
        Some(Flow::Stop)
    }

    /// `ct status [!=] dnat` at `i` (at `ct`): Some(true) to go on with the rule,
    /// Some(false) when it does not match, None when not this form.
    pub(super) fn ct_status(&self, toks: &[String], i: &mut usize) -> Option<bool> {
        if toks.get(*i + 1).map(String::as_str) != Some("status") {
            return None;
        }
        let mut j = *i + 2;
        let neg = toks.get(j).map(String::as_str) == Some("!=");
        if neg {
            j += 1;
        }
        if toks.get(j).map(String::as_str) != Some("dnat") {
            return None;
        }
        *i = j + 1;
        Some(self.after_dnat != neg)
    }
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn targets() {
        assert_eq!(target("10.0.0.1 8080").as_deref(), Some("10.0.0.1:8080"));
        assert_eq!(target("10.0.0.1 . 8080").as_deref(), Some("10.0.0.1:8080"));
        assert_eq!(target("fd00::1 80").as_deref(), Some("[fd00::1]:80"));
        assert_eq!(target("10.0.0.1"), None);
    }
}
