//! Our binary called as `qemu-io` (a symlink named so, in a temporary directory) against
//! the real `qemu-io`, on the same scripts in two copies of the same directory: commands
//! from `-c` lists and piped on standard input, option and command errors, exit codes, the
//! order of standard output and standard error when both go to one file (as QEMU's iotests
//! capture them), and the image files left behind. Timing figures are masked ("N ops;
//! <time>", the `-C` line's time and rates), as QEMU's iotests filter them.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::have_qemu;
use common::qemu_io_setup::{c_args, Setup};

#[test]
fn piped_commands_print_prompts_and_run() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    let script = "write -P 42 0 512\nread -P 42 0 512\nfrob\nread -v 0 16\n\n   \n\
                  writev -P 3 0 512 512\nreadv -P 3 0 1k\nread 0 2M\nclose\nread 0 1\n\
                  open t.qcow2\nread -P 3 0 1k\nquit\nwrite 0 512\n";
    let out = s.same(&["t.qcow2"], Some(script));
    assert!(out.merged.starts_with("qemu-io> wrote 512/512"));
    assert_eq!(out.code, 1);
    s.same_file("t.qcow2");
}

#[test]
fn stdin_edge_cases() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // No trailing newline, nothing at all, only blank lines, no image, a good script.
    for script in ["read 0 512", "", "\n\n", "info\nmap\n", "write 0 512\n"] {
        s.same(&["t.qcow2"], Some(script));
        s.same(&[], Some(script));
    }
    // With -c, standard input is not read.
    s.same(&["-c", "read 0 512", "t.qcow2"], Some("write 0 512\n"));
    s.same_file("t.qcow2");
}

#[test]
fn exit_codes_of_failing_commands() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    for cmd in [
        "help frob",
        "write -n 0 512",
        "read -s 0 0 1k",
        "read",
        "read -x 0 1",
        "read -P 1 0 512",
        "readv -P 1 0 512",
        "sleep x",
        "open nope",
        "open t.qcow2",
        "reopen -r -w",
        "reopen -c bogus",
        "close",
        "truncate x",
        "alloc 1",
        "aio_read -P 1 0 512",
        "write -s nope 0 512",
        "read -P 2 -s 1000 -l 512 0 1k",
        "sigraise x",
        "quit",
        "info",
        "length",
        "write -c 0 100",
        "frob",
        "read 0 2M",
        "",
    ] {
        s.same(&["-c", cmd, "t.qcow2"], None);
        s.same(&["t.qcow2"], Some(&format!("{cmd}\n")));
    }
    // A failure anywhere makes the status 1, also before a success and before quit.
    s.same(&c_args(&["read 0 2M", "read 0 512"], &["t.qcow2"]), None);
    s.same(
        &c_args(&["read -P 1 0 1", "quit", "read 0 2M"], &["t.qcow2"]),
        None,
    );
    s.same(&c_args(&["quit", "read 0 2M"], &["t.qcow2"]), None);
}

#[test]
fn command_line_errors() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // Images whose backing file is missing.
    for side in ["ours", "qemu"] {
        std::fs::create_dir(s.dir(side).join("sub")).expect("mkdir");
    }
    for img in ["nb.qcow2", "sub/nb.qcow2"] {
        s.qemu_img_both(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            img,
            "1M",
        ]);
    }
    for args in [
        &["-c", "read 0 512", "missing.qcow2"][..],
        &["missing.qcow2"],
        &["-f", "foo", "-c", "help", "t.qcow2"],
        &["-t", "bogus", "t.qcow2"],
        &["-i", "bogus", "t.qcow2"],
        &["-d", "bogus", "t.qcow2"],
        &["--cache", "bogus", "t.qcow2"],
        &["-x", "t.qcow2"],
        &["--frob", "t.qcow2"],
        &["--cache"],
        &["a", "b"],
        &["-c"],
        &["--object", "foo,id=x", "-c", "help"],
        &["--object", "secret,id=s0,data=x", "-c", "help"],
        &["--image-opts", "-f", "qcow2", "x"],
        &["-k", "-c", "info", "t.qcow2"],
        &["-i", "native", "-c", "info", "t.qcow2"],
        &["-f", "raw", "-c", "info", "t.qcow2"],
        &["-c", "help"],
        &["-c", "info", "nb.qcow2"],
        &["-c", "info", "sub/nb.qcow2"],
        &["-c", "open sub/nb.qcow2"],
        &["-s", "-c", "info", "sub/nb.qcow2"],
    ] {
        s.same(args, None);
    }
    s.same_file("t.qcow2");
}

