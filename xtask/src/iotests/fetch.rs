//! Obtaining QEMU's iotests for the installed qemu-utils release, with apt's own client.
//!
//! The tests are GPL files of QEMU's source: they are downloaded into a cache outside the
//! repository and never committed. The release is the installed `qemu-utils` package's
//! (`dpkg-query`), so the tests judge the same QEMU that the rest of our test suite compares
//! against. The download goes through a throw-away apt configuration (its own source list,
//! list directory and archive cache under the cache directory) whose `deb-src` entries are
//! derived from the machine's own apt sources, plus the suite the package came from
//! (`<codename>-backports` for a `~bpo` version). apt verifies the files against the signed
//! index; we check the orig tarball's SHA-256 against apt's own record once more because it
//! is the only file we use.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The source package the tests come from.
const SOURCE_PACKAGE: &str = "qemu";
/// The binary package whose version decides the release.
const BINARY_PACKAGE: &str = "qemu-utils";

/// An unpacked test suite.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The Debian version of the installed qemu-utils (and of the source package).
    pub version: String,
    /// `.../tests/qemu-iotests`, where QEMU's `check` script lives.
    pub iotests: PathBuf,
}

/// The cache directory: `$QCOW2_IOTESTS_CACHE`, else `$XDG_CACHE_HOME/qcow2-iotests`, else
/// `~/.cache/qcow2-iotests`.
pub fn cache_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("QCOW2_IOTESTS_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("qcow2-iotests"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("qcow2-iotests")),
        None => Err("neither QCOW2_IOTESTS_CACHE, XDG_CACHE_HOME nor HOME is set".to_string()),
    }
}

/// Returns the unpacked suite for the installed qemu-utils, downloading and unpacking it
/// into `cache` the first time.
pub fn obtain(cache: &Path) -> Result<Suite, String> {
    let version = installed_version()?;
    let upstream = upstream_version(&version)
        .ok_or_else(|| format!("cannot read the upstream part of version '{version}'"))?;
    let dir = cache.join(sanitize(&version));
    let stamp = dir.join("unpacked");
    if let Ok(rel) = fs::read_to_string(&stamp) {
        let iotests = dir.join("src").join(rel.trim());
        if iotests.join("check").is_file() {
            return Ok(Suite { version, iotests });
        }
    }

    eprintln!(
        "== obtaining QEMU's iotests for {BINARY_PACKAGE} {version} (cached in {})",
        dir.display()
    );
    let apt = AptConfig::create(&cache.join("apt"), &version)?;
    apt.run(&["update", "-q"], cache)?;

    let download = dir.join("download");
    fs::create_dir_all(&download).map_err(|e| io_err("create", &download, e))?;
    let spec = format!("{SOURCE_PACKAGE}={version}");
    let orig = orig_tarball(&apt, &download, &spec, upstream)?;
    let tarball = download.join(&orig.name);
    if !sha256_matches(&tarball, &orig.sha256)? {
        // A missing or stale file: let apt fetch the source package. Debian's mirror may
        // refuse a file that the orig tarball does not need (the .dsc of a superseded
        // backport): only the orig tarball's checksum decides.
        let status = apt.run(&["source", "--download-only", "-q", &spec], &download);
        if !sha256_matches(&tarball, &orig.sha256)? {
            return Err(match status {
                Err(e) => e,
                Ok(()) => format!("{} does not match apt's SHA-256", tarball.display()),
            });
        }
        if let Err(e) = status {
            eprintln!("   (ignored: {e}; the orig tarball is complete and verified)");
        }
    }

    let top = tar_top_dir(&tarball)?;
    let src = dir.join("src");
    if src.exists() {
        fs::remove_dir_all(&src).map_err(|e| io_err("remove", &src, e))?;
    }
    fs::create_dir_all(&src).map_err(|e| io_err("create", &src, e))?;
    let member = format!("{top}/tests/qemu-iotests");
    eprintln!("== unpacking {member} from {}", orig.name);
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg(&member)
        .status()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !status.success() {
        return Err(format!(
            "tar could not unpack {member} from {}",
            tarball.display()
        ));
    }
    let rel = format!("{top}/tests/qemu-iotests");
    let iotests = src.join(&rel);
    if !iotests.join("check").is_file() {
        return Err(format!("{} has no check script", iotests.display()));
    }
    fs::write(&stamp, format!("{rel}\n")).map_err(|e| io_err("write", &stamp, e))?;
    Ok(Suite { version, iotests })
}

