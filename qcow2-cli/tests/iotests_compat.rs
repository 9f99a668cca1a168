//! Behaviours QEMU's own iotests depend on (`cargo xtask iotests`), each checked here
//! against QEMU's tools on a small case: blkdebug error injection on the image file
//! (`blkdebug:CONFIG:FILE`, `file.driver=blkdebug` option lists, blkdebug above the format),
//! and qemu-img's standard output buffered as C stdio buffers it (errors first in a merged
//! stream).

mod common;

use std::path::Path;

use common::have_qemu;
use common::qemu_io_setup::{c_args, Setup};

/// A blkdebug configuration failing the first request after the event, with `errno`.
fn conf(event: &str, errno: u32, once: bool) -> String {
    format!(
        "[inject-error]\nevent = \"{event}\"\nerrno = \"{errno}\"\nonce = \"{}\"\n",
        if once { "on" } else { "off" }
    )
}

#[test]
fn blkdebug_filenames_inject_errors_at_engine_events() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // An allocating write reports cluster_alloc, refblock_load and write_aio; each fails
    // the next request after it. (Failures of the L1/L2 updates themselves, and rules
    // left armed for the close, end differently: the engine leaks the new clusters and
    // reports the close, where QEMU frees them and prints its cache flushes.)
    for (event, errno) in [
        ("cluster_alloc", 5),
        ("write_aio", 28),
        ("refblock_load", 5),
    ] {
        s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
        s.file_both("b.conf", conf(event, errno, true).as_bytes());
        let out = s.same(
            &c_args(&["write -P 7 0 64k"], &["blkdebug:b.conf:t.qcow2"]),
            None,
        );
        assert!(
            out.merged.contains("write failed"),
            "{event}: {}",
            out.merged
        );
        // What the failed write left behind reads the same under both tools.
        s.same(&c_args(&["read -P 0 64k 64k"], &["t.qcow2"]), None);
    }
    // A read error after read_aio, on data written before.
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.same(&c_args(&["write -P 9 0 4k"], &["t.qcow2"]), None);
    s.file_both("r.conf", conf("read_aio", 5, true).as_bytes());
    let out = s.same(
        &c_args(
            &["read -P 9 0 4k", "read -P 9 0 4k"],
            &["blkdebug:r.conf:t.qcow2"],
        ),
        None,
    );
    assert!(out.merged.contains("read failed: Input/output error"));
    assert!(out.merged.contains("read 4096/4096 bytes"));
}

#[test]
fn blkdebug_option_lists_and_empty_configs() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // inject-error.N.* options on the file node.
    s.same(
        &[
            "-c",
            "open -o driver=qcow2,file.driver=blkdebug,file.image.filename=t.qcow2,file.inject-error.0.event=write_aio,file.inject-error.0.errno=28,file.inject-error.0.once=on",
            "-c",
            "write 0 4k",
        ],
        None,
    );
    // An empty configuration with alignment constraints changes no byte.
    s.same(
        &c_args(
            &[
                "open -o driver=qcow2,file.align=4k blkdebug::t.qcow2",
                "write -P 3 1000 8k",
                "read -P 3 1000 8k",
            ],
            &[],
        ),
        None,
    );
    // blkdebug above the format driver.
    s.same(
        &c_args(
            &[
                "open -o driver=blkdebug,image.driver=qcow2,align=4k,max-transfer=64k blkdebug::t.qcow2",
                "write -P 4 0 128k",
                "read -P 4 0 128k",
            ],
            &[],
        ),
        None,
    );
    s.same_file("t.qcow2");
}

#[test]
fn blkdebug_bad_configurations_are_refused() {
    let s = Setup::new();
    let run = |args: &[&str]| s.run(&s.ours_bin("qemu-io"), "ours", args, None);
    std::fs::write(s.dir("ours").join("t.qcow2"), []).expect("write");
    for (name, text) in [
        (
            "unknown-event.conf",
            "[inject-error]\nevent = \"no_such_event\"\n",
        ),
        ("no-event.conf", "[inject-error]\nerrno = \"5\"\n"),
        ("unquoted.conf", "[inject-error]\nevent = l2_load\n"),
        ("no-group.conf", "[frobnicate]\nevent = \"l2_load\"\n"),
        (
            "set-state.conf",
            "[set-state]\nstate = \"1\"\nnew_state = \"2\"\n",
        ),
    ] {
        std::fs::write(s.dir("ours").join(name), text).expect("write");
        let file = format!("blkdebug:{name}:t.qcow2");
        let out = run(&["-f", "qcow2", "-c", "read 0 512", &file]);
        assert_eq!(out.code, 1, "{name}: {}", out.merged);
        assert!(
            out.merged.starts_with("qemu-io: can't open device"),
            "{name}: {}",
            out.merged
        );
    }
    let out = run(&[
        "-f",
        "qcow2",
        "-c",
        "read 0 512",
        "blkdebug:missing.conf:t.qcow2",
    ]);
    assert!(
        out.merged.contains("Could not read blkdebug config file"),
        "{}",
        out.merged
    );
}