#[test]
fn stderr_comes_before_buffered_stdout() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    // With -c, stdout is flushed only at exit: every error line comes first.
    let cmds = [
        "read 0 512",
        "frob",
        "write -P 1 0 512",
        "open x",
        "read -x 0 1",
        "read 0 512",
    ];
    let out = s.same(&c_args(&cmds, &["t.qcow2"]), None);
    assert!(out.merged.starts_with("command \"frob\" not found"));
    // Enough output to fill C's 4 KiB buffer more than once (no timing lines, whose
    // varying lengths would move the buffer boundaries).
    let mut many = vec!["help", "map", "help", "info"];
    many.insert(1, "frob");
    many.insert(4, "open x");
    many.push("help");
    many.push("frob");
    s.same(&c_args(&many, &["t.qcow2"]), None);
    // From standard input, each prompt flushes.
    s.same(
        &["-r", "t.qcow2"],
        Some("read 0 512\nwrite 0 512\nread 0 512\n"),
    );
}

#[test]
fn vectored_and_aio_commands() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    let cmds = [
        "readv 0 512 1k",
        "writev -P 5 0 512 512",
        "readv -P 5 0 1k",
        "readv -v 0 16 16",
        "readv -P 6 0 512",
        "readv -q -C 0 512",
        "writev -C -P 6 1k 512",
        "aio_write -P 7 0 512",
        "aio_flush",
        "aio_read -P 7 0 512",
        "aio_flush",
        "aio_read -P 8 0 512",
        "aio_flush",
        "aio_read -i 0 1",
        "aio_write -i 0 1",
        "aio_write -z 64k 64k",
        "aio_flush",
        "aio_read -P 0 64k 64k",
        "aio_read -v 0 16",
        "aio_flush",
        "readv 0 3G",
        "readv 0 1G 1.5G",
        "readv x 1",
        "readv 0 x",
        "aio_read 0 2M",
        "aio_write -u 0 1",
        "aio_write -z -P 1 0 1",
        "aio_flush",
    ];
    s.same(&c_args(&cmds, &["t.qcow2"]), None);
    s.same_file("t.qcow2");
}

#[test]
fn read_and_write_options() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.file_both("pat", &[b'A'; 512]);
    s.file_both("empty", b"");
    let cmds = [
        "write -C -P 1 0 512",
        "read -C 0 512",
        "w -P 2 512 512",
        "r -P 2 512 512",
        "read -P 2 -s 512 -l 512 0 1k",
        "read -P 2 -s 0 -l 512 0 1k",
        "read -P 2 -s 1000 -l 512 0 1k",
        "read -s 0 0 1k",
        "write -s pat 0 512",
        "read -P 0x41 0 512",
        "write -f -P 4 0 512",
        "write -n 0 512",
        "write -b -z 0 512",
        "write -p 0 512",
        "read -p 0 512",
        "read -a 0 512",
        "write -r 0 512",
        "write -s nope 0 512",
        "write -s pat 0 1k",
        "write -s empty 0 1k",
        "write -c 0 64k",
        "write -c 128k 64k",
        "write -c 0 100",
        "read -P 0xcd 128k 64k",
        "write -z -n 0 512",
        "write -P 1 192k 512",
        "write -z -n 192k 512",
        "write -z -n 256k 64k",
        "write -z -u 320k 64k",
        "read 0 3G",
        "map",
        "alloc 1",
        "alloc 0 1M",
        "sleep 1",
        "sleep x",
        "sigraise 0",
        "sigraise 99",
        "truncate -m bogus 2M",
        "truncate 2M",
        "length",
        "truncate 1M",
        "zone_report 0 1",
        "break write_aio A",
        "read \"0\" 512",
        "# comment",
        "sleep -5",
        "sleep -",
        "alloc -1",
        "sigraise -1",
        "help -x",
        "map -x",
    ];
    s.same(&c_args(&cmds, &["t.qcow2"]), None);
    s.same_file("t.qcow2");
}

