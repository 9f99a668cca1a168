//! LUKS key-slot changes by `qemu-img amend -o encrypt.*` (QEMU's
//! `qcrypto_block_luks_amend_options`): adding a passphrase to a key slot
//! (`encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N][,encrypt.iter-time=MS]`)
//! and erasing slots (`encrypt.state=inactive` with `encrypt.keyslot=N` and/or
//! `encrypt.old-secret=ID`), with QEMU's checks, refusals and messages.
//!
//! Crash safety (a crash never loses the only working key slot):
//! - adding: the new slot's material is written and flushed **before** the header that
//!   marks the slot active is written (and flushed). A crash in between leaves the old
//!   header, in which the slot is still inactive; the other slots were not touched.
//! - erasing: the header that marks the slot inactive is written and flushed **before**
//!   the old material is overwritten. A crash in between leaves a header without that
//!   slot; the slots that stay active were not touched. Erasing the last active slot is
//!   refused without `--force`.
//! - overwriting an active slot in place (`--force` with an active `encrypt.keyslot`) is
//!   the one unsafe case, as in QEMU: between the material write and the header write that
//!   slot opens with neither passphrase.

use crate::error::{ImageError, Op, Result, ENOTSUP};
use crate::Image;
use qcow2_crypto::keyslot::{CpuTimeBench, OsRandom, RandomSource, ERASE_PASSES};
use qcow2_crypto::luks::{LuksHeader, LUKS_HEADER_SIZE, LUKS_NUM_KEY_SLOTS};
use qcow2_crypto::Secret;
use qcow2_format::extensions::CryptoHeaderExtension;
use qcow2_format::header::{CRYPT_AES, CRYPT_NONE};
use qcow2_io::errno::EINVAL;

/// `encrypt.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyslotState {
    /// Put a passphrase into a slot.
    Active,
    /// Erase slots.
    Inactive,
}

/// The `encrypt.*` amend options, as given (QEMU checks them when it applies them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyslotAmend {
    /// `encrypt.state` as given (required: "Parameter 'state' is missing").
    pub state: Option<String>,
    /// `encrypt.keyslot`.
    pub keyslot: Option<i64>,
    /// `encrypt.new-secret`: id of the secret to put into the slot.
    pub new_secret: Option<String>,
    /// `encrypt.old-secret`: id of the secret whose slots to erase.
    pub old_secret: Option<String>,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    pub iter_time: Option<u64>,
}

fn refused(message: impl Into<String>, errno: i32) -> ImageError {
    ImageError::Refused {
        op: Op::Amend,
        message: message.into(),
        hint: None,
        errno,
    }
}

impl KeyslotAmend {
    /// Takes one `encrypt.*` option of the amend list.
    pub(crate) fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "encrypt.state" => self.state = Some(value.to_owned()),
            "encrypt.keyslot" => {
                self.keyslot =
                    Some(value.parse().map_err(|_| {
                        refused(format!("Parameter '{key}' expects a number"), EINVAL)
                    })?)
            }
            "encrypt.new-secret" => self.new_secret = Some(value.to_owned()),
            "encrypt.old-secret" => self.old_secret = Some(value.to_owned()),
            "encrypt.iter-time" => {
                self.iter_time =
                    Some(value.parse().map_err(|_| {
                        refused(format!("Parameter '{key}' expects a number"), EINVAL)
                    })?)
            }
            _ => return Err(refused(format!("Invalid parameter '{key}'"), EINVAL)),
        }
        Ok(())
    }

    fn state(&self) -> Result<KeyslotState> {
        match self.state.as_deref() {
            None => Err(refused("Parameter 'state' is missing", EINVAL)),
            Some("active") => Ok(KeyslotState::Active),
            Some("inactive") => Ok(KeyslotState::Inactive),
            Some(v) => Err(refused(
                format!("Parameter 'state' does not accept value '{v}'"),
                EINVAL,
            )),
        }
    }
}

/// QEMU's refusals of `encrypt.*` on images without LUKS.
pub(crate) fn check_amendable(crypt_method: u32) -> Result<()> {
    match crypt_method {
        CRYPT_NONE => Err(refused(
            "Can't amend encryption options - encryption not present",
            EINVAL,
        )),
        CRYPT_AES => Err(refused(
            "Only LUKS encryption options can be amended",
            ENOTSUP,
        )),
        _ => Ok(()),
    }
}

fn lookup(secrets: &[(String, Secret)], id: &str) -> Result<Secret> {
    secrets
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, s)| s.clone())
        .ok_or_else(|| refused(format!("No secret with id '{id}'"), EINVAL))
}

fn luks_err(e: qcow2_crypto::LuksError) -> ImageError {
    refused(e.to_string(), EINVAL)
}

