//! Medians with their range, over rounds.

use serde::Serialize;

/// The median of some values and their range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many values (rounds).
    pub n: usize,
}

impl Stat {
    /// `None` for no (finite) values. The median of an even count is the mean of the
    /// two middle values.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `(max - min) / median`: the spread over rounds, a noise indicator.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

/// A number with about three significant digits, never in exponent form.
pub fn fmt(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.5}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!((s.spread() - 1.2).abs() < 1e-9);
        assert_eq!(Stat::of(&[]), None);
        assert_eq!(Stat::of(&[f64::NAN, 1.0]).unwrap().n, 1);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(fmt(12345.6), "12346");
        assert_eq!(fmt(12.345), "12.3");
        assert_eq!(fmt(1.2345), "1.23");
        assert_eq!(fmt(0.12345), "0.123");
        assert_eq!(fmt(0.0012345), "0.00123");
        assert_eq!(fmt(0.0), "0");
    }
}