#[test]
fn open_close_reopen_and_option_lists() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.qemu_img_both(&["create", "-f", "raw", "r.raw", "1M"]);
    let cmds = [
        "info",
        "open t.qcow2",
        "open t.qcow2",
        "close",
        "close",
        "open -r t.qcow2",
        "write 0 512",
        "reopen -w",
        "write -P 3 0 512",
        "reopen -r",
        "write 0 512",
        "reopen -r -w",
        "reopen -c bogus",
        "reopen -c none",
        "reopen -o foo=bar",
        "reopen x",
        "close",
        "open",
        "open -x",
        "open a b",
        "open -o driver=raw r.raw",
        "info",
        "write -P 7 0 4k",
        "close",
        "open -o driver=qcow2,file.filename=t.qcow2",
        "read -P 3 0 512",
        "close",
        "open -o foo=bar t.qcow2",
        "open -t bogus t.qcow2",
        "open -i native t.qcow2",
        "open -n -i native -d ignore -C t.qcow2",
        "info",
    ];
    s.same(&c_args(&cmds, &[]), None);
    s.same(
        &[
            "--image-opts",
            "-c",
            "info",
            "driver=raw,file.filename=r.raw",
        ],
        None,
    );
    for list in [
        "driver=qcow2,file.filename=t.qcow2,file.locking=off",
        "driver=qcow2,file.filename=t.qcow2,file.locking=bogus",
        "driver=qcow2,file.driver=file,file.filename=t.qcow2,file.aio=threads",
        "driver=qcow2,file.filename=t.qcow2,file.aio=bogus",
        "driver=qcow2,file.filename=t.qcow2,lazy-refcounts=on,cache.direct=on",
    ] {
        s.same(&["--image-opts", "-c", "read -P 3 0 512", list], None);
    }
    s.same(
        &[
            "--image-opts",
            "-c",
            "open driver=qcow2,file.filename=t.qcow2",
            "-c",
            "read -P 3 0 512",
        ],
        None,
    );
    s.same_file("t.qcow2");
    s.same_file("r.raw");
}

#[test]
fn snapshot_mode_leaves_the_image_alone() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.qemu_img_both(&["create", "-f", "raw", "r.raw", "1M"]);
    let cmds = ["write -P 9 0 64k", "read -P 9 0 64k", "info", "map"];
    s.same(&c_args(&cmds, &["-s", "t.qcow2"]), None);
    s.same(&c_args(&cmds, &["-s", "-f", "raw", "r.raw"]), None);
    s.same(&c_args(&cmds, &["-s", "-r", "t.qcow2"]), None);
    s.same(
        &c_args(&["open -s t.qcow2", "write -P 1 0 1", "close"], &[]),
        None,
    );
    s.same(&c_args(&["read -P 0 0 64k"], &["t.qcow2"]), None);
    s.same_file("t.qcow2");
    s.same_file("r.raw");
}

#[test]
fn copy_on_read_copies_backing_data() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.file_both("base.raw", &[0xee; 1 << 20]);
    s.qemu_img_both(&[
        "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
    ]);
    let cmds = [
        "read -P 0xee 100k 4k",
        "write -P 1 1000 1",
        "map",
        "read -P 0xee 0 1000",
    ];
    s.same(&c_args(&cmds, &["-C", "ov.qcow2"]), None);
    s.same(&c_args(&["map"], &["ov.qcow2"]), None);
    s.same(
        &c_args(&["read -P 0xee 512k 4k", "map"], &["ov.qcow2"]),
        None,
    );
    // Copy-on-read needs a writable image.
    s.same(&c_args(&["read 0 4k"], &["-r", "-C", "ov.qcow2"]), None);
    s.same(&c_args(&["open -r -C ov.qcow2", "info"], &[]), None);
    // Through a snapshot overlay, and by readv/aio_read.
    s.same(
        &c_args(&["read -P 0xee 0 4k", "map"], &["-s", "-C", "ov.qcow2"]),
        None,
    );
    s.same(
        &c_args(
            &[
                "readv -P 0xee 600k 4k 4k",
                "aio_read -P 0xee 800k 4k",
                "aio_flush",
                "map",
            ],
            &["-C", "ov.qcow2"],
        ),
        None,
    );
    s.same_file("ov.qcow2");
}

#[test]
fn cache_and_aio_modes_are_accepted() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    for opts in [
        &["-n"][..],
        &["-t", "none"],
        &["-t", "writeback"],
        &["--cache=writethrough"],
        &["-t", "directsync", "-i", "native"],
        &["-t", "unsafe"],
        &["-i", "threads"],
        &["--aio=io_uring"],
        &["-d", "ignore"],
        &["--discard=unmap"],
        &["-m"],
        &["-r", "-U"],
    ] {
        let mut args = opts.to_vec();
        args.extend(c_args(
            &["write -P 5 0 64k", "discard 0 64k", "flush", "map"],
            &["t.qcow2"],
        ));
        s.same(&args, None);
    }
    s.same_file("t.qcow2");
}

