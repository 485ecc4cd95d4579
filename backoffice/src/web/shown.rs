//! How the pages show money and time: the branch's currency and time zone.
//!
//! Money has one format everywhere, the branch's currency
//! code before the amount (`EUR 1.50`, `EUR -0.25`). Balances and totals
//! are rounded to the currency's minor unit, half to even, for display only
//! (the ledger keeps 9 places, `docs/protocol.md`); prices of one use are
//! shown exact, with at least the minor unit's places (`EUR 0.25`,
//! `EUR 0.000125`), since a use may cost less than a cent.

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use proto::Amount;

/// How the pages show amounts and times: in the branch's currency and
/// time zone. A statement's month and a chart's days are always the
/// branch's; times and dates are shown in the viewer's own zone when they
/// chose one ([`Shown::for_viewer`]).
#[derive(Debug, Clone)]
pub struct Shown {
    /// The branch's currency.
    pub currency: Currency,
    zone: TimeZone,
    zone_name: String,
    viewer: TimeZone,
    viewer_name: String,
}

/// Why a time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a time zone of the IANA database (like UTC, Europe/Paris or America/New_York)"
)]
pub struct BadZone(pub String);

impl Default for Shown {
    fn default() -> Self {
        Shown {
            currency: Currency::default(),
            zone: TimeZone::UTC,
            zone_name: "UTC".to_owned(),
            viewer: TimeZone::UTC,
            viewer_name: "UTC".to_owned(),
        }
    }
}

impl Shown {
    /// Amounts in `currency`, times in the IANA time zone `zone`.
    pub fn new(currency: Currency, zone: &str) -> Result<Shown, BadZone> {
        let found = find_zone(zone)?;
        Ok(Shown {
            currency,
            zone: found.clone(),
            zone_name: zone.to_owned(),
            viewer: found,
            viewer_name: zone.to_owned(),
        })
    }

    /// The same, with times shown in `zone` when it names one (a
    /// customer's own, from their profile; empty or unknown: the branch's).
    pub fn for_viewer(&self, zone: &str) -> Shown {
        let mut shown = self.clone();
        if let Ok(found) = find_zone(zone) {
            shown.viewer = found;
            shown.viewer_name = zone.to_owned();
        }
        shown
    }

    /// The branch's time zone (months and days of statements and charts).
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// The zone times are shown in: the viewer's, else the branch's.
    pub fn viewer_zone_name(&self) -> &str {
        &self.viewer_name
    }

    fn zoned_in(time_ms: u64, zone: &TimeZone) -> Zoned {
        let stamp = i64::try_from(time_ms)
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .unwrap_or(Timestamp::MAX);
        stamp.to_zoned(zone.clone())
    }

    /// A time in the zone times are shown in.
    fn zoned(&self, time_ms: u64) -> Zoned {
        Self::zoned_in(time_ms, &self.viewer)
    }

    /// `YYYY-MM-DD` of a time in ms since the Unix epoch, in the zone.
    pub fn date(&self, time_ms: u64) -> String {
        self.zoned(time_ms).strftime("%Y-%m-%d").to_string()
    }

    /// `YYYY-MM-DD HH:MM ZONE` (`2026-03-29 03:30 CEST`).
    pub fn time(&self, time_ms: u64) -> String {
        self.zoned(time_ms)
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    /// `YYYY-MM-DD HH:MM:SS.mmm` in the zone: a use's time to the
    /// millisecond, as the meter stamped it.
    pub fn time_ms(&self, time_ms: u64) -> String {
        let zoned = self.zoned(time_ms);
        format!(
            "{}.{:03}",
            zoned.strftime("%Y-%m-%d %H:%M:%S"),
            zoned.millisecond()
        )
    }

    /// The month (`YYYYMM`) a time falls in, in the zone.
    pub fn month_of(&self, time_ms: u64) -> u32 {
        let zoned = Self::zoned_in(time_ms, &self.zone);
        month_number(i32::from(zoned.year()), i32::from(zoned.month()))
    }

    /// The day of its month (1 to 31) a time falls on, in the zone.
    pub fn day_of(&self, time_ms: u64) -> u32 {
        u32::try_from(Self::zoned_in(time_ms, &self.zone).day()).unwrap_or(1)
    }

    /// The zone's abbreviation at a time (`CET`, `CEST`, `UTC`).
    pub fn abbreviation(&self, time_ms: u64) -> String {
        self.zoned(time_ms).strftime("%Z").to_string()
    }
}

fn find_zone(zone: &str) -> Result<TimeZone, BadZone> {
    let refused = || BadZone(zone.chars().take(64).collect());
    if zone.is_empty() || zone.len() > 64 {
        return Err(refused());
    }
    TimeZone::get(zone).map_err(|_| refused())
}

/// The flags that set [`Shown`], for `backoffice serve` and the franchise.
#[derive(Debug, Clone, clap::Args)]
pub struct ShownArgs {
    /// The branch's currency, an ISO 4217 code: amounts on the pages and in
    /// Parlay X charges are in it.
    #[arg(long, env = "BACKOFFICE_CURRENCY", value_name = "CODE", default_value = "EUR",
        value_parser = Currency::parse)]
    pub currency: Currency,
    /// The branch's time zone, an IANA name (Europe/Paris): statements,
    /// charts and times on the pages follow it, daylight saving included.
    #[arg(long, env = "BACKOFFICE_TIME_ZONE", value_name = "ZONE", default_value = "UTC",
        value_parser = parse_zone)]
    pub time_zone: String,
}

