//! LUKS key-slot changes (`amend -o encrypt.*`) through the library under crash
//! simulation: at every flush of an added slot and of an erased one, every post-crash
//! image (each prefix of the pending writes, and torn multi-sector writes) still opens
//! with a passphrase that was working before and after the change, and its guest data
//! reads back; the finished change opens with exactly the passphrases it should.

use qcow2_crypto::keyslot::{self, FixedBench, LuksCreateOptions, SeededRandom};
use qcow2_format::layout::LuksArea;
use qcow2_image::{
    AmendOptions, BackingPolicy, CreateOptions, Image, KeyslotAmend, OpenOptions, Secret,
};
use qcow2_io::crash::{CrashOptions, CrashStorage};
use std::sync::{Arc, Mutex};

const DATA: (u64, usize, u8) = (70_000, 100_000, 0x5c);

fn open_opts(pw: &[u8], read_only: bool) -> OpenOptions {
    OpenOptions {
        key_secret: Some(Secret::new(pw.to_vec())),
        backing: BackingPolicy::Ignore,
        read_only,
        ..OpenOptions::default()
    }
}

/// A LUKS image (passphrase "one", cheap PBKDF2) with some guest data, all durable.
fn new_image() -> Arc<CrashStorage> {
    let o = LuksCreateOptions {
        iter_time_ms: 1,
        ..LuksCreateOptions::default()
    };
    let luks =
        keyslot::create(&o, b"one", &mut SeededRandom::new(9), &mut FixedBench(1000)).unwrap();
    let mut c = CreateOptions::new(4 << 20);
    c.luks_area = Some(LuksArea(luks.area));
    let s = Arc::new(CrashStorage::new());
    let mut img = Image::create_with(s.clone(), &c, &open_opts(b"one", false)).unwrap();
    img.write(DATA.0, &vec![DATA.2; DATA.1]).unwrap();
    img.close().unwrap();
    qcow2_io::Storage::flush(s.as_ref()).unwrap();
    s
}

/// Whether `image` opens with `pw` and shows the guest data.
fn opens(image: &[u8], pw: &[u8]) -> bool {
    let s = Arc::new(CrashStorage::from_bytes(image.to_vec()));
    let Ok(mut img) = Image::open(s, &open_opts(pw, true)) else {
        return false;
    };
    let mut buf = vec![0u8; DATA.1];
    img.read(DATA.0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == DATA.2), "data lost");
    true
}

/// Every slot the LUKS header (at 0x40000) calls active opens with its passphrase (slot 0
/// "one", slot 1 "two"): a crash never leaves a slot that claims a key it does not hold.
fn slots_consistent(image: &[u8]) -> bool {
    let area = &image[0x40000..];
    let h = qcow2_crypto::LuksHeader::parse(area).unwrap();
    let mut read = |off: u64, buf: &mut [u8]| {
        let off = off as usize;
        buf.copy_from_slice(&area[off..off + buf.len()]);
        Ok(())
    };
    h.key_slots.iter().enumerate().all(|(i, slot)| {
        !slot.is_active()
            || h.load_key(i, [&b"one"[..], b"two"][i.min(1)], &mut read)
                .unwrap()
                .is_some()
    })
}

/// Runs `amend` on the image; at every flush, each post-crash image (every prefix of the
/// pending writes, and seeded torn variants of multi-sector writes) must open with
/// `survivor`. Returns how many crash states were checked.
fn amend_checking_crash_states(
    s: &Arc<CrashStorage>,
    pw: &[u8],
    a: AmendOptions,
    survivor: &'static [u8],
) -> usize {
    let checked: Arc<Mutex<(usize, Vec<String>)>> = Arc::default();
    {
        let checked = checked.clone();
        let opts = CrashOptions::default().with_torn_random(4).with_seed(5);
        s.on_flush(move |cp| {
            let mut c = checked.lock().unwrap();
            for st in cp.crash_states(&opts) {
                c.0 += 1;
                if !opens(&st.image, survivor) || !slots_consistent(&st.image) {
                    let n = c.0;
                    c.1.push(format!("state {n} ({:.60})", format!("{:?}", st.kind)));
                }
            }
            Ok(())
        });
    }
    let mut img = Image::open(s.clone(), &open_opts(pw, false)).unwrap();
    img.amend(&a).unwrap();
    img.close().unwrap();
    s.clear_hooks();
    let c = checked.lock().unwrap();
    assert!(c.1.is_empty(), "crash states that lost the key: {:?}", c.1);
    assert!(c.0 > 2, "crash states: {}", c.0);
    c.0
}

