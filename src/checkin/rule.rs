//! The check-in rules, pure: which UTC day a moment is in, when the next
//! check-in opens, how long a streak is and what a day awards.

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};

use crate::ledger::model::MAX_MICROS;

/// What a check-in is configured to award.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Award {
    pub credits_per_day_micros: i64,
    pub streak_bonus_micros: i64,
}

/// The UTC day of `now`, as stored (`YYYY-MM-DD`).
pub fn day_key(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// The UTC day `now` falls in.
pub fn today(now: DateTime<Utc>) -> NaiveDate {
    now.date_naive()
}

/// The day before `day`.
pub fn yesterday(day: NaiveDate) -> NaiveDate {
    day.pred_opt().unwrap_or(day)
}

/// The next UTC midnight after `now`: when the next check-in opens.
pub fn next_checkin_at(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = today(now)
        .checked_add_days(Days::new(1))
        .unwrap_or(today(now));
    Utc.from_utc_datetime(&tomorrow.and_time(chrono::NaiveTime::MIN))
}

/// Today's streak: one more than yesterday's if the user checked in
/// yesterday, else 1 (a missed day starts over).
pub fn streak(yesterday_streak: Option<i32>) -> i32 {
    yesterday_streak.map_or(1, |s| s.saturating_add(1))
}

/// What a check-in on day `streak` of a streak awards: the daily credits,
/// plus the streak bonus on every day after the first. Never above the
/// largest amount the ledger takes.
pub fn award(config: Award, streak: i32) -> i64 {
    let bonus = if streak > 1 {
        config.streak_bonus_micros
    } else {
        0
    };
    config
        .credits_per_day_micros
        .saturating_add(bonus)
        .clamp(0, MAX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: Award = Award {
        credits_per_day_micros: 5_000_000,
        streak_bonus_micros: 1_000_000,
    };

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("a test timestamp")
    }

    #[test]
    fn days_are_utc_days() {
        assert_eq!(day_key(today(at("2026-12-03T23:59:59Z"))), "2026-12-03");
        assert_eq!(day_key(today(at("2026-12-04T00:00:00Z"))), "2026-12-04");
        assert_eq!(
            day_key(yesterday(today(at("2027-01-01T08:00:00Z")))),
            "2026-12-31"
        );
    }

    #[test]
    fn the_next_checkin_opens_at_the_next_utc_midnight() {
        assert_eq!(
            next_checkin_at(at("2026-12-03T23:59:59Z")),
            at("2026-12-04T00:00:00Z")
        );
        assert_eq!(
            next_checkin_at(at("2026-12-04T00:00:00Z")),
            at("2026-12-05T00:00:00Z")
        );
        assert_eq!(
            next_checkin_at(at("2028-02-28T12:00:00Z")),
            at("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn a_streak_grows_by_consecutive_days_and_the_bonus_comes_after_day_one() {
        assert_eq!(streak(None), 1);
        assert_eq!(streak(Some(1)), 2);
        assert_eq!(streak(Some(i32::MAX)), i32::MAX);
        assert_eq!(award(CONFIG, 1), 5_000_000);
        assert_eq!(award(CONFIG, 2), 6_000_000);
        assert_eq!(award(CONFIG, 30), 6_000_000);
        let huge = Award {
            credits_per_day_micros: MAX_MICROS,
            streak_bonus_micros: MAX_MICROS,
        };
        assert_eq!(award(huge, 2), MAX_MICROS);
    }
}