impl Image {
    /// Applies `encrypt.*` amend options to the LUKS header (see the module docs for the
    /// write order).
    pub(crate) fn amend_keyslots(
        &mut self,
        a: &KeyslotAmend,
        secrets: &[(String, Secret)],
        force: bool,
    ) -> Result<()> {
        check_amendable(self.fc.header.crypt_method)?;
        let state = a.state()?;
        let ext = self
            .fc
            .extensions
            .crypto_header
            .ok_or_else(|| refused("Missing CRYPTO header for crypt method 2", EINVAL))?;
        let storage = self.storage.clone();
        let mut read =
            |off: u64, buf: &mut [u8]| crate::crypto::read_area(storage.as_ref(), &ext, off, buf);
        let mut hdr = vec![0u8; LUKS_HEADER_SIZE];
        read(0, &mut hdr).map_err(luks_err)?;
        let mut header = LuksHeader::parse(&hdr).map_err(luks_err)?;
        header.check().map_err(luks_err)?;
        let slot_index = |k: i64| -> Result<usize> {
            usize::try_from(k)
                .ok()
                .filter(|&k| k < LUKS_NUM_KEY_SLOTS)
                .ok_or_else(|| {
                    refused(
                        format!("Invalid keyslot {k} specified, must be between 0 and 7"),
                        EINVAL,
                    )
                })
        };
        match state {
            KeyslotState::Active => {
                let Some(new_id) = &a.new_secret else {
                    return Err(refused(
                        "'new-secret' is required to activate a keyslot",
                        EINVAL,
                    ));
                };
                if a.old_secret.is_some() {
                    return Err(refused(
                        "'old-secret' must not be given when activating keyslots",
                        EINVAL,
                    ));
                }
                let slot = match a.keyslot {
                    Some(k) => slot_index(k)?,
                    None => header.free_slot().ok_or_else(|| {
                        refused("Can't add a keyslot - all keyslots are in use", EINVAL)
                    })?,
                };
                if !force && header.key_slots[slot].is_active() {
                    return Err(refused(
                        format!(
                            "Refusing to overwrite active keyslot {slot} - please erase it first"
                        ),
                        EINVAL,
                    ));
                }
                // The master key, from the secret the image was opened with.
                let Some(open_secret) = self.opts.key_secret.clone() else {
                    return Err(refused(
                        "Parameter 'encrypt.key-secret' is required for cipher",
                        EINVAL,
                    ));
                };
                let master = header
                    .master_key(open_secret.as_bytes(), &mut read)
                    .map_err(luks_err)?;
                let new = lookup(secrets, new_id)?;
                let iter_time = a
                    .iter_time
                    .unwrap_or(qcow2_crypto::keyslot::DEFAULT_ITER_TIME_MS);
                let material = header
                    .store_key(
                        slot,
                        new.as_bytes(),
                        &master,
                        iter_time,
                        &mut OsRandom,
                        &mut CpuTimeBench,
                    )
                    .map_err(luks_err)?;
                let (at, _) = header.slot_material_range(slot).map_err(luks_err)?;
                self.write_luks(&ext, at, &material)?;
                self.write_luks(&ext, 0, &header.to_bytes())
            }
            KeyslotState::Inactive => {
                if a.new_secret.is_some() {
                    return Err(refused(
                        "'new-secret' must not be given when erasing keyslots",
                        EINVAL,
                    ));
                }
                if a.iter_time.is_some() {
                    return Err(refused(
                        "'iter-time' must not be given when erasing keyslots",
                        EINVAL,
                    ));
                }
                let old = a
                    .old_secret
                    .as_deref()
                    .map(|id| lookup(secrets, id))
                    .transpose()?;
                let to_erase: Vec<usize> = if let Some(k) = a.keyslot {
                    let slot = slot_index(k)?;
                    if let Some(old) = &old {
                        if header
                            .load_key(slot, old.as_bytes(), &mut read)
                            .map_err(luks_err)?
                            .is_none()
                        {
                            return Err(refused(
                                format!(
                                    "Given keyslot {slot} doesn't contain the given old \
                                     password for erase operation"
                                ),
                                EINVAL,
                            ));
                        }
                    }
                    if !force && !header.key_slots[slot].is_active() {
                        return Err(refused(
                            format!("Given keyslot {slot} is already erased (inactive) "),
                            EINVAL,
                        ));
                    }
                    if !force && header.active_slots() == 1 {
                        return Err(refused(
                            format!(
                                "Attempt to erase the only active keyslot {slot} which will \
                                 erase all the data in the image irreversibly - refusing \
                                 operation"
                            ),
                            EINVAL,
                        ));
                    }
                    vec![slot]
                } else if let Some(old) = &old {
                    let mut matching = Vec::new();
                    for slot in 0..LUKS_NUM_KEY_SLOTS {
                        if header
                            .load_key(slot, old.as_bytes(), &mut read)
                            .map_err(luks_err)?
                            .is_some()
                        {
                            matching.push(slot);
                        }
                    }
                    if matching.is_empty() {
                        return Err(refused(
                            "No keyslots match given (old) password for erase operation",
                            EINVAL,
                        ));
                    }
                    if !force && matching.len() == header.active_slots() {
                        return Err(refused(
                            "All the active keyslots match the (old) password that was given \
                             and erasing them will erase all the data in the image \
                             irreversibly - refusing operation",
                            EINVAL,
                        ));
                    }
                    matching
                } else {
                    return Err(refused(
                        "To erase keyslot(s), either explicit keyslot index or the password \
                         currently contained in them must be given",
                        EINVAL,
                    ));
                };
                for slot in to_erase {
                    header.erase_key(slot).map_err(luks_err)?;
                    self.write_luks(&ext, 0, &header.to_bytes())?;
                    let (at, len) = header.slot_material_range(slot).map_err(luks_err)?;
                    // Bounded: key_bytes * stripes of a checked header (at most 64 * 4000).
                    let mut garbage = vec![0u8; len as usize];
                    for _ in 0..ERASE_PASSES {
                        OsRandom.fill(&mut garbage).map_err(luks_err)?;
                        self.write_luks(&ext, at, &garbage)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes `data` at `off` of the LUKS area and flushes: each step of a key-slot change
    /// is durable before the next one starts. The area belongs to the image header, so the
    /// metadata overlap check (which guards it) is not asked.
    fn write_luks(&mut self, ext: &CryptoHeaderExtension, off: u64, data: &[u8]) -> Result<()> {
        let at = crate::crypto::area_offset(ext, off, data.len()).map_err(luks_err)?;
        let io = |e| ImageError::io(Op::Amend, "write LUKS key slot", at, e);
        self.storage.write_at(data, at).map_err(io)?;
        self.storage.flush().map_err(io)
    }
}
