//! JSON printed the way qemu-img prints it.
//!
//! qemu-img converts a QAPI object to a `QDict` and pretty-prints it: objects iterate in
//! the dictionary's hash-bucket order (`tdb_hash(key) % 512`; within a bucket, the key
//! inserted last comes first), indentation is four spaces per level, an empty list or
//! object is printed as an opening bracket, a newline with the outer indentation and the
//! closing bracket, and strings escape every code point outside 0x20..0x7e as `\uXXXX`.
//! Building values in QAPI field order and printing them with [`Json::to_qemu_string`]
//! gives byte-identical text.

/// A JSON value with object members in insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `true` / `false`.
    Bool(bool),
    /// An unsigned integer (QAPI `uint64`/`size`).
    UInt(u64),
    /// A string (bytes, possibly not UTF-8, as in QEMU's C strings).
    Str(Vec<u8>),
    /// A list.
    List(Vec<Json>),
    /// An object, members in insertion (QAPI field) order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// A string value.
    pub fn str(s: impl AsRef<[u8]>) -> Self {
        Json::Str(s.as_ref().to_vec())
    }

    /// An empty object.
    pub fn object() -> Self {
        Json::Object(Vec::new())
    }

    /// Appends a member to an object (no-op on other values).
    pub fn push(&mut self, key: &str, value: Json) {
        if let Json::Object(members) = self {
            members.push((key.to_string(), value));
        }
    }

    /// Builder form of [`Json::push`].
    pub fn with(mut self, key: &str, value: Json) -> Self {
        self.push(key, value);
        self
    }

    /// The pretty text qemu-img prints (without the final newline).
    pub fn to_qemu_string(&self) -> String {
        let mut out = String::new();
        write_value(&mut out, self, 0);
        out
    }
}

/// QEMU's `tdb_hash`, which decides the iteration order of a `QDict`.
pub fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(c).wrapping_shl(((i * 5) % 24) as u32));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// Members in `QDict` iteration order.
pub fn qdict_order(members: &[(String, Json)]) -> Vec<&(String, Json)> {
    let mut idx: Vec<(u32, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (tdb_hash(k) % 512, i))
        .collect();
    // Bucket ascending; inside a bucket the newest insertion first.
    idx.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    idx.into_iter()
        .filter_map(|(_, i)| members.get(i))
        .collect()
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth * 4 {
        out.push(' ');
    }
}

fn write_value(out: &mut String, v: &Json, depth: usize) {
    match v {
        Json::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(members) => {
            out.push('{');
            for (i, (k, val)) in qdict_order(members).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                quoted(out, k.as_bytes());
                out.push_str(": ");
                write_value(out, val, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        scalar => write_scalar(out, scalar),
    }
}

fn write_scalar(out: &mut String, v: &Json) {
    match v {
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::UInt(u) => out.push_str(&u.to_string()),
        Json::Str(s) => quoted(out, s),
        Json::List(_) | Json::Object(_) => {}
    }
}

/// QEMU's `quoted_str`: UTF-8 decoded, invalid sequences become U+FFFD, everything
/// outside printable ASCII is escaped.
fn quoted(out: &mut String, s: &[u8]) {
    out.push('"');
    for ch in String::from_utf8_lossy(s).chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let cp = c as u32;
                if cp > 0xffff {
                    let v = cp - 0x10000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xd800 + (v >> 10),
                        0xdc00 + (v & 0x3ff)
                    ));
                } else {
                    out.push_str(&format!("\\u{cp:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdict_order_matches_qemu_img_info() {
        let v = Json::object()
            .with("filename", Json::str("t.qcow2"))
            .with("format", Json::str("qcow2"))
            .with("dirty-flag", Json::Bool(false))
            .with("actual-size", Json::UInt(200704))
            .with("virtual-size", Json::UInt(1 << 30))
            .with("cluster-size", Json::UInt(65536))
            .with("children", Json::List(vec![]));
        let keys: Vec<&str> = match &v {
            Json::Object(m) => qdict_order(m).iter().map(|(k, _)| k.as_str()).collect(),
            _ => vec![],
        };
        assert_eq!(
            keys,
            [
                "children",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn pretty_form() {
        let v = Json::object()
            .with("a", Json::List(vec![]))
            .with("b", Json::object());
        assert_eq!(
            v.to_qemu_string(),
            "{\n    \"a\": [\n    ],\n    \"b\": {\n    }\n}"
        );
        assert_eq!(Json::str("é\"\n").to_qemu_string(), "\"\\u00E9\\\"\\n\"");
    }
}
