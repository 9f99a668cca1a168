//! QEMU's `blkdebug` error injection on the image file: `blkdebug:CONFIG:FILE` filenames,
//! blkdebug configuration files (`[inject-error]` sections) and the `inject-error.N.*`
//! options of an option list.
//!
//! The rules run in [`qcow2_io::fault::FaultStorage`], which keeps blkdebug's semantics (an
//! event arms its rules, the next targeted request fails, `once` removes the rule). The
//! engine reports its I/O events under QEMU's names, so a configuration written for QEMU
//! arms at the same points. What is not here: `[set-state]` rules and rule states other
//! than the initial one (refused with a message, never ignored), and blkdebug's request
//! suspension (`break`/`resume`).
//!
//! blkdebug's geometry options (`align`, `max-transfer`, `opt-write-zero`, ...) shape how
//! QEMU's block layer splits requests above blkdebug. The bytes read and written are the
//! same, but a zero write or discard split at those boundaries can leave partial clusters
//! written as data where an unsplit request makes zero clusters (QEMU's test 204). They
//! are checked (numbers, powers of two where QEMU wants them) and kept in
//! [`Blkdebug::limits`]; this tool does not split requests by them.

use std::sync::Arc;

use qcow2_io::fault::{FaultStorage, IoKind, IoKinds, Rule};
use qcow2_io::{Event, Storage};

/// The prefix of a blkdebug filename.
const PREFIX: &str = "blkdebug:";

/// A parsed blkdebug node: its rules, its image's filename, its request limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blkdebug {
    /// The file below (`image.filename`, or FILE of `blkdebug:CONFIG:FILE`).
    pub image: Option<String>,
    /// The rules, configuration file first, then the option list's, in order.
    pub rules: Vec<Rule>,
    /// The geometry options, as given (`align`, `max-transfer`, ...).
    pub limits: Vec<(String, u64)>,
}

/// Splits `blkdebug:CONFIG:FILE` into `(CONFIG, FILE)`; `None` for other names. CONFIG may
/// be empty (`blkdebug::FILE`).
pub fn split_filename(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PREFIX)?;
    Some(match rest.split_once(':') {
        Some((config, file)) => (config, file),
        None => ("", rest),
    })
}

/// The file a name refers to: FILE of `blkdebug:CONFIG:FILE`, the name itself otherwise.
/// Commands that only read an image's header or probe its format use it: a fresh blkdebug
/// node has no armed rule, so those reads behave as on the file.
pub fn file_of(name: &str) -> &str {
    split_filename(name).map_or(name, |(_, f)| f)
}

impl Blkdebug {
    /// The node of a `blkdebug:CONFIG:FILE` filename (its config file read), or `None`
    /// for any other name.
    pub fn from_filename(name: &str) -> Result<Option<Blkdebug>, String> {
        let Some((config, file)) = split_filename(name) else {
            return Ok(None);
        };
        let mut node = Blkdebug {
            image: Some(file.to_string()),
            ..Blkdebug::default()
        };
        if !config.is_empty() {
            node.read_config(config)?;
        }
        Ok(Some(node))
    }

