//! The `LEAKTRACE_SAMPLE_BYTES` setting, read without allocating.

use core::ffi::CStr;

/// Name of the variable that sets the mean number of bytes between samples.
pub const SAMPLE_BYTES_VAR: &CStr = c"LEAKTRACE_SAMPLE_BYTES";

/// Name of the variable that asks for CPython's object and mem domains to be sampled too (`1`).
/// Off by default: on LTO builds (Debian's, 3.14's) any wrapper defeats `PyObject_Malloc`'s
/// devirtualised fast path, 4-8 ns per allocation even while no tracer listens.
pub const SAMPLE_PYTHON_VAR: &CStr = c"LEAKTRACE_SAMPLE_PYTHON";

/// Whether `LEAKTRACE_SAMPLE_PYTHON` is `1`.
pub fn python_domains_wanted() -> bool {
    // SAFETY: a NUL-terminated literal; getenv only reads the environment.
    let value = unsafe { libc::getenv(SAMPLE_PYTHON_VAR.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string owned by the environment.
    !value.is_null() && unsafe { CStr::from_ptr(value) }.to_bytes() == b"1"
}

/// Name of the variable that sets the most samples a second the process takes (`0`: no
/// ceiling; unset: `throttle::DEFAULT_LIMIT`).
pub const SAMPLE_LIMIT_VAR: &CStr = c"LEAKTRACE_SAMPLE_LIMIT";

/// Reads `LEAKTRACE_SAMPLE_LIMIT`: a decimal count of samples a second; `None` when it is not one.
pub fn read_sample_limit() -> Option<u64> {
    // SAFETY: as in `read_sample_bytes`.
    let value = unsafe { libc::getenv(SAMPLE_LIMIT_VAR.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string owned by the environment.
    let value = (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_bytes());
    match value {
        // Unset or empty: the default, as for LEAKTRACE_SAMPLE_BYTES.
        None | Some(b"") => Some(crate::throttle::DEFAULT_LIMIT),
        Some(digits) => parse_count(digits),
    }
}

/// A plain decimal count (no sign, no suffix, no spaces).
fn parse_count(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// What `warn_invalid_sample_limit` writes (its default kept in step by a test).
const INVALID_LIMIT: &[u8] = b"leaktrace-preload: ignoring LEAKTRACE_SAMPLE_LIMIT (want samples a \
second, e.g. 4000, or 0 for no ceiling): the default, 4000, applies\n";

/// Tells the user that `LEAKTRACE_SAMPLE_LIMIT` was ignored (a plain write(2), as below).
pub fn warn_invalid_sample_limit() {
    // SAFETY: a valid buffer; a failed write only loses the warning.
    let _ = unsafe { libc::write(2, INVALID_LIMIT.as_ptr().cast(), INVALID_LIMIT.len()) };
}

/// What the variable asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleBytes {
    /// Unset, empty or zero: keep the sampler's own default.
    Default,
    /// A mean interval in bytes (the sampler raises anything under 64 KiB to 64 KiB).
    Bytes(u64),
    /// Not a number we understand; the default applies.
    Invalid,
}

/// Parses a decimal byte count with an optional `k`/`K` (KiB) or `m`/`M` (MiB) suffix.
pub fn parse_sample_bytes(value: &[u8]) -> SampleBytes {
    let (digits, scale) = match value.split_last() {
        None => return SampleBytes::Default,
        Some((b'k' | b'K', rest)) => (rest, 1u64 << 10),
        Some((b'm' | b'M', rest)) => (rest, 1u64 << 20),
        Some(_) => (value, 1),
    };
    if digits.is_empty() {
        return SampleBytes::Invalid;
    }
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return SampleBytes::Invalid;
        }
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
        {
            Some(n) => n,
            None => return SampleBytes::Invalid,
        };
    }
    match n.checked_mul(scale) {
        // The sampler treats 0 as "revert to the default", so say so rather than pretend that
        // zero means "sample everything".
        Some(0) => SampleBytes::Default,
        Some(bytes) => SampleBytes::Bytes(bytes),
        None => SampleBytes::Invalid,
    }
}

/// Reads `LEAKTRACE_SAMPLE_BYTES` through libc, because `std::env` allocates and this runs
/// inside the allocator before the process has started.
pub fn read_sample_bytes() -> SampleBytes {
    // SAFETY: the name is a NUL-terminated literal; getenv only reads the environment, and the
    // constructor that calls this runs before the program can start threads that change it.
    let value = unsafe { libc::getenv(SAMPLE_BYTES_VAR.as_ptr()) };
    if value.is_null() {
        return SampleBytes::Default;
    }
    // SAFETY: getenv returned a non-null pointer to a NUL-terminated string owned by the
    // environment, which nothing frees while we read it.
    let value = unsafe { CStr::from_ptr(value) };
    parse_sample_bytes(value.to_bytes())
}

/// Tells the user on stderr that their setting was ignored, with a plain write(2) because
/// stdio may allocate.
pub fn warn_invalid_sample_bytes() {
    const MSG: &[u8] =
        b"leaktrace-preload: ignoring LEAKTRACE_SAMPLE_BYTES (want e.g. 524288, 512k or 1M)\n";
    // SAFETY: MSG is a valid buffer of MSG.len() bytes; a failed or short write only loses the
    // warning, which is acceptable.
    let _ = unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
}

#[cfg(test)]
mod tests {
    use super::{parse_sample_bytes as parse, SampleBytes::*};

    #[test]
    fn plain_and_suffixed_sizes() {
        assert_eq!(parse(b"524288"), Bytes(524_288));
        assert_eq!(parse(b"64k"), Bytes(65_536));
        assert_eq!(parse(b"64K"), Bytes(65_536));
        assert_eq!(parse(b"1m"), Bytes(1 << 20));
        assert_eq!(parse(b"2M"), Bytes(2 << 20));
    }

    #[test]
    fn the_invalid_limit_warning_names_the_default() {
        let msg = core::str::from_utf8(super::INVALID_LIMIT).unwrap();
        let default = crate::throttle::DEFAULT_LIMIT.to_string();
        assert!(
            msg.contains(&format!("the default, {default}, applies")),
            "{msg}"
        );
    }

    #[test]
    fn sample_limits_are_plain_counts() {
        assert_eq!(super::parse_count(b"4000"), Some(4000));
        assert_eq!(super::parse_count(b"0"), Some(0));
        for bad in [&b""[..], b"4k", b"-1", b" 1", b"99999999999999999999"] {
            assert_eq!(super::parse_count(bad), None);
        }
    }

    #[test]
    fn zero_and_empty_keep_the_default() {
        assert_eq!(parse(b""), Default);
        assert_eq!(parse(b"0"), Default);
        assert_eq!(parse(b"0k"), Default);
    }

    #[test]
    fn rejects_junk_and_overflow() {
        for bad in [
            &b"k"[..],
            b"12x",
            b"-5",
            b" 5",
            b"5 ",
            b"1.5m",
            b"5kb",
            b"99999999999999999999",
        ] {
            assert_eq!(parse(bad), Invalid, "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(parse(b"18446744073709551615m"), Invalid);
        assert_eq!(parse(b"17592186044416m"), Invalid); // 2^44 MiB = 2^64 bytes
        assert_eq!(parse(b"17592186044415m"), Bytes(17_592_186_044_415 << 20));
    }
}
