//! How the project writes a point in time: RFC 3339 in UTC, the one format of alerts,
//! events, sidecars, manifests and labels.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `t` as RFC 3339 (UTC, nanoseconds where there are any).
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t).format(&Rfc3339).expect("RFC 3339 formats any SystemTime after year 0")
}

/// The current time as RFC 3339.
pub fn now() -> String {
    rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(super::rfc3339(UNIX_EPOCH + Duration::from_millis(1_500)), "1970-01-01T00:00:01.5Z");
    }
}