#[test]
fn qemu_img_stdout_is_buffered_behind_stderr() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "a.qcow2",
        "1G",
    ]);
    s.qemu_img_both(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "b.qcow2",
        "0",
    ]);
    s.same(&c_args(&["write -P 1 512 512"], &["a.qcow2"]), None);
    s.file_both("r.conf", conf("read_aio", 5, false).as_bytes());
    // compare prints on stdout before it fails reading (QEMU's test 074): on a pipe
    // QEMU's stdout reaches the file after the error.
    let args = ["compare", "blkdebug:r.conf:a.qcow2", "b.qcow2"];
    let ours = s.run(&s.ours_bin("qemu-img"), "ours", &args, None);
    let qemu = s.run(Path::new("qemu-img"), "qemu", &args, None);
    assert_eq!(ours, qemu);
    assert!(
        qemu.merged.find("Input/output error") < qemu.merged.find("Warning"),
        "{}",
        qemu.merged
    );
}

/// Runs `qemu-img ARGS` as ours (the symlink) and QEMU's in their directories and asserts
/// the same merged output and exit status; returns QEMU's run.
fn same_img(s: &Setup, args: &[&str]) -> common::qemu_io_setup::Out {
    let ours = s.run(&s.ours_bin("qemu-img"), "ours", args, None);
    let qemu = s.run(Path::new("qemu-img"), "qemu", args, None);
    assert_eq!(ours, qemu, "qemu-img {args:?}");
    qemu
}

#[test]
fn missing_backing_file_hint_on_create() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // QEMU's test 111: the open failure, then a hint line without the program prefix.
    let out = same_img(
        &s,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.inexistent",
            "-F",
            "qcow2",
            "t.qcow2",
        ],
    );
    assert!(
        out.merged.ends_with("\nCould not open backing image."),
        "{}",
        out.merged
    );
    same_img(
        &s,
        &[
            "create", "-f", "qcow2", "-b", "nope", "-F", "raw", "t.qcow2", "1M",
        ],
    );
}

#[test]
fn snapshot_table_errors_name_the_repair() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.qemu_img_both(&["snapshot", "-c", "a", "t.qcow2"]);
    for side in ["ours", "qemu"] {
        let path = s.dir(side).join("t.qcow2");
        let mut bytes = std::fs::read(&path).expect("read");
        let table = u64::from_be_bytes(bytes[64..72].try_into().expect("8 bytes"));
        let table = usize::try_from(table).expect("offset");
        // The first entry's extra_data_size, past QEMU's 1 KiB limit (test 261).
        bytes[table + 36..table + 40].copy_from_slice(&65536u32.to_be_bytes());
        std::fs::write(&path, bytes).expect("write");
    }
    for args in [&["info", "t.qcow2"][..], &["snapshot", "-l", "t.qcow2"]] {
        let out = same_img(&s, args);
        assert!(
            out.merged
                .contains("You can force-remove this extra metadata with qemu-img check -r all"),
            "{}",
            out.merged
        );
    }
}

#[test]
fn protocol_drivers_as_the_device() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    for side in ["ours", "qemu"] {
        std::fs::create_dir(s.dir(side).join("d.img")).expect("mkdir");
    }
    s.file_both("r.img", &[5u8; 4096]);
    // QEMU's test 226: a directory and a character device under each protocol driver,
    // read-only and read-write (a device opened without writes closes without a flush).
    for driver in ["file", "host_device", "host_cdrom"] {
        for ro in ["-r ", ""] {
            for file in ["d.img", "/dev/null,locking=off", "r.img"] {
                let cmd = format!("open {ro}-o driver={driver},filename={file}");
                s.same(&c_args(&[&cmd], &[]), None);
            }
        }
    }
    // The file driver reads and writes the bytes of a regular file.
    s.same(
        &c_args(
            &[
                "open -o driver=file,filename=r.img",
                "read -P 5 0 4k",
                "write -P 6 512 512",
            ],
            &[],
        ),
        None,
    );
    s.same_file("r.img");
}

