//! `qcow2 convert`'s options beyond format and compression against `qemu-img convert` on
//! the same images: `-B`/`-F`, `-n` and `--target-is-zero`, `-S`, `-l`, `-m`/`-W`, `-t`/`-T`,
//! `-C`, `--salvage`, `-r`, and several sources; messages and exit codes, the target's map
//! (host offsets dropped where QEMU's are not deterministic), `qemu-img compare` of the
//! targets and `qemu-img check` of ours.

mod common;

use common::{have_qemu, map_json, ok, qemu_img, qemu_io, same_output, Pair};
use std::path::Path;

fn io(d: &Path, file: &str, cmds: &[&str]) {
    let mut a: Vec<&str> = Vec::new();
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(file);
    ok(qemu_io(d, &a));
}

/// base.qcow2 <- top.qcow2 (4 KiB clusters, 16 MiB): top holds data equal to the base's,
/// other data, a zero cluster, data that is all zeros, and data beyond the base's; the
/// base has an internal snapshot `sn1`; t.raw is a raw image.
fn fixtures(d: &Path) {
    let img = |args: &str| ok(qemu_img(d, &args.split(' ').collect::<Vec<_>>()));
    img("create -q -f qcow2 -o cluster_size=4k base.qcow2 16M");
    io(d, "base.qcow2", &["write -P 1 0 4M"]);
    img("snapshot -c sn1 base.qcow2");
    io(d, "base.qcow2", &["write -P 5 0 64k"]);
    img("create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 top.qcow2");
    io(
        d,
        "top.qcow2",
        &[
            "write -P 5 0 64k",
            "write -P 2 1M 64k",
            "write -z 2M 64k",
            "write -P 0 3M 64k",
            "write -P 3 10M 64k",
        ],
    );
    img("create -q -f raw t.raw 1M");
    io(d, "t.raw", &["write -P 7 4k 8k"]);
}

/// A pair of directories with the fixtures (made by QEMU in each: deterministic without
/// compressed clusters, and raw holes survive).
fn pair() -> Pair {
    let p = Pair::new();
    fixtures(&p.qemu());
    fixtures(&p.ours());
    p
}

/// Both targets read the same (through their backing files, if any).
fn assert_same_contents(p: &Pair, file: &str) {
    let a = p.ours().join(file);
    let b = p.qemu().join(file);
    let r = qemu_img(
        p.root.path(),
        &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{file}: {r:?}");
}

#[test]
fn convert_options_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    // (arguments, target written, QEMU's target layout deterministic)
    let cases: &[(&str, Option<&str>, bool)] = &[
        (
            "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2 o.qcow2",
            Some("o.qcow2"),
            true,
        ),
        ("-O qcow2 -B base.qcow2 top.qcow2 o.qcow2", None, true),
        ("-O raw -B base.qcow2 -F qcow2 top.qcow2 o.raw", None, true),
        (
            "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2 t.raw o.qcow2",
            None,
            true,
        ),
        ("-O qcow2 -S 0 top.qcow2 o.qcow2", Some("o.qcow2"), true),
        ("-O qcow2 -S 64k top.qcow2 o.qcow2", Some("o.qcow2"), true),
        ("-O raw -S 8k t.raw o.raw", Some("o.raw"), true),
        ("-O qcow2 -S abc top.qcow2 o.qcow2", None, true),
        ("-O qcow2 -S 1000 top.qcow2 o.qcow2", None, true),
        ("-m 17 -O qcow2 top.qcow2 o.qcow2", None, true),
        ("-m 4 -W -O qcow2 top.qcow2 o.qcow2", Some("o.qcow2"), false),
        ("-C -c -O qcow2 top.qcow2 o.qcow2", None, true),
        ("-C -O qcow2 top.qcow2 o.qcow2", Some("o.qcow2"), true),
        ("--target-is-zero -O qcow2 top.qcow2 o.qcow2", None, true),
        ("-r abc -O qcow2 top.qcow2 o.qcow2", None, true),
        ("-r 1G -O qcow2 top.qcow2 o.qcow2", Some("o.qcow2"), true),
        ("-l sn1 -O qcow2 base.qcow2 o.qcow2", Some("o.qcow2"), true),
        (
            "-l snapshot.name=sn1 -O qcow2 base.qcow2 o.qcow2",
            Some("o.qcow2"),
            true,
        ),
        ("-l nope -O qcow2 base.qcow2 o.qcow2", None, true),
        ("-l sn1 -O qcow2 base.qcow2 base.qcow2 o.qcow2", None, true),
        ("-l sn1 -O qcow2 t.raw o.qcow2", None, true),
        ("-t bogus -O qcow2 top.qcow2 o.qcow2", Some("o.qcow2"), true),
        ("-T bogus -O qcow2 top.qcow2 o.qcow2", None, true),
        (
            "-t none -T writeback -O qcow2 top.qcow2 o.qcow2",
            Some("o.qcow2"),
            true,
        ),
        (
            "-O qcow2 top.qcow2 t.raw top.qcow2 o.qcow2",
            Some("o.qcow2"),
            true,
        ),
        ("-n -O qcow2 top.qcow2 nonexist.qcow2", None, true),
    ];
    for &(a, target, deterministic) in cases {
        let p = pair();
        let mut argv = vec!["convert"];
        argv.extend(a.split(' '));
        let (ours, qemu) = p.both(&argv);
        same_output(&ours, &qemu, a);
        if let Some(t) = target {
            assert_same_contents(&p, t);
            if t.ends_with(".qcow2") {
                assert_eq!(
                    map_json(&p.ours(), t, deterministic),
                    map_json(&p.qemu(), t, deterministic),
                    "{a}"
                );
                ok(qemu_img(&p.ours(), &["check", t]));
            } else {
                assert_eq!(
                    map_json(&p.ours(), t, true),
                    map_json(&p.qemu(), t, true),
                    "{a}"
                );
            }
        }
    }
}