fn secrets() -> Vec<(String, Secret)> {
    vec![
        ("s1".into(), Secret::new(b"one".to_vec())),
        ("s2".into(), Secret::new(b"two".to_vec())),
    ]
}

#[test]
fn adding_then_erasing_slots_never_loses_the_working_key() {
    let s = new_image();
    // Add "two" into the first free slot (1).
    let add = AmendOptions {
        encrypt: Some(KeyslotAmend {
            state: Some("active".into()),
            new_secret: Some("s2".into()),
            iter_time: Some(1),
            ..KeyslotAmend::default()
        }),
        secrets: secrets(),
        ..AmendOptions::default()
    };
    amend_checking_crash_states(&s, b"one", add, b"one");
    let now = s.durable();
    assert!(opens(&now, b"one") && opens(&now, b"two"));

    // Erase slot 0 ("one"): "two" opens in every crash state, "one" no more at the end.
    let erase = AmendOptions {
        encrypt: Some(KeyslotAmend {
            state: Some("inactive".into()),
            keyslot: Some(0),
            ..KeyslotAmend::default()
        }),
        secrets: secrets(),
        ..AmendOptions::default()
    };
    amend_checking_crash_states(&s, b"two", erase, b"two");
    let now = s.durable();
    assert!(opens(&now, b"two"));
    assert!(!opens(&now, b"one"));
    // The erased slot's material is overwritten: its old bytes are gone.
    let h = qcow2_crypto::LuksHeader::parse(&now[0x40000..]).unwrap();
    assert!(!h.key_slots[0].is_active());
    assert_eq!(h.key_slots[0].iterations, 0);
}

/// QEMU's refusals leave the image as it was.
#[test]
fn refusals_write_nothing() {
    let s = new_image();
    let before = s.durable();
    let cases: [(KeyslotAmend, bool, &str); 6] = [
        (
            KeyslotAmend {
                state: Some("inactive".into()),
                keyslot: Some(0),
                ..KeyslotAmend::default()
            },
            false,
            "Attempt to erase the only active keyslot 0",
        ),
        (
            KeyslotAmend {
                state: Some("inactive".into()),
                old_secret: Some("s1".into()),
                ..KeyslotAmend::default()
            },
            false,
            "All the active keyslots match",
        ),
        (
            KeyslotAmend {
                state: Some("active".into()),
                new_secret: Some("s2".into()),
                keyslot: Some(0),
                ..KeyslotAmend::default()
            },
            false,
            "Refusing to overwrite active keyslot 0",
        ),
        (
            KeyslotAmend {
                state: Some("active".into()),
                new_secret: Some("nope".into()),
                iter_time: Some(1),
                ..KeyslotAmend::default()
            },
            false,
            "No secret with id 'nope'",
        ),
        (
            KeyslotAmend::default(),
            true,
            "Parameter 'state' is missing",
        ),
        (
            KeyslotAmend {
                state: Some("inactive".into()),
                keyslot: Some(8),
                ..KeyslotAmend::default()
            },
            true,
            "Invalid keyslot 8 specified, must be between 0 and 7",
        ),
    ];
    for (a, force, msg) in cases {
        let mut img = Image::open(s.clone(), &open_opts(b"one", false)).unwrap();
        let e = img
            .amend(&AmendOptions {
                encrypt: Some(a),
                force,
                secrets: secrets(),
                ..AmendOptions::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains(msg), "{e} / {msg}");
        drop(img);
        let after = s.current();
        let h0 = qcow2_crypto::LuksHeader::parse(&before[0x40000..]).unwrap();
        let h1 = qcow2_crypto::LuksHeader::parse(&after[0x40000..]).unwrap();
        assert_eq!(h0, h1, "{msg}");
        assert_eq!(
            before[0x40000..0x40000 + 2_068_480],
            after[0x40000..0x40000 + 2_068_480]
        );
    }
    // A plain image: QEMU's message.
    let plain = Arc::new(CrashStorage::new());
    let mut img = Image::create(plain, &CreateOptions::new(1 << 20)).unwrap();
    let e = img
        .amend(&AmendOptions {
            encrypt: Some(KeyslotAmend {
                state: Some("active".into()),
                ..KeyslotAmend::default()
            }),
            ..AmendOptions::default()
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Can't amend encryption options - encryption not present"),
        "{e}"
    );
}