/// The installed qemu-utils version, as dpkg records it.
fn installed_version() -> Result<String, String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", BINARY_PACKAGE])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run dpkg-query: {e}"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        return Err(format!(
            "{BINARY_PACKAGE} is not installed (apt-get install {BINARY_PACKAGE})"
        ));
    }
    Ok(v)
}

/// The upstream part of a Debian version: no epoch, no Debian revision
/// (`1:10.0.2+ds-2+deb13u1~bpo12+1` → `10.0.2+ds`).
fn upstream_version(version: &str) -> Option<&str> {
    let no_epoch = version.split_once(':').map_or(version, |(_, v)| v);
    let upstream = no_epoch.rsplit_once('-').map_or(no_epoch, |(u, _)| u);
    (!upstream.is_empty()).then_some(upstream)
}

/// A version as a directory name.
fn sanitize(version: &str) -> String {
    version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

/// The throw-away apt configuration: every directory apt writes to is under `root`.
struct AptConfig {
    options: Vec<String>,
}

impl AptConfig {
    /// Writes the derived source list under `root` and returns the options that make apt
    /// use it (and only it).
    fn create(root: &Path, version: &str) -> Result<Self, String> {
        let parts = root.join("sources.list.d");
        let lists = root.join("lists");
        let cache = root.join("cache");
        for d in [
            &parts,
            &lists.join("partial"),
            &cache.join("archives").join("partial"),
        ] {
            fs::create_dir_all(d).map_err(|e| io_err("create", d, e))?;
        }
        let codename = os_codename()?;
        let sources = derive_sources(&machine_sources()?, &codename, version);
        if sources.is_empty() {
            return Err(format!(
                "no apt source of the machine lists the '{codename}' suites (looked in /etc/apt/sources.list and /etc/apt/sources.list.d/*.sources)"
            ));
        }
        let file = parts.join("qemu-src.sources");
        fs::write(&file, sources).map_err(|e| io_err("write", &file, e))?;
        let opt = |k: &str, v: &Path| format!("-o{k}={}", v.display());
        Ok(AptConfig {
            options: vec![
                "-oDir::Etc::sourcelist=/dev/null".to_string(),
                opt("Dir::Etc::sourceparts", &parts),
                opt("Dir::State::Lists", &lists),
                opt("Dir::Cache", &cache),
                // The lists and downloads are ours, not the system's: no system lock, and
                // no switch to the `_apt` user, who cannot write to a home directory.
                "-oDebug::NoLocking=1".to_string(),
                "-oAPT::Sandbox::User=root".to_string(),
            ],
        })
    }

    /// Runs `apt-get ARGS` in `dir` with this configuration; output goes to the terminal.
    fn run(&self, args: &[&str], dir: &Path) -> Result<(), String> {
        let status = Command::new("apt-get")
            .args(&self.options)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {} failed ({status})", args.join(" ")))
        }
    }

    /// `apt-get ARGS` in `dir`, returning its standard output.
    fn output(&self, args: &[&str], dir: &Path) -> Result<String, String> {
        let out = Command::new("apt-get")
            .args(&self.options)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "apt-get {} failed ({})",
                args.join(" "),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// One file of a source package as `apt-get source --print-uris` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SourceFile {
    name: String,
    sha256: String,
}

/// The orig tarball of `spec`, from apt's list of the source package's files (asked in an
/// empty directory, because apt leaves out files already present).
fn orig_tarball(
    apt: &AptConfig,
    download: &Path,
    spec: &str,
    upstream: &str,
) -> Result<SourceFile, String> {
    let probe = download.join("uris");
    if probe.exists() {
        fs::remove_dir_all(&probe).map_err(|e| io_err("remove", &probe, e))?;
    }
    fs::create_dir_all(&probe).map_err(|e| io_err("create", &probe, e))?;
    let listing = apt.output(&["source", "--print-uris", "-qq", spec], &probe)?;
    let _ = fs::remove_dir_all(&probe);
    let prefix = format!("{SOURCE_PACKAGE}_{upstream}.orig.tar.");
    parse_print_uris(&listing)
        .into_iter()
        .find(|f| f.name.starts_with(&prefix))
        .ok_or_else(|| format!("apt lists no {prefix}* for {spec}"))
}

/// Parses `'URI' NAME SIZE SHA256:HEX` lines.
fn parse_print_uris(listing: &str) -> Vec<SourceFile> {
    listing
        .lines()
        .filter(|l| l.starts_with('\''))
        .filter_map(|l| {
            let mut it = l.split_whitespace().skip(1);
            let name = it.next()?.to_string();
            let _size = it.next()?;
            let sha256 = it.next()?.strip_prefix("SHA256:")?.to_ascii_lowercase();
            Some(SourceFile { name, sha256 })
        })
        .collect()
}

/// Whether `path` exists and its SHA-256 is `want` (lower-case hex).
fn sha256_matches(path: &Path, want: &str) -> Result<bool, String> {
    if !path.is_file() {
        return Ok(false);
    }
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    if !out.status.success() {
        return Err(format!("sha256sum {} failed", path.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next() == Some(want))
}

/// The first path component of a tarball's first member (`qemu-10.0.2`).
fn tar_top_dir(tarball: &Path) -> Result<String, String> {
    let mut child = Command::new("tar")
        .arg("-tf")
        .arg(tarball)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let mut first = String::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(out).read_line(&mut first);
    }
    // The rest of the listing is not needed: stop tar rather than read 40 MB of names.
    let _ = child.kill();
    let _ = child.wait();
    let top = first.trim().split('/').next().unwrap_or("").to_string();
    if top.is_empty() || top == "." || top == ".." {
        return Err(format!("cannot list {}", tarball.display()));
    }
    Ok(top)
}

/// `VERSION_CODENAME` from /etc/os-release.
fn os_codename() -> Result<String, String> {
    let text = fs::read_to_string("/etc/os-release")
        .map_err(|e| format!("cannot read /etc/os-release: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| "/etc/os-release has no VERSION_CODENAME".to_string())
}

/// One apt source: where, which suites, which components, and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

/// The machine's binary-package sources: deb822 `.sources` files and one-line
/// `sources.list` entries.
fn machine_sources() -> Result<Vec<Source>, String> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        out.extend(parse_one_line(&text));
    }
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = match f.extension().and_then(|e| e.to_str()) {
                Some("sources") | Some("list") => {
                    fs::read_to_string(&f).map_err(|e| io_err("read", &f, e))?
                }
                _ => continue,
            };
            if f.extension().is_some_and(|e| e == "sources") {
                out.extend(parse_deb822(&text));
            } else {
                out.extend(parse_one_line(&text));
            }
        }
    }
    Ok(out)
}