#[test]
fn signals_end_the_program_with_the_data_written() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    for end in ["sigraise 9", "sigraise 15", "abort"] {
        let out = s.same(
            &c_args(&["write -P 3 0 64k", end, "read 0 1"], &["t.qcow2"]),
            None,
        );
        assert!(out.code > 128, "{end}: {out:?}");
        s.same(&c_args(&["read -P 3 0 64k"], &["t.qcow2"]), None);
    }
}

#[test]
fn program_names_follow_argv0() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    let dir = s.dir("ours");
    let run = |prog: &Path, args: &[&str]| {
        let o = Command::new(prog)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Called as qemu-io: qemu-io's messages and prompt.
    let (code, _, err) = run(&s.ours_bin("qemu-io"), &["missing.qcow2"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("qemu-io: can't open device missing.qcow2: "),
        "{err}"
    );
    // Called as qemu-img: the qcow2 command line, qemu-img's prefix.
    let (code, _, err) = run(&s.ours_bin("qemu-img"), &["info", "missing.qcow2"]);
    let (qcode, _, qerr) = run(Path::new("qemu-img"), &["info", "missing.qcow2"]);
    assert_eq!((code, err.as_str()), (qcode, qerr.as_str()));
    // Called as qcow2: its own name, also from `io`.
    let exe = Path::new(env!("CARGO_BIN_EXE_qcow2"));
    let (code, _, err) = run(exe, &["io", "missing.qcow2"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("qcow2: can't open device missing.qcow2: "),
        "{err}"
    );
    let (_, out, _) = run(exe, &["io", "-c", "help"]);
    let (_, qout, _) = run(Path::new("qemu-io"), &["-c", "help"]);
    assert_eq!(out, qout);
    let (_, out, _) = run(&s.ours_bin("qemu-io"), &["-h"]);
    assert!(out.starts_with("Usage: qemu-io [OPTIONS]..."), "{out}");
}

#[test]
fn qcow2_runtime_options_and_raw_probing() {
    if !have_qemu() {
        return;
    }
    let s = Setup::new();
    s.qemu_img_both(&["create", "-f", "qcow2", "t.qcow2", "1M"]);
    s.qemu_img_both(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "old.qcow2",
        "1M",
    ]);
    s.qemu_img_both(&["create", "-f", "raw", "r.raw", "1M"]);
    for o in [
        "lazy-refcounts=on",
        "lazy-refcounts=x",
        "l2-cache-size=1M",
        "l2-cache-size=foo",
        "refcount-cache-size=64k",
        "cache-size=2M",
        "l2-cache-entry-size=4k",
        "l2-cache-entry-size=3",
        "pass-discard-request=on",
        "discard-no-unref=on",
        "overlap-check=none",
        "overlap-check=bogus",
        "cache-clean-interval=10",
        "foo=bar",
    ] {
        let open = format!("open -o {o} t.qcow2");
        s.same(
            &c_args(
                &[&open, "write -P 1 0 64k", "discard 0 64k", "info", "map"],
                &[],
            ),
            None,
        );
    }
    s.same(&c_args(&["open -o lazy-refcounts=on old.qcow2"], &[]), None);
    let reopen = [
        "reopen -o lazy-refcounts=on",
        "write -P 2 0 64k",
        "reopen -o l2-cache-size=1M",
        "reopen -o driver=raw",
        "reopen -o foo=1",
        "reopen -o lazy-refcounts=x",
        "reopen -r",
        "write 0 1",
        "reopen -w",
        "write -P 3 0 1",
        "info",
    ];
    s.same(&c_args(&reopen, &["t.qcow2"]), None);
    s.same(
        &c_args(&["reopen -o lazy-refcounts=on"], &["-s", "t.qcow2"]),
        None,
    );
    // A raw image opened without a format: QEMU's warning, but not read-only or -s.
    s.same(&c_args(&["info"], &["r.raw"]), None);
    s.same(&c_args(&["info"], &["-r", "r.raw"]), None);
    s.same(
        &c_args(&["open r.raw", "close", "open -s r.raw", "info"], &[]),
        None,
    );
    s.same(
        &c_args(&["open -o lazy-refcounts=on r.raw"], &["-f", "raw"]),
        None,
    );
    // A probed raw image refuses writes that would make it look like a qcow2 image.
    s.file_both(
        "hdr",
        &std::fs::read(s.dir("qemu").join("t.qcow2")).expect("read"),
    );
    let cmds = [
        "write -s hdr 0 512",
        "write -s hdr 0 4",
        "write -s hdr 512 512",
        "read -v 0 8",
        "write -s hdr 0 64k",
        "aio_write -P 0x51 0 1",
        "aio_flush",
    ];
    s.same(&c_args(&cmds, &["r.raw"]), None);
    s.same(
        &c_args(&["write -s hdr 0 512"], &["-f", "raw", "r.raw"]),
        None,
    );
    s.same_file("t.qcow2");
    s.same_file("r.raw");
}

#[test]
fn discard_modes() {
    if !have_qemu() {
        return;
    }
    for (args, open) in [
        (&["-d", "ignore"][..], ""),
        (&["-d", "unmap"][..], ""),
        (&[][..], ""),
        (&[][..], "open -d ignore d.qcow2"),
        (&[][..], "open d.qcow2"),
    ] {
        let s = Setup::new();
        s.qemu_img_both(&["create", "-f", "qcow2", "d.qcow2", "4M"]);
        let mut cmds = Vec::new();
        if !open.is_empty() {
            cmds.push(open);
        }
        cmds.extend(["write -P 1 0 2M", "discard 0 1M", "map", "read -P 0 0 1M"]);
        let mut argv = args.to_vec();
        argv.extend(c_args(&cmds, &[]));
        if open.is_empty() {
            argv.push("d.qcow2");
        }
        s.same(&argv, None);
        s.same_file("d.qcow2");
    }
}

/// Points the first L2 entry of `path` at the refcount table (cluster 0x10000), so that a
/// write there is a metadata overlap.
fn corrupt_first_l2_entry(path: &Path) {
    let mut img = std::fs::read(path).expect("read");
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    const MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let l1 = be(&img[40..48]) as usize;
    let l2 = (be(&img[l1..l1 + 8]) & MASK) as usize;
    let entry = be(&img[l2..l2 + 8]);
    let patched = (entry & !MASK) | 0x10000;
    img[l2..l2 + 8].copy_from_slice(&patched.to_be_bytes());
    std::fs::write(path, img).expect("write");
}

#[test]
fn corruption_makes_the_image_unusable() {
    if !have_qemu() {
        return;
    }
    let scripts: [(&[&str], &[&str]); 4] = [
        (
            &[
                "write -P 2 0 512",
                "read 0 512",
                "write 0 512",
                "length",
                "info",
                "map",
                "alloc 0",
                "flush",
                "discard 0 64k",
                "truncate 2M",
                "readv 0 1",
                "write -z 0 1",
                "write -c 0 64k",
            ],
            &[],
        ),
        (&["write -P 2 0 512", "read 0 512"], &["-r"]),
        (&["read -P 1 0 512", "write -P 2 0 512"], &[]),
        (
            &[
                "write -P 2 0 512",
                "close",
                "open -r cor.qcow2",
                "read 0 512",
                "info",
            ],
            &[],
        ),
    ];
    for (cmds, opts) in scripts {
        let s = Setup::new();
        s.qemu_img_both(&["create", "-f", "qcow2", "cor.qcow2", "1M"]);
        for side in ["ours", "qemu"] {
            let st = Command::new("qemu-io")
                .args(["-c", "write -P 1 0 64k", "cor.qcow2"])
                .current_dir(s.dir(side))
                .stdout(Stdio::null())
                .status()
                .expect("qemu-io");
            assert!(st.success());
            corrupt_first_l2_entry(&s.dir(side).join("cor.qcow2"));
        }
        let mut args = opts.to_vec();
        args.extend(c_args(cmds, &["cor.qcow2"]));
        s.same(&args, None);
        s.same_file("cor.qcow2");
    }
}

#[test]
fn zero_writes_without_fallback_and_copy_on_read_of_holes() {
    if !have_qemu() {
        return;
    }
    for cluster in ["512", "4k", "64k"] {
        let s = Setup::new();
        let opt = format!("cluster_size={cluster}");
        s.qemu_img_both(&["create", "-f", "qcow2", "-o", &opt, "t.qcow2", "1M"]);
        // The head cluster reads as zeros, the tail one does not: the head and the body
        // are zeroed, then the request fails.
        let cmds = [
            "write -P 171 66048 100000",
            "write -z -n 512 100000",
            "map",
            "write -z -n 200000 1000",
            "write -z -n 0 64k",
            "write -z -n -u 960k 64k",
            "map",
        ];
        s.same(&c_args(&cmds, &["t.qcow2"]), None);
        s.same_file("t.qcow2");
        // Copy-on-read of ranges allocated nowhere writes zero clusters.
        s.same(
            &c_args(&["read -P 0 300k 100000", "map"], &["-C", "t.qcow2"]),
            None,
        );
        s.same_file("t.qcow2");
    }
}
