//! Randomness shared by the layers, injectable so tests are deterministic.

use std::sync::{Arc, Mutex, PoisonError};

use rand::{Rng, SeedableRng, rngs::StdRng};

/// A cheaply cloneable random source. Clones share one generator.
#[derive(Clone, Debug)]
pub struct SharedRng(Arc<Mutex<StdRng>>);

impl SharedRng {
    /// Seeded from the operating system.
    pub fn from_os() -> Self {
        Self(Arc::new(Mutex::new(StdRng::from_os_rng())))
    }

    /// Reproducible sequence (tests).
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        // A panic while holding the lock cannot leave a generator in an invalid state.
        let mut rng = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut rng)
    }

    /// Uniform in `0..n`; `0` when `n == 0`.
    pub fn below(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.with(|r| r.random_range(0..n))
    }

    /// True with probability `percent / 100` (clamped to 0..=100).
    pub fn chance(&self, percent: f64) -> bool {
        if percent >= 100.0 {
            return true;
        }
        if percent.is_nan() || percent <= 0.0 {
            return false;
        }
        self.with(|r| r.random::<f64>() * 100.0 < percent)
    }
}

impl Default for SharedRng {
    fn default() -> Self {
        Self::from_os()
    }
}
