//! The timing decisions of a run, as pure functions of the time that has
//! passed: the pause between batches (rate, `pause_between`, `sleep_coef`,
//! `busy_sleep_coef`),
//! the backoff before a retry, and the next adaptive batch size. The run
//! loop measures time and sleeps; these decide how long, so they are tested
//! with made-up durations instead of a clock.

use std::time::Duration;

use crate::spec::Settings;

/// How long to wait after a batch: `pause_between`, plus `sleep_coef` times
/// the batch's duration (`busy_sleep_coef` when larger and `busy` other
/// sessions were at work during the batch), and at least what keeps the
/// rows `written` since the session started (`elapsed` ago) under the rate.
///
/// `busy` is a sample, one per batch: over many batches the rest grows
/// with the share of time the application is at work, so a lightly used
/// database slows a run a little and a saturated one by the full factor.
pub fn pause_after_batch(s: &Settings, batch: Duration, busy: u64, written: u64, elapsed: Duration) -> Duration {
    let coef = if busy > 0 {
        s.sleep_coef.max(s.busy_sleep_coef)
    } else {
        s.sleep_coef
    };
    let mut pause = s.pause_between + batch.mul_f64(coef);
    if let Some(rate) = s.rate {
        let due = Duration::from_secs_f64(written as f64 / rate.per_second);
        pause = pause.max(due.saturating_sub(elapsed));
    }
    pause
}

/// The wait before retry `attempt` (1, 2, …): exponential from 200 ms,
/// capped at 6.4 s, plus up to half of it again from `jitter` (any random
/// number), so retries of concurrent runs spread out.
pub fn backoff(attempt: u32, jitter: u64) -> Duration {
    let base = 100u64 << attempt.clamp(1, 6);
    Duration::from_millis(base + jitter % (base / 2 + 1))
}

/// A random number for [`backoff`]'s jitter.
pub fn jitter() -> u64 {
    (uuid::Uuid::now_v7().as_u128() & u64::MAX as u128) as u64 ^ u64::from(std::process::id()).rotate_left(17)
}

/// The adaptive batch size: aims each batch at `batch_time`, from a
/// smoothed (exponential moving average) cost per key, so one slow batch
/// does not collapse the size (pt-online-schema-change's --chunk-time
/// works the same way). It grows at most 2x and shrinks at most 4x per
/// batch, within `min_batch` and `max_batch`.
#[derive(Debug, Default, Clone)]
pub struct Adaptive {
    per_key: Option<f64>,
    /// The upper bound when the spec sets none and the engine images its
    /// batches itself (`ENGINE_MAX_BATCH`).
    pub engine_max: Option<u64>,
}

impl Adaptive {
    /// The next batch's size after a batch of `size` keys took `took`.
    pub fn next(&mut self, size: u64, took: Duration, s: &Settings) -> u64 {
        if s.fixed_batch {
            return size;
        }
        let sample = took.as_secs_f64() / size.max(1) as f64;
        let ema = match self.per_key {
            Some(prev) => 0.4 * sample + 0.6 * prev,
            None => sample,
        };
        self.per_key = Some(ema);
        let ideal = (s.batch_time.as_secs_f64() / ema.max(1e-9)) as u64;
        ideal
            .clamp(size / 4, size.saturating_mul(2))
            .clamp(s.min_batch, self.max(s))
    }

