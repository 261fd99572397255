//! One retry policy for everything that waits on the bus (a broker starting, a cluster
//! electing leaders, a bucket not answering yet), built on `backon`: quick first retries,
//! backing off with jitter to a cap, bounded in total. Callers say only how long they are
//! patient and which errors are worth waiting for.

use std::time::Duration;

use backon::ExponentialBuilder;

/// The first retry comes after this.
const FIRST: Duration = Duration::from_millis(100);
/// Retries are never further apart than this.
const CAP: Duration = Duration::from_secs(2);

/// Retries for at most `patience` in all (`None`: for as long as it takes).
pub fn patiently(patience: Option<Duration>) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST)
        .with_max_delay(CAP)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(patience)
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;

    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stop_at_the_patience() {
        let delays: Vec<Duration> = patiently(Some(Duration::from_secs(10))).build().collect();
        assert!(!delays.is_empty());
        assert!(delays.iter().all(|d| *d <= CAP * 2), "{delays:?}");
        let total: Duration = delays.iter().sum();
        assert!(total <= Duration::from_secs(10) + CAP * 2, "{total:?}");
        assert!(delays.len() > 5, "{delays:?}");
    }
}
