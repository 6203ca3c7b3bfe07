//! One table of deadlines for everything that waits: server requests, acks, retries,
//! confirmations after a reconnection, startup and shutdown.
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Deadlines keyed by what they are for; each key has at most one.
#[derive(Debug)]
pub(crate) struct Deadlines<K> {
    by_time: BTreeSet<(Instant, K)>,
    by_key: HashMap<K, Instant>,
}

impl<K> Default for Deadlines<K> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
            by_key: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> Deadlines<K> {
    /// Sets (or moves) the deadline of `key`.
    pub(crate) fn set(&mut self, key: K, at: Instant) {
        if let Some(old) = self.by_key.insert(key.clone(), at) {
            self.by_time.remove(&(old, key.clone()));
        }
        self.by_time.insert((at, key));
    }

    /// Removes the deadline of `key`; true if it had one.
    pub(crate) fn clear(&mut self, key: &K) -> bool {
        match self.by_key.remove(key) {
            Some(at) => {
                self.by_time.remove(&(at, key.clone()));
                true
            }
            None => false,
        }
    }

    /// Whether `key` has a deadline.
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.by_key.contains_key(key)
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// Removes and returns the keys whose deadline is at or before `now`, earliest first.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.by_time.first() {
            if *t > now {
                break;
            }
            if let Some((_, k)) = self.by_time.pop_first() {
                self.by_key.remove(&k);
                out.push(k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_and_moving_a_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Deadlines::default();
        d.set("a", t0 + ms(30));
        d.set("b", t0 + ms(10));
        d.set("c", t0 + ms(20));
        assert_eq!(d.next(), Some(t0 + ms(10)));
        d.set("b", t0 + ms(40));
        assert_eq!(d.next(), Some(t0 + ms(20)));
        assert!(d.clear(&"c"));
        assert!(!d.clear(&"c"));
        assert_eq!(d.expired(t0 + ms(35)), vec!["a"]);
        assert!(d.contains(&"b"));
        assert_eq!(d.expired(t0 + ms(40)), vec!["b"]);
        assert_eq!(d.next(), None);
    }
}
