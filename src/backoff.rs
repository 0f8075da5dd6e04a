//! Capped exponential backoff, for every loop that waits and tries again.

use std::time::Duration;

/// A pause that starts at `first` and doubles after each use, up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    current: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            current: first,
            max,
        }
    }

    /// The pause to take now; the next one is twice as long (at most `max`).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current;
        self.current = (self.current * 2).min(self.max);
        pause
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let pauses: Vec<_> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_pause(), ms(100));
        assert_eq!(
            Backoff::new(ms(100), ms(10)).next_pause(),
            ms(10),
            "first ≤ max"
        );
    }
}
