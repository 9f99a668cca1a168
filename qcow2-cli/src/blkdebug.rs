//! QEMU's `blkdebug` error injection on the image file: `blkdebug:CONFIG:FILE` filenames,
//! blkdebug configuration files (`[inject-error]` sections) and the `inject-error.N.*`
//! options of an option list.
//!
//! The rules run in [`qcow2_io::fault::FaultStorage`], which keeps blkdebug's semantics (an
//! event arms its rules, the next targeted request fails, `once` removes the rule). The
//! engine reports its I/O events under QEMU's names, so a configuration written for QEMU
//! arms at the same points. blkdebug's state machine (`[set-state]` rules, `state` on
//! rules; the node starts in state 1) is [`Stateful`], a layer that lets the fault layer
//! hold exactly the rules of the current state. Not here: request suspension
//! (`break`/`resume`).
//!
//! blkdebug's geometry options (`align`, `max-transfer`, `opt-write-zero`, ...) shape how
//! QEMU's block layer splits requests above blkdebug. The bytes read and written are the
//! same, but a zero write or discard split at those boundaries can leave partial clusters
//! written as data where an unsplit request makes zero clusters (QEMU's test 204). They
//! are checked (numbers, powers of two where QEMU wants them) and kept in
//! [`Blkdebug::limits`]; this tool does not split requests by them.

use std::io;
use std::sync::{Arc, Mutex};

use qcow2_io::fault::{FaultStorage, IoKind, IoKinds, Rule, RuleId};
use qcow2_io::{Event, Storage};

/// The prefix of a blkdebug filename.
const PREFIX: &str = "blkdebug:";

/// An `inject-error` rule and the state it belongs to (0: every state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectRule {
    /// The rule.
    pub rule: Rule,
    /// `state`.
    pub state: i64,
}

/// A `set-state` rule: at `event`, in `state` (0: any), the node moves to `new_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetState {
    /// `event`.
    pub event: Event,
    /// `state`.
    pub state: i64,
    /// `new_state`.
    pub new_state: i64,
}

/// A parsed blkdebug node: its rules, its image's filename, its request limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blkdebug {
    /// The file below (`image.filename`, or FILE of `blkdebug:CONFIG:FILE`).
    pub image: Option<String>,
    /// The `inject-error` rules, configuration file first, then the option list's.
    pub rules: Vec<InjectRule>,
    /// The `set-state` rules, in the same order.
    pub set_states: Vec<SetState>,
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
        let (rules, set_states) = parse_config(&text)?;
        self.rules.extend(rules);
        self.set_states.extend(set_states);
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
            k if k.starts_with("inject-error.") || k.starts_with("set-state.") => {
                let (group, rest) = k.split_once('.').unwrap_or((k, ""));
                let Some((idx, field)) = rest.split_once('.') else {
                    return Ok(false);
                };
                pending.push((
                    format!("{group}.{idx}"),
                    field.to_string(),
                    value.to_string(),
                ));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Turns the collected `inject-error.N.KEY` and `set-state.N.KEY` options into
    /// rules, in index order.
    pub fn finish_options(&mut self, pending: Vec<(String, String, String)>) -> Result<(), String> {
        // ((is set-state, index), fields)
        type Group = ((bool, u64), Vec<(String, String)>);
        let mut groups: Vec<Group> = Vec::new();
        for (group, field, value) in pending {
            let (name, idx) = group.split_once('.').unwrap_or((&group, ""));
            let n: u64 = idx
                .parse()
                .map_err(|_| format!("Invalid parameter '{group}'"))?;
            let key = (name == "set-state", n);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push((field, value)),
                None => groups.push((key, vec![(field, value)])),
            }
        }
        groups.sort_by_key(|(k, _)| *k);
        for ((set_state, _), g) in groups {
            if set_state {
                self.set_states.push(set_state_from(&g)?);
            } else {
                self.rules.push(rule_from(&g)?);
            }
        }
        Ok(())
    }

    /// Wraps `storage` in the fault layer running this node's rules (and its state
    /// machine, when it has one).
    pub fn wrap(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let fault = Arc::new(FaultStorage::new(storage));
        if self.set_states.is_empty() && self.rules.iter().all(|r| r.state == 0) {
            for r in &self.rules {
                fault.add_rule(r.rule);
            }
            return fault;
        }
        Arc::new(Stateful::new(fault, &self.rules, &self.set_states))
    }
}