#[test]
fn qcow2_cache_size_combinations() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "64k"]);
    // QEMU's test 103: the total against its two parts, then the entry size.
    for o in [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "cache-size=0,l2-cache-size=0,refcount-cache-size=0",
        "cache-size=1M,l2-cache-size=2M,l2-cache-entry-size=3",
        "cache-size=2M,l2-cache-size=1M",
        "cache-size=2M,refcount-cache-size=1M",
        "l2-cache-size=1M,refcount-cache-size=0.25M",
    ] {
        let open = format!("open -o {o} t.qcow2");
        s.same(&c_args(&[&open, "read 0 64k"], &[]), None);
    }
}

#[test]
fn detect_zeroes_turns_zero_buffers_into_zero_writes() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    for (spec, pre) in [
        ("detect-zeroes=on", false),
        ("detect-zeroes=unmap,discard=unmap", true),
        ("detect-zeroes=unmap", true),
        ("detect-zeroes=off", false),
    ] {
        s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
        if pre {
            s.same(&c_args(&["write -P 1 0 128k"], &["t.qcow2"]), None);
        }
        let opts = format!("driver=qcow2,file.filename=t.qcow2,{spec}");
        s.same(
            &c_args(
                &["write -P 0 0 64k", "write -P 0 100000 4k", "map"],
                &["--image-opts", &opts],
            ),
            None,
        );
        same_img(&s, &["map", "--output=json", "t.qcow2"]);
    }
    // A bad value is refused at open.
    s.same(
        &c_args(
            &["write -P 0 0 4k"],
            &[
                "--image-opts",
                "driver=qcow2,file.filename=t.qcow2,detect-zeroes=foo",
            ],
        ),
        None,
    );
}

#[test]
fn qemu_img_image_opts_with_blkdebug_above_the_format() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.same(&c_args(&["write -P 2 64k 64k"], &["t.qcow2"]), None);
    // QEMU's test 204 maps through blkdebug's option list.
    let opts = "driver=blkdebug,image.driver=qcow2,image.file.driver=file,\
                image.file.filename=t.qcow2,align=4k";
    same_img(&s, &["map", "--image-opts", opts]);
    same_img(&s, &["map", "--output=json", "--image-opts", opts]);
    let bad = "driver=blkdebug,image.driver=qcow2,image.file.filename=t.qcow2,bogus=1";
    let out = s.run(
        &s.ours_bin("qemu-img"),
        "ours",
        &["map", "--image-opts", bad],
        None,
    );
    assert_eq!(out.code, 1, "{}", out.merged);
}

#[test]
fn reopen_option_rules() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "b.qcow2", "1M"]);
    s.qemu_img_both(&[
        "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
    ]);
    // QEMU's test 133: node names and drivers cannot change, the -r/-w and -c flags do
    // not mix with their options, booleans are booleans.
    for c in [
        "reopen -o node-name=foo",
        "reopen -o file.node-name=foo",
        "reopen -o backing.node-name=foo",
        "reopen -o driver=raw",
        "reopen -o file.driver=qcow2",
        "reopen -o backing.driver=file",
        "reopen -o driver=qcow2",
        "reopen -o file.driver=file",
        "reopen -o backing.driver=qcow2",
        "reopen -r -o read-only=on",
        "reopen -w -o read-only=on",
        "reopen -c none -o cache.direct=on",
        "reopen -c directsync -o cache.no-flush=on",
        "reopen -o read-only=foo",
        "reopen -o cache.no-flush=bar",
        "reopen -o cache.direct=baz",
        "reopen -o auto-read-only=qux",
        "reopen -o read-only=off",
    ] {
        s.same(
            &c_args(&[c, "write -P 3 0 512", "read -P 3 0 512"], &["t.qcow2"]),
            None,
        );
    }
    for name in ["node-name", "file.node-name", "backing.node-name"] {
        let open = format!("open -o {name}=foo t.qcow2");
        for r in [
            format!("reopen -o {name}=foo"),
            "reopen".into(),
            format!("reopen -o {name}=bar"),
        ] {
            s.same(&c_args(&[&open, &r], &[]), None);
        }
    }
    s.same(&c_args(&["open -o node-name=9lives t.qcow2"], &[]), None);
}

