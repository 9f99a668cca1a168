//! `qcow2 bench -i io_uring|native|threads`: the AIO engines write what qemu-img bench
//! writes with the same engine (qemu-img compare), the image checks clean, reads of it
//! succeed, and the option errors are qemu-img's.

mod common;

use common::{have_qemu, qcow2};

#[test]
fn every_aio_engine_writes_what_qemu_img_writes() {
    if !have_qemu() {
        return;
    }
    // (aio, cache, depth, offset, step, flush interval)
    let cases = [
        ("io_uring", "none", "64", "0", "68k", "0"),
        ("io_uring", "none", "32", "512", "4k", "64"),
        ("io_uring", "writeback", "8", "1000", "12k", "0"),
        ("io_uring", "none", "1", "0", "64k", "0"),
        ("native", "none", "16", "0", "20k", "32"),
        ("threads", "none", "16", "0", "20k", "0"),
    ];
    for (aio, cache, depth, offset, step, flush) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for name in ["ours.qcow2", "qemu.qcow2"] {
            let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", name, "8M"]);
            assert_eq!(r.code, 0);
        }
        let flush_opt = format!("--flush-interval={flush}");
        let mut opts = vec![
            "bench",
            "-w",
            "-i",
            aio,
            "-t",
            cache,
            "-c",
            "700",
            "-s",
            "4k",
            "-S",
            step,
            "-o",
            offset,
            "--pattern=0x5c",
            "-d",
            depth,
        ];
        if flush != "0" {
            opts.push(&flush_opt);
        }
        let what = format!("-i {aio} -t {cache} -d {depth} -o {offset} -S {step} {flush_opt}");
        let ours = qcow2(d, &[opts.as_slice(), &["ours.qcow2"]].concat());
        let qemu = common::qemu_img(d, &[opts.as_slice(), &["qemu.qcow2"]].concat());
        assert_eq!(ours.code, 0, "{what}: {ours:?}");
        assert_eq!(qemu.code, 0, "{what}: {qemu:?}");
        let first = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("Run completed in "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(first(&ours.stdout), first(&qemu.stdout), "{what}");
        assert!(
            ours.stdout
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("Run completed in ")),
            "{what}: {ours:?}"
        );
        let cmp = common::qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
        assert_eq!(cmp.code, 0, "{what}: {cmp:?}");
        let check = common::qemu_img(d, &["check", "ours.qcow2"]);
        assert_eq!(check.code, 0, "{what}: {check:?}");
        let r = qcow2(
            d,
            &[
                "bench",
                "-i",
                aio,
                "-t",
                cache,
                "-d",
                depth,
                "-c",
                "700",
                "-S",
                step,
                "ours.qcow2",
            ],
        );
        assert_eq!(r.code, 0, "{what}: {r:?}");
    }
}

#[test]
fn aio_option_errors_are_qemu_img_s() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    assert_eq!(r.code, 0);
    for args in [
        &["bench", "-c", "1", "-i", "bogus", "a.qcow2"][..],
        &["bench", "-c", "1", "-i", "native", "a.qcow2"][..],
        &["bench", "-c", "1", "-n", "a.qcow2"][..],
        &["bench", "-c", "1", "-n", "-t", "writeback", "a.qcow2"][..],
    ] {
        let ours = qcow2(d, args);
        let qemu = common::qemu_img(d, args);
        assert_ne!(qemu.code, 0, "{args:?}");
        assert_eq!(ours.code, qemu.code, "{args:?}");
        assert_eq!(ours.stdout, qemu.stdout, "{args:?}");
        assert_eq!(
            ours.stderr.replace("qcow2:", ""),
            qemu.stderr.replace("qemu-img:", ""),
            "{args:?}"
        );
    }
}

/// Where io_uring is unavailable — here a seccomp filter makes `io_uring_setup` fail with
/// `ENOSYS`, as container runtimes' default profiles and kernels without io_uring do —
/// `-i io_uring` says so with qemu-img 10's message and falls back to the thread pool, as
/// qemu-img does: the run completes and writes what qemu-img's writes.
#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_unavailable_falls_back_to_threads_as_qemu_img() {
    use std::os::unix::process::CommandExt;
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for name in ["ours.qcow2", "qemu.qcow2"] {
        let r = common::qemu_img(d, &["create", "-q", "-f", "qcow2", name, "4M"]);
        assert_eq!(r.code, 0);
    }
    let args = [
        "bench",
        "-w",
        "-c",
        "300",
        "-d",
        "16",
        "-S",
        "12k",
        "-i",
        "io_uring",
        "-t",
        "none",
        "--pattern=7",
    ];
    let run = |program: &str, image: &str| {
        let mut c = std::process::Command::new(program);
        c.args(args).arg(image).current_dir(d);
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the child between fork and exec; it only builds a
        // filter on its own stack and calls prctl, which is async-signal-safe.
        unsafe {
            c.pre_exec(deny_io_uring);
        }
        let out = c.output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ours_code, ours_out, ours) = run(env!("CARGO_BIN_EXE_qcow2"), "ours.qcow2");
    let (qemu_code, qemu_out, qemu) = run("qemu-img", "qemu.qcow2");
    assert!(qemu.contains("io_uring"), "the filter did not take: {qemu}");
    assert_eq!(ours_code, qemu_code, "{ours}");
    assert_eq!(ours_code, Some(0), "{ours}");
    assert_eq!(ours.replace("qcow2:", ""), qemu.replace("qemu-img:", ""));
    let banner = |s: &str| s.lines().next().unwrap_or("").to_string();
    assert_eq!(banner(&ours_out), banner(&qemu_out));
    let cmp = common::qemu_img(d, &["compare", "ours.qcow2", "qemu.qcow2"]);
    assert_eq!(cmp.code, 0, "{cmp:?}");
}

/// Installs a seccomp filter failing `io_uring_setup` (x86_64 syscall 425) with `ENOSYS`.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring() -> std::io::Result<()> {
    // Classic BPF opcodes (linux/filter.h): BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K,
    // BPF_RET|BPF_K.
    const LD_W_ABS: u16 = 0x20;
    const JMP_JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut filter = [
        // seccomp_data.nr
        f(LD_W_ABS, 0, 0, 0),
        f(JMP_JEQ_K, 0, 1, 425),
        f(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        f(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    #[allow(unsafe_code)]
    // SAFETY: prctl with plain integers, and a pointer to `prog`, which lives until the
    // call returns (the kernel copies the filter).
    let rc = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            -1
        } else {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