/// Parses a blkdebug configuration file (QEMU's config-file syntax: `[section]` headers,
/// `key = "value"` lines, `#` comments).
pub fn parse_config(text: &str) -> Result<(Vec<InjectRule>, Vec<SetState>), String> {
    let mut rules = Vec::new();
    let mut set_states = Vec::new();
    let mut section: Option<(String, Vec<(String, String)>)> = None;
    let mut finish = |s: Option<(String, Vec<(String, String)>)>| match s {
        Some((name, fields)) if name == "inject-error" => {
            rules.push(rule_from(&fields)?);
            Ok(())
        }
        Some((name, fields)) if name == "set-state" => {
            set_states.push(set_state_from(&fields)?);
            Ok(())
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
            finish(section.take())?;
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
    finish(section)?;
    Ok((rules, set_states))
}

/// The value of field `k` (the last one given).
fn field<'a>(fields: &'a [(String, String)], k: &str) -> Option<&'a str> {
    fields
        .iter()
        .rev()
        .find(|(f, _)| f == k)
        .map(|(_, v)| v.as_str())
}

/// A numeric field, `default` when absent.
fn number(fields: &[(String, String)], k: &str, default: i64) -> Result<i64, String> {
    field(fields, k).map_or(Ok(default), |v| {
        v.parse::<i64>()
            .map_err(|_| format!("Parameter '{k}' expects a number"))
    })
}

/// The `event` field.
fn event_of(fields: &[(String, String)]) -> Result<Event, String> {
    field(fields, "event")
        .ok_or_else(|| "Missing event name for rule".to_string())?
        .parse()
        .map_err(|e: qcow2_io::UnknownEvent| format!("Invalid event name \"{}\"", e.0))
}

/// One `set-state` rule from its fields (`state` 0: any state).
fn set_state_from(fields: &[(String, String)]) -> Result<SetState, String> {
    for (k, _) in fields {
        if !matches!(k.as_str(), "event" | "state" | "new_state") {
            return Err(format!("Invalid parameter '{k}'"));
        }
    }
    Ok(SetState {
        event: event_of(fields)?,
        state: number(fields, "state", 0)?,
        new_state: number(fields, "new_state", 0)?,
    })
}

/// One `inject-error` rule from its fields (QEMU's names and defaults: `errno` 5 (EIO),
/// `once` off, `immediately` off, every I/O type, any sector, any state).
fn rule_from(fields: &[(String, String)]) -> Result<InjectRule, String> {
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
    let state = num("state", 0)?;
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
    Ok(InjectRule { rule, state })
}

/// blkdebug's state machine over the fault layer: the fault layer holds the rules of
/// every state and those of the current one, so an event arms exactly the rules QEMU's
/// `process_rule` would; after the event the `set-state` rules move the state (the last
/// matching one wins) and the layer's rules follow. A rule already armed stays armed
/// across the change (QEMU's active list is not reset by a state change), and a `once`
/// rule that fired is gone for good.
pub struct Stateful {
    fault: Arc<FaultStorage<Arc<dyn Storage>>>,
    table: Mutex<StateTable>,
}

struct StateTable {
    state: i64,
    /// Rules of a particular state, with their id in the fault layer while registered;
    /// `None` in the second slot once a `once` rule fired.
    rules: Vec<(InjectRule, Option<Option<RuleId>>)>,
    set_states: Vec<SetState>,
}

impl Stateful {
    fn new(
        fault: Arc<FaultStorage<Arc<dyn Storage>>>,
        rules: &[InjectRule],
        set_states: &[SetState],
    ) -> Self {
        let mut stateful = Vec::new();
        for r in rules {
            if r.state == 0 {
                fault.add_rule(r.rule);
            } else {
                stateful.push((*r, Some(None)));
            }
        }
        let mut table = StateTable {
            state: 1,
            rules: stateful,
            set_states: set_states.to_vec(),
        };
        Self::sync(&fault, &mut table);
        Stateful {
            fault,
            table: Mutex::new(table),
        }
    }

