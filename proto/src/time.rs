//! Calendar dates of times in ms since the Unix epoch (UTC), for statements,
//! billing periods and messages: one conversion for every crate.

/// The UTC calendar date (year, month 1-12, day 1-31) of a time in ms since
/// the Unix epoch.
pub fn civil_date(time_ms: u64) -> (i64, u32, u32) {
    // Howard Hinnant's civil_from_days.
    let days = i64::try_from(time_ms / 86_400_000).unwrap_or(i64::MAX / 2) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// A time in ms since the Unix epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn utc_text(time_ms: u64) -> String {
    let (year, month, day) = civil_date(time_ms);
    let seconds = time_ms / 1000 % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Days since the Unix epoch of a proleptic Gregorian date (Howard
/// Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// An `xsd:dateTime` with its zone (`2026-12-03T10:00:00Z`,
/// `...T10:00:00.123+01:00`), as ms since the Unix epoch; `None` for any
/// other text, a time without a zone, or one before 1970.
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !text.is_ascii() {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &text[range];
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't') {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0u64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes: i64 = match rest {
        "Z" | "z" => 0,
        zone if zone.len() == 6
            && matches!(zone.as_bytes()[0], b'+' | b'-')
            && zone.as_bytes()[3] == b':' =>
        {
            let digits = |part: &str| -> Option<i64> {
                part.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| part.parse().ok())?
            };
            let (hours, minutes) = (digits(&zone[1..3])?, digits(&zone[4..6])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
        _ => return None,
    };
    let seconds = days_from_civil(i64::from(year), month, day) * 86_400
        + i64::from(hour) * 3_600
        + i64::from(minute) * 60
        + i64::from(second)
        - offset_minutes * 60;
    let ms = seconds
        .checked_mul(1_000)?
        .checked_add(i64::try_from(millis).ok()?)?;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsd_date_times_with_zones_are_read_to_the_millisecond() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2025-11-30T23:59:59.999Z"),
            Some(1_764_547_199_999)
        );
        assert_eq!(
            parse_rfc3339_ms("2025-12-01T00:00:00+00:00"),
            Some(1_764_547_200_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2025-12-01T01:30:00+01:30"),
            Some(1_764_547_200_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2025-11-30T23:00:00-01:00"),
            Some(1_764_547_200_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.5Z"),
            Some(951_782_400_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.123456Z"),
            Some(951_782_400_123)
        );
        for bad in [
            "2025-12-01T00:00:00",
            "2025-12-01 00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-12-01T24:00:00Z",
            "2025-12-01T00:00:00.Z",
            "2025-12-01T00:00:00+1:00",
            "1969-12-31T23:59:59Z",
            "2025-12-01T00:00:00Zjunk",
            "２０２５-12-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(951_782_400_000), (2000, 2, 29));
        assert_eq!(civil_date(1_764_547_199_999), (2025, 11, 30));
        assert_eq!(civil_date(1_764_547_200_000), (2025, 12, 1));
        assert_eq!(utc_text(1_764_547_199_999), "2025-11-30 23:59:59Z");
        assert_eq!(utc_text(0), "1970-01-01 00:00:00Z");
    }
}
