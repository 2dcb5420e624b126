//! Parsers for command-line sizes (`64M`, `1G`, `4096`), bandwidths (`1Gbit`, `100M/s`) and
//! durations (`500ms`, `2s`).

use std::time::Duration;

/// Why a size, bandwidth or duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Empty input.
    #[error("empty value")]
    Empty,
    /// Not a number with an optional known suffix.
    #[error("cannot parse {0:?}: expected a number with an optional suffix ({1})")]
    Syntax(String, &'static str),
    /// The value does not fit in 64 bits.
    #[error("{0:?} is too large")]
    Overflow(String),
}

const SIZE_SUFFIXES: &str = "K, M, G, T (powers of 1024; optional B / iB)";
const DURATION_SUFFIXES: &str = "ms, s, m; a bare number is seconds";

fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// Parse a byte size: a decimal integer with an optional binary suffix
/// `K`/`M`/`G`/`T` (also `KB`, `KiB`, lower case). `"64M"` = 67108864.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let (num, suffix) = split_number(s);
    let syntax = || UnitError::Syntax(input.to_string(), SIZE_SUFFIXES);
    if num.is_empty() {
        return Err(syntax());
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(syntax()),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| UnitError::Overflow(input.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| UnitError::Overflow(input.to_string()))
}

/// Parse a duration: an integer with suffix `ms`, `s` or `m`; a bare number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let (num, suffix) = split_number(s);
    let syntax = || UnitError::Syntax(input.to_string(), DURATION_SUFFIXES);
    if num.is_empty() {
        return Err(syntax());
    }
    let n: u64 = num
        .parse()
        .map_err(|_| UnitError::Overflow(input.to_string()))?;
    let ms = match suffix {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        _ => return Err(syntax()),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| UnitError::Overflow(input.to_string()))
}

/// Parses a bandwidth: bytes with a decimal unit as QEMU reads them (`25MB` = 25 000 000
/// bytes/s, also `KB`, `GB`, `TB`), a byte size as in [`parse_size`] (`100M` and `100MiB` =
/// 100 MiB/s: a bare or `iB` suffix stays binary), or a bit rate with decimal prefixes
/// (`1Gbit` = 10^9 bit/s = 125 000 000 bytes/s, also `Kbit`, `Mbit`, `bit`). A trailing `/s`
/// or `ps` is ignored. Returns bytes per second.
pub fn parse_bandwidth(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    let s = s
        .strip_suffix("/s")
        .or_else(|| s.strip_suffix("ps"))
        .unwrap_or(s)
        .trim();
    let lower = s.to_ascii_lowercase();
    if let Some(num) = lower
        .strip_suffix("bit")
        .or_else(|| lower.strip_suffix("bits"))
    {
        let (digits, mult) = match num.trim().char_indices().last() {
            Some((i, 'k')) => (&num[..i], 1_000u64),
            Some((i, 'm')) => (&num[..i], 1_000_000),
            Some((i, 'g')) => (&num[..i], 1_000_000_000),
            Some((i, 't')) => (&num[..i], 1_000_000_000_000),
            _ => (num, 1),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| UnitError::Syntax(input.to_string(), "a number of bits, e.g. 1Gbit"))?;
        let bits = n
            .checked_mul(mult)
            .ok_or_else(|| UnitError::Overflow(input.to_string()))?;
        return Ok(bits / 8);
    }
    let (digits, suffix) = split_number(s);
    let decimal = match suffix.to_ascii_lowercase().as_str() {
        "kb" => Some(1_000u64),
        "mb" => Some(1_000_000),
        "gb" => Some(1_000_000_000),
        "tb" => Some(1_000_000_000_000),
        _ => None,
    };
    if let (Some(mult), false) = (decimal, digits.is_empty()) {
        let n: u64 = digits
            .parse()
            .map_err(|_| UnitError::Overflow(input.to_string()))?;
        return n
            .checked_mul(mult)
            .ok_or_else(|| UnitError::Overflow(input.to_string()));
    }
    parse_size(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size(" 3 MB "), Ok(3 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size(""), Err(UnitError::Empty));
        assert!(matches!(parse_size("M"), Err(UnitError::Syntax(..))));
        assert!(matches!(parse_size("12X"), Err(UnitError::Syntax(..))));
        assert!(matches!(parse_size("-1"), Err(UnitError::Syntax(..))));
        assert!(matches!(parse_size("1.5G"), Err(UnitError::Syntax(..))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration(""), Err(UnitError::Empty));
        assert!(matches!(parse_duration("5h"), Err(UnitError::Syntax(..))));
        assert!(matches!(parse_duration("ms"), Err(UnitError::Syntax(..))));
        assert!(matches!(
            parse_duration("18446744073709551615s"),
            Err(UnitError::Overflow(_))
        ));
    }

    /// As QEMU reads them: `MB` is 10^6 bytes; `MiB` and a bare `M` stay binary.
    #[test]
    fn decimal_byte_units_are_decimal_in_bandwidths() {
        assert_eq!(parse_bandwidth("25MB"), Ok(25_000_000));
        assert_eq!(parse_bandwidth("25 MB/s"), Ok(25_000_000));
        assert_eq!(parse_bandwidth("500kB"), Ok(500_000));
        assert_eq!(parse_bandwidth("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("25MiB"), Ok(25 << 20));
        assert_eq!(parse_bandwidth("25M"), Ok(25 << 20));
        assert_eq!(parse_bandwidth("1GiB/s"), Ok(1 << 30));
        // Sizes keep their binary reading of every suffix, as documented.
        assert_eq!(parse_size("25MB"), Ok(25 << 20));
    }

    #[test]
    fn bandwidths_parse() {
        assert_eq!(parse_bandwidth("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("800Mbit/s"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("64kbit"), Ok(8_000));
        assert_eq!(parse_bandwidth("100M"), Ok(100 << 20));
        assert_eq!(parse_bandwidth("512K/s"), Ok(512 << 10));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert!(parse_bandwidth("fastbit").is_err());
        assert!(parse_bandwidth("99999999999TB").is_err());
        assert!(parse_bandwidth("1Xbit").is_err());
        assert!(parse_bandwidth("").is_err());
    }
}