    /// Registers the rules of the current state and unregisters the others (unless armed).
    fn sync(fault: &FaultStorage<Arc<dyn Storage>>, t: &mut StateTable) {
        let live: Vec<RuleId> = fault.rules().into_iter().map(|(id, _)| id).collect();
        for (r, slot) in &mut t.rules {
            let Some(reg) = slot else { continue };
            if let Some(id) = *reg {
                if !live.contains(&id) {
                    // A once rule that fired: never again.
                    *slot = None;
                    continue;
                }
            }
            let want = r.state == t.state;
            match *reg {
                None if want => *reg = Some(fault.add_rule(r.rule)),
                Some(id) if !want && !fault.is_armed(id) => {
                    fault.remove_rule(id);
                    *reg = None;
                }
                _ => {}
            }
        }
    }
}

impl Storage for Stateful {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fault.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fault.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.fault.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.fault.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fault.set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fault.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fault.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fault.allocate(offset, len)
    }
    fn zero_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.fault.zero_fast(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.fault.prefetch(offset, len)
    }
    fn data_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.fault.data_status(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.fault.allocated_size()
    }
    fn event(&self, event: Event) {
        // The rules of the current state arm first; the state moves after the event.
        self.fault.event(event);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let cur = t.state;
        let new = t
            .set_states
            .iter()
            .rev()
            .find(|s| s.event == event && (s.state == 0 || s.state == cur))
            .map(|s| s.new_state)
            .unwrap_or(cur);
        if new != cur {
            t.state = new;
            Self::sync(&self.fault, &mut t);
        }
    }
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
        let (rules, set_states) = parse_config(
            "# c\n[inject-error]\nevent = \"l2_update\"\nerrno = \"28\"\nonce =\"on\"\n\n[set-state]\nevent = \"l2_load\"\nnew_state = \"2\"\n[inject-error]\nevent = \"read_aio\"\nsector = \"2\"\niotype = \"read\"\nstate = \"2\"\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0],
            InjectRule {
                rule: Rule::on_event(Event::L2Update, 28).once(true),
                state: 0
            }
        );
        assert_eq!(
            rules[1],
            InjectRule {
                rule: Rule::on_event(Event::ReadAio, libc::EIO)
                    .at_offset(1024)
                    .kinds(IoKinds::READ),
                state: 2
            }
        );
        assert_eq!(
            set_states,
            vec![SetState {
                event: Event::L2Load,
                state: 0,
                new_state: 2
            }]
        );
        assert!(parse_config("[inject-error]\nevent = \"nope\"\n").is_err());
        assert!(parse_config("[inject-error]\nerrno = \"5\"\n").is_err());
        assert!(parse_config("[set-state]\nnew_state = \"2\"\n").is_err());
        assert!(parse_config("[frob]\nevent = \"l2_load\"\n").is_err());
        assert!(parse_config("event = \"l2_load\"\n").is_err());
        assert!(parse_config("[inject-error]\nevent = l2_load\n").is_err());
    }

    #[test]
    fn states_gate_rules() {
        // QEMU's test 066: the first write_aio moves to state 2, where a write_aio arms
        // the error: a second write request after a second event fails.
        let mut node = Blkdebug::default();
        let mut pending = Vec::new();
        for (k, v) in [
            ("set-state.0.event", "write_aio"),
            ("set-state.0.new_state", "2"),
            ("inject-error.0.event", "write_aio"),
            ("inject-error.0.state", "2"),
        ] {
            assert!(node.apply_option(k, v, &mut pending).unwrap());
        }
        node.finish_options(pending).unwrap();
        let s = node.wrap(Arc::new(MemStorage::new()));
        s.event(Event::WriteAio);
        s.write_at(&[1; 512], 0).unwrap();
        s.event(Event::WriteAio);
        let e = s.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // Not once: it keeps failing.
        assert!(s.write_at(&[1; 512], 0).is_err());
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