    /// Reads a blkdebug configuration file and appends its rules.
    pub fn read_config(&mut self, path: &str) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "Could not read blkdebug config file: {}",
                crate::image::strerror(&e)
            )
        })?;
        self.rules.extend(parse_config(&text)?);
        Ok(())
    }

    /// Applies one option of a blkdebug node (the key without the node's prefix):
    /// `config`, `image`/`image.filename`, `inject-error.N.KEY`, the geometry options.
    /// Returns `Ok(false)` for a key blkdebug does not have.
    pub fn apply_option(
        &mut self,
        key: &str,
        value: &str,
        pending: &mut Vec<(String, String, String)>,
    ) -> Result<bool, String> {
        match key {
            "config" => self.read_config(value)?,
            "image" | "image.filename" | "x-image" => self.image = Some(value.to_string()),
            "image.driver" if value == "file" => {}
            "align" | "max-transfer" | "opt-write-zero" | "max-write-zero" | "opt-discard"
            | "max-discard" => {
                let n = crate::size::parse_size(value)
                    .ok()
                    .filter(|n| *n <= u64::from(u32::MAX))
                    .ok_or_else(|| format!("Parameter '{key}' expects a size"))?;
                if key == "align" && n != 0 && !n.is_power_of_two() {
                    return Err("Cannot meet constraints with align".to_string());
                }
                self.limits.push((key.to_string(), n));
            }
            "take-child-perms" | "unshare-child-perms" => {}
            k if k.starts_with("inject-error.") => {
                let rest = &k["inject-error.".len()..];
                let Some((idx, field)) = rest.split_once('.') else {
                    return Ok(false);
                };
                pending.push((idx.to_string(), field.to_string(), value.to_string()));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Turns the collected `inject-error.N.KEY` options into rules, in index order.
    pub fn finish_options(&mut self, pending: Vec<(String, String, String)>) -> Result<(), String> {
        let mut groups: Vec<(u64, Vec<(String, String)>)> = Vec::new();
        for (idx, field, value) in pending {
            let n: u64 = idx
                .parse()
                .map_err(|_| format!("Invalid parameter 'inject-error.{idx}'"))?;
            match groups.iter_mut().find(|(i, _)| *i == n) {
                Some((_, g)) => g.push((field, value)),
                None => groups.push((n, vec![(field, value)])),
            }
        }
        groups.sort_by_key(|(i, _)| *i);
        for (_, g) in groups {
            self.rules.push(rule_from(&g)?);
        }
        Ok(())
    }

    /// Wraps `storage` in the fault layer running this node's rules.
    pub fn wrap(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let fault = FaultStorage::new(storage);
        for r in &self.rules {
            fault.add_rule(*r);
        }
        Arc::new(fault)
    }
}

/// Parses a blkdebug configuration file (QEMU's config-file syntax: `[section]` headers,
/// `key = "value"` lines, `#` comments).
pub fn parse_config(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    let mut section: Option<(String, Vec<(String, String)>)> = None;
    let finish = |s: Option<(String, Vec<(String, String)>)>, rules: &mut Vec<Rule>| match s {
        Some((name, fields)) if name == "inject-error" => {
            rules.push(rule_from(&fields)?);
            Ok(())
        }
        Some((name, _)) if name == "set-state" => {
            Err("blkdebug [set-state] rules are not supported by this tool".to_string())
        }
        Some((name, _)) => Err(format!("There is no option group '{name}'")),
        None => Ok(()),
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(h) = line.strip_prefix('[') {
            let name = h
                .strip_suffix(']')
                .ok_or_else(|| format!("blkdebug config line {}: parse error", n + 1))?;
            let name = name.split_whitespace().next().unwrap_or("").to_string();
            finish(section.take(), &mut rules)?;
            section = Some((name, Vec::new()));
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("blkdebug config line {}: parse error", n + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(|| format!("blkdebug config line {}: parse error", n + 1))?;
        match section.as_mut() {
            Some((_, fields)) => fields.push((k.trim().to_string(), v.to_string())),
            None => return Err(format!("blkdebug config line {}: no group defined", n + 1)),
        }
    }
    finish(section, &mut rules)?;
    Ok(rules)
}

/// One `inject-error` rule from its fields (QEMU's names and defaults: `errno` 5 (EIO),
/// `once` off, `immediately` off, every I/O type, any sector).
fn rule_from(fields: &[(String, String)]) -> Result<Rule, String> {
    let get = |k: &str| {
        fields
            .iter()
            .rev()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.as_str())
    };
    for (k, _) in fields {
        if !matches!(
            k.as_str(),
            "event" | "errno" | "once" | "immediately" | "sector" | "iotype" | "state"
        ) {
            return Err(format!("Invalid parameter '{k}'"));
        }
    }
    let event: Event = get("event")
        .ok_or_else(|| "Missing event name for rule".to_string())?
        .parse()
        .map_err(|e: qcow2_io::UnknownEvent| format!("Invalid event name \"{}\"", e.0))?;
    let bool_opt = |k: &str| -> Result<bool, String> {
        match get(k) {
            None | Some("off") | Some("false") | Some("no") => Ok(false),
            Some("on") | Some("true") | Some("yes") => Ok(true),
            Some(v) => Err(format!("Parameter '{k}' expects 'on' or 'off' (got '{v}')")),
        }
    };
    let num = |k: &str, default: i64| -> Result<i64, String> {
        get(k).map_or(Ok(default), |v| {
            v.parse::<i64>()
                .map_err(|_| format!("Parameter '{k}' expects a number"))
        })
    };
    let errno = num("errno", i64::from(libc::EIO))?;
    let errno =
        i32::try_from(errno).map_err(|_| "Parameter 'errno' is out of range".to_string())?;
    // The initial state is 1 and nothing changes it here: a rule for another state
    // could never fire, and silently never firing would hide a broken test.
    let state = num("state", 0)?;
    if state != 0 && state != 1 {
        return Err(format!(
            "blkdebug rule state {state} is not supported by this tool (no [set-state] rules)"
        ));
    }
    let mut rule = Rule::on_event(event, errno)
        .once(bool_opt("once")?)
        .immediately(bool_opt("immediately")?);
    let sector = num("sector", -1)?;
    if sector >= 0 {
        let at = u64::try_from(sector)
            .ok()
            .and_then(|s| s.checked_mul(512))
            .ok_or_else(|| "Parameter 'sector' is out of range".to_string())?;
        rule = rule.at_offset(at);
    }
    if let Some(t) = get("iotype") {
        let kind = match t {
            "read" => IoKind::Read,
            "write" => IoKind::Write,
            "write-zeroes" => IoKind::WriteZeroes,
            "discard" => IoKind::Discard,
            "flush" => IoKind::Flush,
            other => return Err(format!("Invalid parameter '{other}'")),
        };
        rule = rule.kinds(IoKinds::from(kind));
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_io::MemStorage;

    #[test]
    fn filenames() {
        assert_eq!(
            split_filename("blkdebug:c.conf:t.qcow2"),
            Some(("c.conf", "t.qcow2"))
        );
        assert_eq!(
            split_filename("blkdebug::/x/t.qcow2"),
            Some(("", "/x/t.qcow2"))
        );
        assert_eq!(split_filename("t.qcow2"), None);
        assert_eq!(file_of("blkdebug::a:b"), "a:b");
        assert_eq!(file_of("plain"), "plain");
    }

    #[test]
    fn config_files() {
        let rules = parse_config(
            "# c\n[inject-error]\nevent = \"l2_update\"\nerrno = \"28\"\nonce =\"on\"\n\n[inject-error]\nevent = \"read_aio\"\nsector = \"2\"\niotype = \"read\"\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0], Rule::on_event(Event::L2Update, 28).once(true));
        assert_eq!(
            rules[1],
            Rule::on_event(Event::ReadAio, libc::EIO)
                .at_offset(1024)
                .kinds(IoKinds::READ)
        );
        assert!(parse_config("[inject-error]\nevent = \"nope\"\n").is_err());
        assert!(parse_config("[inject-error]\nerrno = \"5\"\n").is_err());
        assert!(parse_config("[set-state]\nevent = \"l2_load\"\nnew_state = \"2\"\n").is_err());
        assert!(parse_config("event = \"l2_load\"\n").is_err());
        assert!(parse_config("[inject-error]\nevent = l2_load\n").is_err());
    }

    #[test]
    fn rules_fail_requests_after_their_event() {
        let mut node = Blkdebug::default();
        let mut pending = Vec::new();
        assert!(node
            .apply_option("inject-error.0.event", "l2_update", &mut pending)
            .unwrap());
        assert!(node
            .apply_option("inject-error.0.errno", "28", &mut pending)
            .unwrap());
        assert!(node.apply_option("align", "4k", &mut pending).unwrap());
        assert!(!node.apply_option("bogus", "1", &mut pending).unwrap());
        assert!(node.apply_option("align", "3", &mut pending).is_err());
        node.finish_options(pending).unwrap();
        let s = node.wrap(Arc::new(MemStorage::new()));
        s.write_at(&[1; 512], 0).unwrap();
        s.event(Event::L2Update);
        let e = s.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    }
}
