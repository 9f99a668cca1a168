//! Sizes as qemu-img reads and prints them.
//!
//! [`parse_size`] follows QEMU's `qemu_strtosz`: a decimal integer with an optional
//! fraction, or a `0x` hexadecimal integer (no fraction, no suffix), then an optional
//! binary suffix `b`/`B` (1), `k`/`K` (2^10), `m`/`M`, `g`/`G`, `t`/`T`, `p`/`P`, `e`/`E`
//! (2^60). A fraction needs a suffix other than bytes; the result is rounded half up.
//! [`size_to_str`] is QEMU's `size_to_str` ("196 KiB", "1 GiB", "48.5 KiB").

/// Why a size string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number (or trailing garbage).
    Invalid,
    /// Does not fit in 64 bits.
    Overflow,
}

fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// Parses a size the way `qemu_strtosz` does; the whole string must be consumed.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i < b.len() && b[i] == b'+' {
        i += 1;
    }
    if i < b.len() && b[i] == b'-' {
        return Err(SizeError::Overflow);
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[int_start..i];
    // Hexadecimal: "0x..." with no fraction and no suffix.
    if int_digits == "0" && i < b.len() && (b[i] == b'x' || b[i] == b'X') {
        let hex = &s[i + 1..];
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Overflow);
    }
    let mut frac_digits = "";
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let f = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &s[f..i];
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(SizeError::Invalid);
        }
    } else if int_digits.is_empty() {
        return Err(SizeError::Invalid);
    }
    let int_val: u128 = if int_digits.is_empty() {
        0
    } else {
        // More than 39 digits overflow u128 parsing; anything that long overflows u64 anyway.
        int_digits
            .parse::<u128>()
            .map_err(|_| SizeError::Overflow)?
    };
    let shift = match b.get(i) {
        Some(&c) => {
            let sh = suffix_shift(c).ok_or(SizeError::Invalid)?;
            i += 1;
            sh
        }
        None => 0,
    };
    if i != b.len() {
        return Err(SizeError::Invalid);
    }
    let has_fraction = frac_digits.bytes().any(|c| c != b'0');
    if shift == 0 && has_fraction {
        return Err(SizeError::Invalid);
    }
    let mul: u128 = 1u128 << shift;
    let mut val = int_val.checked_mul(mul).ok_or(SizeError::Overflow)?;
    if has_fraction {
        // QEMU keeps 64 fractional bits; 18 decimal digits are more precise than any
        // suffix needs, and rounding is half up as in QEMU.
        let digits: String = frac_digits.chars().take(18).collect();
        let num: u128 = digits.parse().map_err(|_| SizeError::Invalid)?;
        let den: u128 = 10u128.pow(digits.len() as u32);
        let scaled = num * mul;
        val += (scaled + den / 2) / den;
    }
    u64::try_from(val).map_err(|_| SizeError::Overflow)
}

/// Formats a double like C's `%0.3g`.
pub fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let e = format!("{v:.2e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: binary units with three significant digits, switching to the
/// next unit from 1000 of the current one ("0 B", "512 B", "196 KiB", "1 GiB").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp exponent: scaled = m * 2^exp with m in [0.5, 1).
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = (((exp - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5M"), Ok(1_572_864));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("0x100000"), Ok(1_048_576));
        assert_eq!(parse_size(" 1M"), Ok(1 << 20));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("1.5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1kB"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1e3"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1X"), Err(SizeError::Invalid));
        assert_eq!(parse_size(""), Err(SizeError::Invalid));
        assert_eq!(parse_size("0x1k"), Err(SizeError::Invalid));
        assert_eq!(parse_size("-5"), Err(SizeError::Overflow));
        assert_eq!(parse_size("16E"), Err(SizeError::Overflow));
        assert_eq!(
            parse_size("100000000000000000000"),
            Err(SizeError::Overflow)
        );
        assert_eq!(parse_size("8E"), Ok(1 << 63));
    }

    #[test]
    fn size_strings_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(200_704), "196 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(49_664), "48.5 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(512 << 20), "512 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