impl ShownArgs {
    /// What the flags set.
    pub fn shown(&self) -> Shown {
        Shown::new(self.currency.clone(), &self.time_zone)
            .expect("the time zone was checked when the flags were read")
    }
}

/// Checks an IANA time zone name (for command-line flags).
pub fn parse_zone(name: &str) -> Result<String, BadZone> {
    Shown::new(Currency::default(), name).map(|_| name.to_owned())
}

fn month_number(year: i32, month: i32) -> u32 {
    u32::try_from(year * 100 + month).unwrap_or(0)
}

/// Days in the month `YYYYMM`.
pub fn days_in(month: u32) -> u32 {
    let year = i16::try_from(month / 100).unwrap_or(1970);
    let number = i8::try_from(month % 100).unwrap_or(1).clamp(1, 12);
    jiff::civil::Date::new(year, number, 1)
        .map_or(31, |date| u32::try_from(date.days_in_month()).unwrap_or(31))
}

/// The branch's currency, as the pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    code: String,
    places: u32,
}

/// Why a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a currency is an ISO 4217 code of three capital letters (EUR, USD, JPY), not {0:?}")]
pub struct BadCurrency(pub String);

impl Currency {
    /// The currency with ISO 4217 code `code`.
    pub fn parse(code: &str) -> Result<Currency, BadCurrency> {
        if code.len() != 3 || !code.bytes().all(|byte| byte.is_ascii_uppercase()) {
            return Err(BadCurrency(code.chars().take(16).collect()));
        }
        Ok(Currency {
            code: code.to_owned(),
            places: minor_places(code),
        })
    }

    /// The ISO 4217 code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Decimal places of the currency's minor unit (2 for EUR, 0 for JPY).
    pub fn places(&self) -> u32 {
        self.places
    }

    /// A balance or total, rounded half to even to the minor unit:
    /// `EUR 1.50`.
    pub fn total(&self, amount: Amount) -> String {
        format!("{} {}", self.code, self.rounded(amount))
    }

    /// The number alone of [`Currency::total`] (`1.50`), for CSV columns.
    pub fn rounded(&self, amount: Amount) -> String {
        let places = self.places as usize;
        format!("{:.places$}", amount.round_dp(self.places))
    }

    /// A price, exact, padded to the minor unit: `EUR 0.25`,
    /// `EUR 0.000125`, `EUR 3.00`.
    pub fn exact(&self, amount: Amount) -> String {
        format!("{} {}", self.code, self.exact_number(amount))
    }

    /// The number alone of [`Currency::exact`] (`0.000125`).
    pub fn exact_number(&self, amount: Amount) -> String {
        let text = amount.to_string();
        let decimals = text.split_once('.').map_or(0, |(_, after)| after.len());
        let wanted = self.places as usize;
        if decimals >= wanted {
            text
        } else if decimals == 0 {
            format!("{text}.{}", "0".repeat(wanted))
        } else {
            format!("{text}{}", "0".repeat(wanted - decimals))
        }
        .trim_end_matches('.')
        .to_owned()
    }
}

impl Default for Currency {
    fn default() -> Self {
        Currency::parse(&crate::BranchSettings::default().currency)
            .expect("the default currency is a valid code")
    }
}

