//! A cheap pre-scan of flow nesting depth (`[` / `{`), so that hostile input such as
//! 80,000 nested `[` is refused in microseconds instead of costing the YAML parser
//! tens of seconds. It reads JSON and YAML alike: quoted scalars and comments are
//! skipped, and a bracket counts only where it can open a flow collection (at the
//! start of a token). It errs on the side of counting: a bracket it is unsure about
//! is counted, so nothing deeper than the limit reaches the parser.

/// Returns the byte offset where nesting first exceeds `limit`.
pub(crate) fn check(text: &str, limit: usize) -> Result<(), usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    // The previous significant byte; `b'\n'` stands for "start of input or line".
    let mut prev = b'\n';
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let at_token_start = matches!(
            prev,
            b'\n' | b' ' | b'\t' | b'\r' | b'[' | b'{' | b',' | b':' | b'-'
        );
        match c {
            b'"' if at_token_start => i = skip_double(b, i + 1),
            b'\'' if at_token_start => i = skip_single(b, i + 1),
            b'#' if matches!(prev, b'\n' | b' ' | b'\t' | b'\r') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = if i < b.len() { b[i] } else { c };
        i += 1;
    }
    Ok(())
}

/// Index of the closing `"` of a double-quoted scalar whose body starts at `i`.
fn skip_double(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// Index of the closing `'` of a single-quoted scalar (`''` is an escaped quote).
fn skip_single(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        if b[i] == b'\'' {
            if b.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return i;
        }
        i += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn ordinary_objects_pass() {
        assert_eq!(check(r#"{"a": [{"b": "[[[[[["}]}"#, 3), Ok(()));
        assert_eq!(check("a: '[[[['\nb: [1, [2]] # [[[[[\n", 2), Ok(()));
        assert_eq!(check("a: \"x\\\"[[[[\"\n", 1), Ok(()));
        assert_eq!(check("a: 'it''s [[[['\n", 1), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused() {
        let deep = "[".repeat(80_000) + &"]".repeat(80_000);
        assert_eq!(check(&deep, 128), Err(128));
        let deep_map = "a: ".to_string() + &"{b: ".repeat(200);
        assert!(check(&deep_map, 128).is_err());
        // A quote in the middle of a plain scalar does not hide what follows.
        let sneaky = "a: b\"".to_string() + &"[".repeat(200);
        assert!(check(&sneaky, 128).is_err());
    }
}
