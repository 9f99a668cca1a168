//! The name the program was called by: the single home of the message prefix.
//!
//! QEMU's tools prefix their messages with the name they were invoked as (`basename
//! argv[0]`). One binary answers to several names: called as `qemu-io` it is `qcow2 io`,
//! called as `qemu-nbd` it is `qcow2 serve`, called as `qemu-img` it is `qcow2`; either
//! way its messages start with that name, so that `ln -s qcow2 qemu-io` is a drop-in.
//! Every message prefix goes through [`name`] or [`prefix`].

use std::sync::OnceLock;

/// Which program the binary behaves as, chosen by the basename of `argv[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    /// `qcow2` (and any unknown name): the `qcow2` command with its subcommands.
    Qcow2,
    /// `qemu-img`: the `qcow2` command line, messages prefixed `qemu-img:`.
    QemuImg,
    /// `qemu-io`: `qcow2 io` directly, messages prefixed `qemu-io:`.
    QemuIo,
    /// `qemu-nbd`: `qcow2 serve` directly, messages prefixed `qemu-nbd:`.
    QemuNbd,
}

impl Personality {
    /// The personality for an `argv[0]` (its basename decides).
    pub fn from_argv0(argv0: &str) -> Self {
        match basename(argv0) {
            "qemu-io" => Personality::QemuIo,
            "qemu-img" => Personality::QemuImg,
            "qemu-nbd" => Personality::QemuNbd,
            _ => Personality::Qcow2,
        }
    }

    /// The message prefix's name.
    pub fn name(self) -> &'static str {
        match self {
            Personality::Qcow2 => "qcow2",
            Personality::QemuImg => "qemu-img",
            Personality::QemuIo => "qemu-io",
            Personality::QemuNbd => "qemu-nbd",
        }
    }
}

/// The final component of a path, as `basename(3)` gives it for a program name.
fn basename(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

static PERSONALITY: OnceLock<Personality> = OnceLock::new();

/// Records the personality from `argv[0]` (the first call wins) and returns it.
pub fn init(argv0: &str) -> Personality {
    *PERSONALITY.get_or_init(|| Personality::from_argv0(argv0))
}

/// The current personality (`Qcow2` before [`init`]).
pub fn personality() -> Personality {
    PERSONALITY.get().copied().unwrap_or(Personality::Qcow2)
}

/// The program name messages start with: `qcow2`, `qemu-img` or `qemu-io`.
pub fn name() -> &'static str {
    personality().name()
}

/// `"NAME: "`, the prefix of an error line.
pub fn prefix() -> String {
    format!("{}: ", name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_by_basename() {
        assert_eq!(
            Personality::from_argv0("/usr/bin/qemu-io"),
            Personality::QemuIo
        );
        assert_eq!(Personality::from_argv0("qemu-img"), Personality::QemuImg);
        assert_eq!(
            Personality::from_argv0("./target/debug/qcow2"),
            Personality::Qcow2
        );
        assert_eq!(Personality::from_argv0("weird"), Personality::Qcow2);
        assert_eq!(Personality::from_argv0(""), Personality::Qcow2);
        assert_eq!(Personality::QemuIo.name(), "qemu-io");
        assert_eq!(
            Personality::from_argv0("/usr/bin/qemu-nbd"),
            Personality::QemuNbd
        );
        assert_eq!(Personality::QemuNbd.name(), "qemu-nbd");
    }
}
