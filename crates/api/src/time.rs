//! Conversions between the protobuf well-known time types and std.
//!
//! Proto fields use `google.protobuf.Duration` / `Timestamp`. Where the proto says
//! "absent or zero: none", use [`optional_duration`], which folds both into `None`.

use std::time::{Duration, SystemTime};

/// A `google.protobuf.Duration` that is not a valid non-negative duration.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {seconds}s {nanos}ns")]
pub struct InvalidDuration {
    /// The `seconds` field received.
    pub seconds: i64,
    /// The `nanos` field received.
    pub nanos: i32,
    /// Why prost-types refused it (negative, or nanos out of range).
    #[source]
    pub source: prost_types::DurationError,
}

/// A `google.protobuf.Timestamp` outside what `SystemTime` can represent.
#[derive(Debug, thiserror::Error)]
#[error("invalid timestamp {seconds}s {nanos}ns")]
pub struct InvalidTimestamp {
    /// The `seconds` field received.
    pub seconds: i64,
    /// The `nanos` field received.
    pub nanos: i32,
    /// Why prost-types refused it.
    #[source]
    pub source: prost_types::TimestampError,
}

/// std → proto. Durations beyond `i64::MAX` seconds saturate.
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

/// proto → std. Negative durations are errors (no field of this protocol allows them).
pub fn duration_from_proto(d: &prost_types::Duration) -> Result<Duration, InvalidDuration> {
    Duration::try_from(*d).map_err(|source| InvalidDuration {
        seconds: d.seconds,
        nanos: d.nanos,
        source,
    })
}

/// An optional proto duration where absent and zero both mean "none".
pub fn optional_duration(
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, InvalidDuration> {
    match d {
        None => Ok(None),
        Some(d) => {
            let d = duration_from_proto(d)?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

/// std → proto.
pub fn timestamp_to_proto(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// proto → std.
pub fn timestamp_from_proto(t: &prost_types::Timestamp) -> Result<SystemTime, InvalidTimestamp> {
    SystemTime::try_from(*t).map_err(|source| InvalidTimestamp {
        seconds: t.seconds,
        nanos: t.nanos,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        let d = Duration::from_millis(2_500);
        let p = duration_to_proto(d);
        assert_eq!((p.seconds, p.nanos), (2, 500_000_000));
        assert_eq!(duration_from_proto(&p).unwrap(), d);
    }

    #[test]
    fn negative_durations_are_errors() {
        let p = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        let err = duration_from_proto(&p).unwrap_err();
        assert!(err.to_string().contains("-1s"), "{err}");
    }

    #[test]
    fn absent_and_zero_are_none() {
        assert_eq!(optional_duration(None).unwrap(), None);
        let zero = prost_types::Duration::default();
        assert_eq!(optional_duration(Some(&zero)).unwrap(), None);
        let one = duration_to_proto(Duration::from_secs(1));
        assert_eq!(
            optional_duration(Some(&one)).unwrap(),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn huge_durations_saturate() {
        let p = duration_to_proto(Duration::MAX);
        assert_eq!(p.seconds, i64::MAX);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(timestamp_from_proto(&timestamp_to_proto(t)).unwrap(), t);
    }
}