#[test]
fn convert_into_existing_targets_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    for zero in [false, true] {
        let p = pair();
        for d in [p.ours(), p.qemu()] {
            // An existing target full of other data (or, for --target-is-zero, empty).
            ok(qemu_img(
                &d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=4k",
                    "ex.qcow2",
                    "16M",
                ],
            ));
            if !zero {
                io(&d, "ex.qcow2", &["write -P 9 0 16M"]);
            }
            ok(qemu_img(
                &d,
                &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"],
            ));
        }
        let mut argv = vec!["convert", "-n"];
        if zero {
            argv.push("--target-is-zero");
        }
        argv.extend(["-O", "qcow2", "top.qcow2", "ex.qcow2"]);
        let (ours, qemu) = p.both(&argv);
        same_output(&ours, &qemu, "convert -n");
        assert_same_contents(&p, "ex.qcow2");
        assert_eq!(
            map_json(&p.ours(), "ex.qcow2", true),
            map_json(&p.qemu(), "ex.qcow2", true)
        );
        ok(qemu_img(&p.ours(), &["check", "ex.qcow2"]));
        let (ours, qemu) = p.both(&["convert", "-n", "-O", "qcow2", "top.qcow2", "small.qcow2"]);
        same_output(&ours, &qemu, "convert -n into a smaller target");
        assert_eq!(ours.code, 1);
    }
}

#[test]
fn salvage_turns_unreadable_sectors_into_zeros_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let p = pair();
    for d in [p.ours(), p.qemu()] {
        ok(qemu_img(
            &d,
            &["create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
        ));
        io(&d, "c.qcow2", &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
        // Garble the compressed cluster (the first cluster after the L2 table): reading
        // it then fails with EIO in both tools.
        let m = qemu_img(&d, &["map", "--output=json", "c.qcow2"]);
        assert!(m.stdout.contains("\"compressed\": true"), "{m:?}");
        let path = d.join("c.qcow2");
        let mut bytes = std::fs::read(&path).unwrap();
        let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
            as usize;
        let entry = u64::from_be_bytes(bytes[l2 + 16 * 8..l2 + 17 * 8].try_into().unwrap());
        // 64 KiB clusters: the host offset takes the low 54 bits of a compressed entry.
        let host = (entry & ((1 << 54) - 1)) as usize;
        bytes[host..host + 64].fill(0xff);
        std::fs::write(&path, bytes).unwrap();
    }
    for salvage in [false, true] {
        let mut argv = vec!["convert"];
        if salvage {
            argv.push("--salvage");
        }
        argv.extend(["-O", "qcow2", "c.qcow2", "o.qcow2"]);
        let (ours, qemu) = p.both(&argv);
        same_output(&ours, &qemu, "salvage");
        if salvage {
            assert_eq!(ours.code, 0);
            assert_same_contents(&p, "o.qcow2");
        }
    }
}
