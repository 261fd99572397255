//! Timestamps in the reference's format: Python's `datetime.now(UTC).isoformat()`.

use chrono::{DateTime, Timelike, Utc};

/// `YYYY-MM-DDTHH:MM:SS.ffffff+00:00`, the fraction omitted when it is zero, exactly as
/// Python prints it, so results compare field for field with the reference's.
pub fn now() -> String {
    format_utc(Utc::now())
}

/// Formats one instant the way [`now`] does.
pub fn format_utc(at: DateTime<Utc>) -> String {
    let micros = at.nanosecond() / 1_000 % 1_000_000;
    let base = at.format("%Y-%m-%dT%H:%M:%S");
    if micros == 0 {
        format!("{base}+00:00")
    } else {
        format!("{base}.{micros:06}+00:00")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn fraction_is_omitted_only_when_zero() {
        let whole = Utc
            .with_ymd_and_hms(2026, 5, 12, 0, 0, 1)
            .single()
            .expect("valid");
        assert_eq!(format_utc(whole), "2026-05-12T00:00:01+00:00");
        let frac = whole + chrono::Duration::microseconds(42);
        assert_eq!(format_utc(frac), "2026-05-12T00:00:01.000042+00:00");
    }
}
