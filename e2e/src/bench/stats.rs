//! Percentiles over a benchmark's samples.

use std::time::Duration;

/// The `p`th percentile (0–100) of `samples` by nearest rank: the smallest sample with at
/// least `p`% of the samples at or below it. `None` when there are no samples.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Milliseconds with one decimal, for reports.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The `p`th percentile in milliseconds (see [`percentile`]).
pub fn percentile_ms(samples: &[Duration], p: f64) -> Option<f64> {
    percentile(samples, p).map(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank() {
        let samples = ms(&[50, 10, 40, 20, 30]);
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(30)));
        assert_eq!(percentile(&samples, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&samples, 20.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&samples, 21.0), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 100.0), Some(Duration::from_millis(50)));
    }

    #[test]
    fn p99_of_a_hundred_is_the_99th() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(50)));
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(percentile(&[], 50.0), None);
        let one = ms(&[7]);
        assert_eq!(percentile(&one, 1.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&one, 99.0), Some(Duration::from_millis(7)));
    }

    #[test]
    fn milliseconds_rounded() {
        assert_eq!(millis(Duration::from_micros(1_234_567)), 1234.6);
        assert_eq!(percentile_ms(&ms(&[3]), 50.0), Some(3.0));
    }
}
