//! QEMU's `json:{...}` pseudo-protocol filenames: the block options as a JSON object,
//! flattened into the dotted option list (`{"file": {"driver": "file"}}` →
//! `file.driver=file`) that `-o` and `--image-opts` give.
//!
//! QEMU's JSON parser also takes single-quoted strings (iotests write them so); they are
//! rewritten as JSON strings before parsing.

use serde_json::Value;

/// The option list of a `json:` filename, or `None` for any other name.
pub fn options(name: &str) -> Option<Result<Vec<(String, String)>, String>> {
    let text = name.strip_prefix("json:")?;
    Some(parse(text))
}

fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let eoi = || "Could not parse the JSON options: JSON parse error, premature EOI".to_string();
    // An unclosed string runs to the end of the input.
    let json = double_quoted(text).ok_or_else(eoi)?;
    let value: Value = serde_json::from_str(&json).map_err(|e| {
        if e.is_eof() {
            eoi()
        } else {
            format!("Could not parse the JSON options: JSON parse error: {e}")
        }
    })?;
    let Value::Object(map) = value else {
        return Err("Invalid JSON object given".to_string());
    };
    let mut out = Vec::new();
    flatten("", &Value::Object(map), &mut out)?;
    Ok(out)
}

/// Rewrites single-quoted strings as double-quoted JSON strings; `None` if a string is
/// not closed.
fn double_quoted(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                loop {
                    let c = chars.next()?;
                    out.push(c);
                    match c {
                        '\\' => out.push(chars.next()?),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                loop {
                    match chars.next()? {
                        '\\' => {
                            let e = chars.next()?;
                            if e == '\'' {
                                out.push('\'');
                            } else {
                                out.push('\\');
                                out.push(e);
                            }
                        }
                        '\'' => break,
                        '"' => out.push_str("\\\""),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// Flattens nested objects into dotted keys (arrays into `key.N`), scalars as QEMU's
/// option strings (`true`/`false` become `on`/`off`).
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out)?;
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out)?;
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Number(n) => out.push((prefix.to_string(), n.to_string())),
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.into())),
        Value::Null => return Err(format!("Invalid parameter type for '{prefix}'")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn nested_objects_flatten() {
        let mut o = options(
            "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'a b\"c'}, 'x': [1, true]}",
        )
        .unwrap()
        .unwrap();
        o.sort();
        assert_eq!(
            o,
            kv(&[
                ("driver", "qcow2"),
                ("file.driver", "file"),
                ("file.filename", "a b\"c"),
                ("x.0", "1"),
                ("x.1", "on"),
            ])
        );
        let mut o = options("json:{\"size\": 65536, \"n\": \"it's\"}")
            .unwrap()
            .unwrap();
        o.sort();
        assert_eq!(o, kv(&[("n", "it's"), ("size", "65536")]));
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(options("plain.qcow2").is_none());
        assert!(options("json:{'driver': 'qcow2'").unwrap().is_err());
        assert!(options("json:{'a': 'unterminated}").unwrap().is_err());
        assert!(options("json:[1]").unwrap().is_err());
        assert!(options("json:{'a': null}").unwrap().is_err());
    }
}