    /// The largest batch these settings allow.
    pub fn max(&self, s: &Settings) -> u64 {
        match self.engine_max {
            Some(m) if s.max_batch_default => m.max(s.max_batch),
            _ => s.max_batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Rate;

    fn settings() -> Settings {
        Settings::default_for_checks()
    }

    #[test]
    fn the_rate_bounds_the_pace() {
        let mut s = settings();
        s.rate = Some(Rate::parse("100/s").unwrap());
        // 500 rows written after 2 s: 5 s are due, so wait 3 s.
        assert_eq!(
            pause_after_batch(&s, Duration::from_millis(50), 0, 500, Duration::from_secs(2)),
            Duration::from_secs(3)
        );
        // Behind schedule: no wait beyond pause_between.
        assert_eq!(
            pause_after_batch(&s, Duration::from_millis(50), 0, 100, Duration::from_secs(2)),
            Duration::ZERO
        );
    }

    #[test]
    fn pauses_add_up_and_the_rate_is_a_floor() {
        let mut s = settings();
        s.pause_between = Duration::from_millis(100);
        s.sleep_coef = 0.5;
        assert_eq!(
            pause_after_batch(&s, Duration::from_millis(400), 0, 0, Duration::ZERO),
            Duration::from_millis(300)
        );
        s.rate = Some(Rate::parse("10/s").unwrap());
        assert_eq!(
            pause_after_batch(&s, Duration::from_millis(400), 0, 10, Duration::from_millis(200)),
            Duration::from_millis(800),
            "the rate asks for more than the pauses"
        );
    }

    #[test]
    fn a_busy_application_gets_the_larger_rest() {
        let mut s = settings();
        let batch = Duration::from_millis(100);
        assert_eq!(s.busy_sleep_coef, 2.0, "the default");
        assert_eq!(
            pause_after_batch(&s, batch, 0, 0, Duration::ZERO),
            Duration::ZERO,
            "quiet: none"
        );
        assert_eq!(
            pause_after_batch(&s, batch, 3, 0, Duration::ZERO),
            Duration::from_millis(200)
        );
        s.sleep_coef = 3.0;
        assert_eq!(
            pause_after_batch(&s, batch, 1, 0, Duration::ZERO),
            Duration::from_millis(300),
            "sleep_coef when it is the larger"
        );
        s.sleep_coef = 0.5;
        s.busy_sleep_coef = 0.0;
        assert_eq!(
            pause_after_batch(&s, batch, 5, 0, Duration::ZERO),
            Duration::from_millis(50),
            "busy_sleep_coef = 0 turns the yield off"
        );
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        for attempt in 1..=8 {
            let base = 100u64 << attempt.clamp(1, 6);
            for jitter in [0, 1, 77, u64::MAX] {
                let d = backoff(attempt, jitter).as_millis() as u64;
                assert!((base..=base + base / 2).contains(&d), "attempt {attempt}: {d}");
            }
        }
        assert_eq!(backoff(1, 0), Duration::from_millis(200));
        assert_eq!(backoff(9, 0), backoff(6, 0), "capped");
    }

    #[test]
    fn one_slow_batch_does_not_collapse_the_size() {
        let s = settings(); // batch_time 500 ms, bounds 100..=20,000
        let mut a = Adaptive::default();
        // 1,000 keys in 250 ms: double.
        let mut size = a.next(1000, Duration::from_millis(250), &s);
        assert_eq!(size, 2000);
        // Steady at 0.25 ms per key: it settles at 2,000 (500 ms).
        for _ in 0..5 {
            size = a.next(size, Duration::from_secs_f64(size as f64 * 0.000_25), &s);
        }
        assert_eq!(size, 2000);
        // One batch ten times slower: the average moves, the size shrinks
        // by well under 4x, and it comes back once batches are fast again.
        let after_spike = a.next(size, Duration::from_secs(5), &s);
        assert!(after_spike >= size / 4 && after_spike < size, "{after_spike}");
        let mut back = after_spike;
        for _ in 0..12 {
            back = a.next(back, Duration::from_secs_f64(back as f64 * 0.000_25), &s);
        }
        assert!(back >= 1950, "recovers: {back}");
    }

    #[test]
    fn engine_imaged_batches_may_grow_past_the_default_cap() {
        // 1 µs per key: 500 ms would be 500,000 keys.
        let s = settings();
        assert!(s.max_batch_default);
        let grow = |a: &mut Adaptive, s: &Settings| {
            let mut size = 20_000;
            for _ in 0..5 {
                size = a.next(size, Duration::from_micros(size), s);
            }
            size
        };
        assert_eq!(grow(&mut Adaptive::default(), &s), s.max_batch);
        let mut engine = Adaptive {
            engine_max: Some(crate::spec::ENGINE_MAX_BATCH),
            ..Adaptive::default()
        };
        assert_eq!(grow(&mut engine, &s), crate::spec::ENGINE_MAX_BATCH);
        // A max_batch the spec sets holds either way.
        let mut capped = s.clone();
        capped.max_batch_default = false;
        assert_eq!(grow(&mut engine, &capped), s.max_batch);
    }

    #[test]
    fn a_fixed_size_stays() {
        let mut s = settings();
        s.fixed_batch = true;
        assert_eq!(Adaptive::default().next(777, Duration::from_secs(9), &s), 777);
    }
}