#[test]
fn json_filenames_and_the_null_driver() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    let json = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 't.qcow2'}}";
    s.same(
        &c_args(&["write -P 8 0 4k", "read -P 8 0 4k"], &[json]),
        None,
    );
    s.same(
        &c_args(
            &[
                "open -o driver=qcow2 json:{'file': {'filename': 't.qcow2'}}",
                "read -P 8 0 4k",
            ],
            &[],
        ),
        None,
    );
    s.same_file("t.qcow2");
    // null-co: protocol driver names print twice and info fails (QEMU's test 133).
    let null = "json:{'driver': 'null-co', 'size': 65536}";
    s.same(&["-f", "null-co", "-c", "reopen", "-c", "info", null], None);
    s.same(&c_args(&["length", "write 0 4k"], &[null]), None);
    s.same(
        &c_args(
            &["read -P 0 0 4k"],
            &["json:{'driver': 'null-co', 'size': 4096, 'read-zeroes': true}"],
        ),
        None,
    );
    s.same(&c_args(&["info"], &["json:{'driver': 'qcow2'"]), None);
}

#[test]
fn file_protocol_prefix() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // QEMU's test 126: `file:` is stripped; a rest whose colon comes before any slash is
    // named with ./ in front, and backing files resolve next to it.
    same_img(&s, &["create", "-f", "qcow2", "file:a:b.qcow2", "1M"]);
    // (A bare "a:b.qcow2" is QEMU's unknown protocol "a"; this tool opens the file.)
    same_img(&s, &["info", "./a:b.qcow2"]);
    same_img(&s, &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    same_img(
        &s,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "file:image:top.qcow2",
        ],
    );
    same_img(&s, &["info", "file:image:top.qcow2"]);
    s.same(
        &c_args(&["write -P 4 0 4k"], &["file:image:top.qcow2"]),
        None,
    );
    same_img(&s, &["map", "file:image:top.qcow2"]);
    same_img(&s, &["check", "file:image:top.qcow2"]);
}

#[test]
fn vm_state_area_reads_and_writes() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // QEMU's tests 022 and 029: read -b / write -b reach the VM state area past the disk.
    let cmds = [
        "write -b -P 0x11 0 4k",
        "read -b -P 0x11 0 4k",
        "read -b -P 0 4k 4k",
        "write -b -P 3 1T 4k",
        "read -b -P 3 1T 4k",
        "read -P 0 0 1M",
    ];
    s.same(&c_args(&cmds, &["t.qcow2"]), None);
    // QEMU reads what we wrote, and finds the image clean.
    let qemu_io = |args: &[&str]| s.run(Path::new("qemu-io"), "ours", args, None);
    let out = qemu_io(&c_args(
        &["read -b -P 0x11 0 4k", "read -b -P 3 1T 4k"],
        &["t.qcow2"],
    ));
    assert_eq!(out.code, 0, "{}", out.merged);
    assert!(
        !out.merged.contains("Pattern verification failed"),
        "{}",
        out.merged
    );
    let check = s.run(Path::new("qemu-img"), "ours", &["check", "t.qcow2"], None);
    assert_eq!(check.code, 0, "{}", check.merged);
    // A read-only open refuses the write.
    s.same(&c_args(&["write -b 0 512"], &["-r", "t.qcow2"]), None);
}

#[test]
fn snapshot_delete_reports_failed_frees() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // QEMU's test 217: freeing fails after cluster_free; the old snapshot table leaks with
    // QEMU's unprefixed line, then the snapshot's own clusters fail the delete.
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "64M"]);
    s.same(&c_args(&["write 0 64k"], &["t.qcow2"]), None);
    s.qemu_img_both(&["snapshot", "-c", "foo", "t.qcow2"]);
    s.file_both("b.conf", conf("cluster_free", 5, false).as_bytes());
    let out = same_img(&s, &["snapshot", "-d", "foo", "blkdebug:b.conf:t.qcow2"]);
    assert!(
        out.merged
            .starts_with("qcow2_free_clusters failed: Input/output error\n"),
        "{}",
        out.merged
    );
    same_img(&s, &["snapshot", "-l", "t.qcow2"]);
}

