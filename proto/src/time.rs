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

#[cfg(test)]
mod tests {
    use super::*;

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
