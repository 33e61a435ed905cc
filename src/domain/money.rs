//! Credit and money amounts as exact integers, and their decimal text forms.
//!
//! Credits are kept as micro-credits (`i64`, 1 credit = 1,000,000 µcr); money
//! as minor units (cents). REST shows both as JSON decimal numbers; the
//! conversions here go through decimal text, never through floating point.

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;

/// `value / 10^scale` as the shortest exact decimal (`12.5`, `-3`, `0.000001`).
fn to_decimal(value: i64, scale: u32) -> String {
    let unit = 10u64.pow(scale);
    let sign = if value < 0 { "-" } else { "" };
    let abs = value.unsigned_abs();
    let (whole, frac) = (abs / unit, abs % unit);
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let digits = format!("{frac:0width$}", width = scale as usize);
    format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
}

/// Micro-credits as a decimal number of credits.
pub fn micros_to_decimal(micros: i64) -> String {
    to_decimal(micros, 6)
}

/// Cents as a decimal number of currency units (`1999` → `19.99`).
pub fn cents_to_decimal(cents: i64) -> String {
    to_decimal(cents, 2)
}

/// Parses a decimal number of credits (JSON number text such as `12.5`,
/// `-3`, `1e3`) into micro-credits, exactly. More than 6 decimals, or a value
/// outside `i64` micros, is an error.
pub fn parse_credits(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = text[i + 1..]
                .parse()
                .map_err(|_| format!("`{text}` is not a number"))?;
            (&text[..i], exp)
        }
        None => (text, 0),
    };
    let (negative, digits) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (digits.contains('.') && frac.is_empty())
    {
        return Err(format!("`{text}` is not a number"));
    }
    // value = (whole.frac digits as integer) * 10^(exponent - frac.len())
    let all_digits = format!("{whole}{frac}");
    let all_digits = all_digits.trim_start_matches('0');
    let shift = i64::from(exponent) - frac.len() as i64 + 6; // to micros
    let significant = all_digits.trim_end_matches('0');
    let trailing_zeros = (all_digits.len() - significant.len()) as i64;
    if significant.is_empty() {
        return Ok(0);
    }
    let shift = shift + trailing_zeros;
    if shift < 0 {
        return Err(format!("`{text}` has more than 6 decimals"));
    }
    let too_big = || format!("`{text}` is too large");
    if significant.len() as i64 + shift > 19 {
        return Err(too_big());
    }
    let base: i64 = significant.parse().map_err(|_| too_big())?;
    let micros = 10i64
        .checked_pow(u32::try_from(shift).map_err(|_| too_big())?)
        .and_then(|m| base.checked_mul(m))
        .ok_or_else(too_big)?;
    Ok(if negative { -micros } else { micros })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_exact_decimals() {
        assert_eq!(micros_to_decimal(12_500_000), "12.5");
        assert_eq!(micros_to_decimal(-3_000_000), "-3");
        assert_eq!(micros_to_decimal(1), "0.000001");
        assert_eq!(micros_to_decimal(0), "0");
        assert_eq!(micros_to_decimal(i64::MIN), "-9223372036854.775808");
        assert_eq!(cents_to_decimal(1999), "19.99");
        assert_eq!(cents_to_decimal(2000), "20");
        assert_eq!(cents_to_decimal(5), "0.05");
    }

    #[test]
    fn parses_credit_numbers_exactly() {
        assert_eq!(parse_credits("12.5"), Ok(12_500_000));
        assert_eq!(parse_credits("-3"), Ok(-3_000_000));
        assert_eq!(parse_credits("0.000001"), Ok(1));
        assert_eq!(parse_credits("0.1"), Ok(100_000));
        assert_eq!(parse_credits("1e3"), Ok(1_000_000_000));
        assert_eq!(
            parse_credits("1.5E-6"),
            Err("`1.5E-6` has more than 6 decimals".into())
        );
        assert_eq!(parse_credits("100.0000000"), Ok(100_000_000));
        assert!(parse_credits("0.0000001").is_err());
        assert!(parse_credits("99999999999999").is_err());
        assert!(parse_credits("abc").is_err());
        assert!(parse_credits("1.").is_err());
        assert!(parse_credits("").is_err());
    }

    #[test]
    fn round_trips() {
        for m in [0, 1, 999_999, 1_000_000, 123_456_789, -42, i64::MAX] {
            assert_eq!(parse_credits(&micros_to_decimal(m)), Ok(m));
        }
    }
}
