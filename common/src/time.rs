//! UTC calendar fields of a `SystemTime`, for the few fixed formats the binaries print (nginx's
//! `$time_local`, pgpool's `last_status_change`, the page's timestamps). One days-to-civil routine
//! (Howard Hinnant's algorithm) instead of a date-time crate for three formats.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year, e.g. 2026.
    pub year: i64,
    /// Month, 1–12.
    pub month: u32,
    /// Day of the month, 1–31.
    pub day: u32,
    /// Hour, 0–23.
    pub hour: u32,
    /// Minute, 0–59.
    pub minute: u32,
    /// Second, 0–59.
    pub second: u32,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

impl Civil {
    /// The UTC fields of `t` (times before 1970 count as 1970-01-01).
    pub fn from(t: SystemTime) -> Civil {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// `2026-11-23 00:43:45`.
    pub fn iso_seconds(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `23/Nov/2026:00:43:45 +0000` (nginx's `$time_local`, in UTC).
    pub fn clf(&self) -> String {
        format!(
            "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
            self.day,
            MONTHS[(self.month - 1) as usize],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        let t = |s: u64| Civil::from(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0).iso_seconds(), "1970-01-01 00:00:00");
        assert_eq!(t(971_186_136).clf(), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(t(951_782_400).iso_seconds(), "2000-02-29 00:00:00");
        assert_eq!(t(1_795_394_625).iso_seconds(), "2026-11-23 00:43:45");
        assert_eq!(t(4_107_542_399).iso_seconds(), "2100-02-28 23:59:59");
        assert_eq!(
            Civil::from(UNIX_EPOCH - Duration::from_secs(5)).iso_seconds(),
            "1970-01-01 00:00:00"
        );
    }
}