/// Parses deb822 stanzas; keeps enabled ones of type `deb`.
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // A continuation line (a multi-line value such as an inline key).
                if let Some(last) = fields.last_mut() {
                    last.1.push('\n');
                    last.1.push_str(line);
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        let words = |k: &str| {
            get(k)
                .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        if !words("types").iter().any(|t| t == "deb") {
            continue;
        }
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        let src = Source {
            uris: words("uris"),
            suites: words("suites"),
            components: words("components"),
            signed_by: get("signed-by"),
        };
        if !src.uris.is_empty() && !src.suites.is_empty() {
            out.push(src);
        }
    }
    out
}

/// Parses one-line `deb [options] URI SUITE COMPONENT...` entries.
fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim_start();
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() < 2 {
            continue;
        }
        out.push(Source {
            uris: vec![words[0].to_string()],
            suites: vec![words[1].to_string()],
            components: words[2..].iter().map(|s| s.to_string()).collect(),
            signed_by,
        });
    }
    out
}

/// The `deb-src` stanzas for the throw-away configuration: the machine's sources of the
/// distribution (suites named `codename` or `codename-*`), with the backports suite added
/// when the installed version is a backport (`~bpo`), so that apt finds that exact source.
fn derive_sources(sources: &[Source], codename: &str, version: &str) -> String {
    let backports = format!("{codename}-backports");
    let want_backports = version.contains("~bpo");
    let mut out = String::new();
    for s in sources {
        let ours = |suite: &str| suite == codename || suite.starts_with(&format!("{codename}-"));
        if !s.suites.iter().any(|x| ours(x)) {
            continue;
        }
        let mut suites: Vec<String> = s.suites.iter().filter(|x| ours(x)).cloned().collect();
        if want_backports && suites.iter().any(|x| x == codename) && !suites.contains(&backports) {
            suites.push(backports.clone());
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str("Types: deb-src\n");
        out.push_str(&format!("URIs: {}\n", s.uris.join(" ")));
        out.push_str(&format!("Suites: {}\n", suites.join(" ")));
        if !s.components.is_empty() {
            out.push_str(&format!("Components: {}\n", s.components.join(" ")));
        }
        if let Some(k) = &s.signed_by {
            out.push_str(&format!("Signed-By: {k}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_versions() {
        assert_eq!(
            upstream_version("1:10.0.2+ds-2+deb13u1~bpo12+1"),
            Some("10.0.2+ds")
        );
        assert_eq!(upstream_version("7.2+dfsg-7"), Some("7.2+dfsg"));
        assert_eq!(upstream_version("2:1.0"), Some("1.0"));
        assert_eq!(upstream_version(""), None);
        assert_eq!(sanitize("1:10.0.2+ds-2~bpo12+1"), "1_10.0.2+ds-2_bpo12+1");
    }

    #[test]
    fn deb822_sources_become_deb_src_with_backports() {
        let text = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n\nTypes: deb\nEnabled: no\nURIs: http://x\nSuites: bookworm\n";
        let parsed = parse_deb822(text);
        assert_eq!(parsed.len(), 2, "the disabled stanza is dropped");
        let out = derive_sources(&parsed, "bookworm", "1:10.0.2+ds-2+deb13u1~bpo12+1");
        assert_eq!(
            out,
            "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        // Not a backport: the suites stay as they are.
        let plain = derive_sources(&parsed, "bookworm", "1:7.2+dfsg-7+deb12u18");
        assert!(plain.contains("Suites: bookworm bookworm-updates\n"));
    }

    #[test]
    fn one_line_sources() {
        let text = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\ndeb-src http://m/debian bookworm main\ndeb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";
        let parsed = parse_one_line(text);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(parsed[0].components, vec!["main", "contrib"]);
        let out = derive_sources(&parsed, "bookworm", "1:10.0.2~bpo12+1");
        assert!(out.contains("URIs: http://m/debian\nSuites: bookworm bookworm-backports\n"));
        assert!(!out.contains("google"), "{out}");
    }

    #[test]
    fn print_uris_lines() {
        let listing = "Need to get 40 MB of source archives.\n'http://h/q_1.dsc' qemu_10.0.2+ds-2.dsc 11887 SHA256:A9EE\n'http://h/o' qemu_10.0.2+ds.orig.tar.xz 39449628 SHA256:ab12\nbad line\n";
        let files = parse_print_uris(listing);
        assert_eq!(
            files,
            vec![
                SourceFile {
                    name: "qemu_10.0.2+ds-2.dsc".into(),
                    sha256: "a9ee".into()
                },
                SourceFile {
                    name: "qemu_10.0.2+ds.orig.tar.xz".into(),
                    sha256: "ab12".into()
                },
            ]
        );
    }
}
