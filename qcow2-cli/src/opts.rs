//! `-o name=value,...` option lists, parsed the way QEMU's `QemuOpts` parses them.
//!
//! Items are separated by commas; `,,` is a literal comma inside a value. An item without
//! `=` is a flag: `name` means `name=on` and `noname` means `name=off`. A later item with
//! the same name replaces an earlier one (`-o` may also be given several times; the lists
//! are joined with a comma). `help` or `?` asks for the option list.

/// One parsed option list, in the order given (later duplicates replace earlier values but
/// keep the first position, as QEMU's `qemu_opt_set` does not; only the value matters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptList {
    /// `(name, value)` pairs; names are unique.
    pub items: Vec<(String, String)>,
    /// `help` or `?` was among the items.
    pub help: bool,
}

impl OptList {
    /// Parses one or more `-o` arguments. Returns the offending text for an empty list
    /// ("Invalid option list: ").
    pub fn parse(lists: &[String]) -> Result<Self, String> {
        let mut out = OptList::default();
        for list in lists {
            if list.is_empty() {
                return Err(list.clone());
            }
            for item in split_items(list) {
                if item == "help" || item == "?" {
                    out.help = true;
                    continue;
                }
                let (name, value) = match item.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => match item.strip_prefix("no") {
                        // QEMU only treats "no" as negation for known boolean names; for
                        // the names we know, none start with "no".
                        Some(rest) if !rest.is_empty() => (rest.to_string(), "off".to_string()),
                        _ => (item.clone(), "on".to_string()),
                    },
                };
                out.set(name, value);
            }
        }
        Ok(out)
    }

    fn set(&mut self, name: String, value: String) {
        if let Some(slot) = self.items.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.items.push((name, value));
        }
    }
}

/// Splits at single commas; `,,` stands for a comma (QemuOpts' escaping); empty items are
/// dropped.
pub fn split_items(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items.into_iter().filter(|s| !s.is_empty()).collect()
}

/// QEMU's boolean option values: on/yes/true/y and off/no/false/n.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's `qemu_strtou64` for number options (decimal, `0x` hex or `0` octal, no suffix).
pub fn parse_number(v: &str) -> Option<u64> {
    let t = v.trim_start();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8).ok();
    }
    t.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(o: &'a OptList, n: &str) -> Option<&'a str> {
        o.items
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn lists() {
        let o =
            OptList::parse(&["cluster_size=64k,lazy_refcounts".into(), "a=b,,c".into()]).unwrap();
        assert_eq!(get(&o, "cluster_size"), Some("64k"));
        assert_eq!(get(&o, "lazy_refcounts"), Some("on"));
        assert_eq!(get(&o, "a"), Some("b,c"));
        let o = OptList::parse(&["cluster_size=64k,cluster_size=4k".into()]).unwrap();
        assert_eq!(get(&o, "cluster_size"), Some("4k"));
        assert!(OptList::parse(&["help".into()]).unwrap().help);
        assert!(OptList::parse(&[String::new()]).is_err());
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("16k"), None);
    }
}