#[test]
fn blkdebug_states() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // QEMU's test 066's machine: the first write_aio moves to state 2, where the next
    // write_aio arms the error. (066 itself writes over data, zero and data clusters in
    // one request, where QEMU reuses the clusters in one write and this engine writes
    // each run: its second write_aio fails there.)
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "192k"]);
    s.same(
        &c_args(&["write -P 42 0 192k", "write -z 64k 64k"], &["t.qcow2"]),
        None,
    );
    let json = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', \
                'image.filename': 't.qcow2', \
                'set-state': [{'event': 'write_aio', 'new_state': 2}], \
                'inject-error': [{'event': 'write_aio', 'state': 2, 'once': true}]}}";
    // Two requests: the second fails. (A rule still armed at close ends differently:
    // QEMU reports each cache flush, this engine's close stops at the first failure.)
    s.same(
        &c_args(&["write -P 1 0 4k", "write -P 2 64k 4k"], &[json]),
        None,
    );
    same_img(&s, &["map", "--output=json", "t.qcow2"]);
    // A config file with the same machine, state 1 -> 2 on l2_load.
    s.file_both(
        "s.conf",
        b"[set-state]\nevent = \"l2_load\"\nstate = \"1\"\nnew_state = \"2\"\n\n[inject-error]\nevent = \"read_aio\"\nstate = \"2\"\nonce = \"on\"\n",
    );
    s.same(
        &c_args(
            &["read -P 1 0 4k", "read -P 1 0 4k", "read -P 1 0 4k"],
            &["blkdebug:s.conf:t.qcow2"],
        ),
        None,
    );
}

#[test]
fn qemu_img_image_opts_take_qcow2_runtime_options() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // QEMU's test 061 amends through an option list with a cache option.
    same_img(
        &s,
        &[
            "amend",
            "-o",
            "compat=0.10",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,l2-cache-entry-size=4096",
        ],
    );
    same_img(&s, &["info", "t.qcow2"]);
    // A bad value fails the open (QEMU names the option list, this tool the file).
    for side in ["ours", "qemu"] {
        let prog = if side == "ours" {
            s.ours_bin("qemu-img")
        } else {
            "qemu-img".into()
        };
        let out = s.run(
            &prog,
            side,
            &[
                "amend",
                "-o",
                "compat=1.1",
                "--image-opts",
                "driver=qcow2,file.filename=t.qcow2,l2-cache-entry-size=100",
            ],
            None,
        );
        assert_eq!(out.code, 1, "{side}: {}", out.merged);
        assert!(out
            .merged
            .contains("L2 cache entry size must be a power of two"));
    }
    same_img(&s, &["info", "t.qcow2"]);
}

#[test]
fn compress_filter_writes_whole_compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    // QEMU's test 214: through the compress filter, writes are widened to clusters and
    // each goes down compressed.
    s.qemu_img_both(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "t.qcow2",
        "2M",
    ]);
    s.same(
        &c_args(
            &["write -P 0xbb 0 229376"],
            &[
                "--image-opts",
                "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=t.qcow2",
            ],
        ),
        None,
    );
    let json = "json:{'driver': 'compress', 'file': {'driver': 'qcow2', \
                'file': {'driver': 'file', 'filename': 't.qcow2'}}}";
    s.same(&c_args(&["write -P 0xcc 278528 229376"], &[json]), None);
    s.same(
        &c_args(
            &[
                "read -P 0xbb 0 229376",
                "read -P 0 229376 49152",
                "read -P 0xcc 278528 229376",
            ],
            &["t.qcow2"],
        ),
        None,
    );
    let out = same_img(&s, &["check", "--output=json", "t.qcow2"]);
    assert!(
        out.merged.contains("\"compressed-clusters\": 8"),
        "{}",
        out.merged
    );
    same_img(&s, &["map", "--output=json", "t.qcow2"]);
    // Not over raw.
    s.file_both("r.img", &[0u8; 65536]);
    s.same(
        &c_args(
            &["write 0 4k"],
            &[
                "--image-opts",
                "driver=compress,file.driver=raw,file.file.filename=r.img",
            ],
        ),
        None,
    );
}