/// Minor-unit places of ISO 4217 currencies that do not use two.
fn minor_places(code: &str) -> u32 {
    match code {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    #[test]
    fn totals_are_rounded_half_to_even_to_the_minor_unit() {
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(eur.total(amount("1.5")), "EUR 1.50");
        assert_eq!(eur.total(amount("0")), "EUR 0.00");
        assert_eq!(eur.total(amount("0.125")), "EUR 0.12");
        assert_eq!(eur.total(amount("0.135")), "EUR 0.14");
        assert_eq!(eur.total(amount("-0.25")), "EUR -0.25");
        assert_eq!(eur.total(amount("-0.001")), "EUR 0.00");
        assert_eq!(
            eur.total(amount("999999999999999999.999999999")),
            "EUR 1000000000000000000.00"
        );
        let yen = Currency::parse("JPY").unwrap();
        assert_eq!(yen.total(amount("1234.5")), "JPY 1234");
        assert_eq!(yen.total(amount("1235.5")), "JPY 1236");
        assert_eq!(
            Currency::parse("KWD").unwrap().total(amount("2")),
            "KWD 2.000"
        );
    }

    #[test]
    fn prices_are_exact_and_padded() {
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(eur.exact(amount("0.25")), "EUR 0.25");
        assert_eq!(eur.exact(amount("3")), "EUR 3.00");
        assert_eq!(eur.exact(amount("0.5")), "EUR 0.50");
        assert_eq!(eur.exact(amount("0.000125")), "EUR 0.000125");
        assert_eq!(eur.exact(amount("0.000000001")), "EUR 0.000000001");
        assert_eq!(eur.exact(amount("-1.1")), "EUR -1.10");
        let yen = Currency::parse("JPY").unwrap();
        assert_eq!(yen.exact(amount("3")), "JPY 3");
        assert_eq!(yen.exact(amount("0.5")), "JPY 0.5");
    }

    /// 2026-03-29 00:59:59 UTC, the last second before Paris moved its
    /// clocks from 02:00 CET to 03:00 CEST.
    const BEFORE_SPRING: u64 = 1_774_745_999_000;

    #[test]
    fn times_are_shown_in_the_branch_zone_across_a_dst_change() {
        let paris = Shown::new(Currency::default(), "Europe/Paris").unwrap();
        assert_eq!(paris.time(BEFORE_SPRING), "2026-03-29 01:59 CET");
        assert_eq!(paris.time(BEFORE_SPRING + 1_000), "2026-03-29 03:00 CEST");
        assert_eq!(
            paris.time_ms(BEFORE_SPRING + 1_007),
            "2026-03-29 03:00:00.007"
        );
        assert_eq!(paris.abbreviation(BEFORE_SPRING + 1_000), "CEST");
        let utc = Shown::default();
        assert_eq!(utc.time(BEFORE_SPRING), "2026-03-29 00:59 UTC");
        // Autumn: 01:00 UTC on 2026-10-25 is 02:00 CET again (the hour
        // between 02:00 and 03:00 CEST happened twice).
        assert_eq!(
            paris.time(1_792_890_000_000 - 1_000),
            "2026-10-25 02:59 CEST"
        );
        assert_eq!(paris.time(1_792_890_000_000), "2026-10-25 02:00 CET");
        for bad in ["", "Mars/Olympus", "../etc/passwd", &"A".repeat(65)] {
            assert!(Shown::new(Currency::default(), bad).is_err(), "{bad:?}");
        }
        assert_eq!(paris.zone_name(), "Europe/Paris");
    }

    #[test]
    fn months_and_days_follow_the_zone_at_a_month_end() {
        // 2026-11-30 23:30 UTC is already December in Paris, and still
        // November in New York (18:30 EST).
        let end = 1_796_081_400_000;
        let paris = Shown::new(Currency::default(), "Europe/Paris").unwrap();
        let new_york = Shown::new(Currency::default(), "America/New_York").unwrap();
        assert_eq!(Shown::default().month_of(end), 202_611);
        assert_eq!(Shown::default().day_of(end), 30);
        assert_eq!(paris.month_of(end), 202_612);
        assert_eq!(paris.day_of(end), 1);
        assert_eq!(paris.date(end), "2026-12-01");
        assert_eq!(new_york.month_of(end), 202_611);
        assert_eq!(new_york.time(end), "2026-11-30 18:30 EST");
        // A viewer in New York of a Paris branch: the statement month and
        // day stay the branch's, times are shown in New York's.
        let viewer = paris.for_viewer("America/New_York");
        assert_eq!(viewer.month_of(end), 202_612);
        assert_eq!(viewer.day_of(end), 1);
        assert_eq!(viewer.time(end), "2026-11-30 18:30 EST");
        assert_eq!(viewer.date(end), "2026-11-30");
        assert_eq!(viewer.viewer_zone_name(), "America/New_York");
        assert_eq!(viewer.zone_name(), "Europe/Paris");
        // An empty or unknown zone leaves the branch's.
        assert_eq!(paris.for_viewer("").time(end), "2026-12-01 00:30 CET");
        assert_eq!(
            paris.for_viewer("Nowhere/Else").viewer_zone_name(),
            "Europe/Paris"
        );
        assert_eq!(Shown::default().month_of(u64::MAX), 999_912);
        assert_eq!(days_in(202_402), 29);
        assert_eq!(days_in(190_002), 28);
        assert_eq!(days_in(200_002), 29);
        assert_eq!(days_in(202_604), 30);
        assert_eq!(days_in(202_612), 31);
    }

    #[test]
    fn codes_are_three_capitals() {
        for bad in ["", "eur", "EURO", "E1R", "€", "EU"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Currency::default().code(), "EUR");
    }
}
