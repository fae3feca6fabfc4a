//! A small, fully specified PRNG (xoshiro256++ seeded through SplitMix64).
//!
//! Every random decision of the data pipeline draws from an `Rng` derived from
//! `(seed, stream, index)`, never from global state. The algorithm is written
//! out here rather than taken from a crate so that sample streams — and the
//! golden numbers tests and resumed runs depend on — cannot change with a
//! dependency upgrade.

#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        let s = [splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st)];
        Rng { s }
    }

    /// An independent stream for `(seed, stream, index)`: e.g. the packing
    /// decisions (stream) of global sample 1234 (index) under seed 1.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut st = seed ^ 0x6A09_E667_F3BC_C908;
        let a = splitmix64(&mut st);
        let mut st = a ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let b = splitmix64(&mut st);
        Rng::new(b ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n); n must be > 0 (Lemire's unbiased method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Uniform integer in [lo, hi] (both inclusive, like Python's randint).
    pub fn int_inclusive(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo <= hi, "Rng::int_inclusive({lo}, {hi})");
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// Index drawn with probability proportional to the increments of the
    /// non-decreasing cumulative table `cdf` (last entry = total weight).
    pub fn weighted(&mut self, cdf: &[f64]) -> usize {
        let total = *cdf.last().expect("empty weight table");
        let x = self.f64() * total;
        cdf.partition_point(|&c| c <= x).min(cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(1, 2, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::derive(1, 2, 3).next_u64(), Rng::derive(1, 2, 4).next_u64());
        assert_ne!(Rng::derive(1, 2, 3).next_u64(), Rng::derive(1, 3, 3).next_u64());
        assert_ne!(Rng::derive(1, 2, 3).next_u64(), Rng::derive(2, 2, 3).next_u64());
    }

    #[test]
    fn below_is_uniform_enough() {
        let mut r = Rng::new(7);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn weighted_follows_weights() {
        let mut r = Rng::new(9);
        let cdf = [1.0, 1.0, 4.0]; // weights 1, 0, 3
        let mut counts = [0usize; 3];
        for _ in 0..40_000 {
            counts[r.weighted(&cdf)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((9_400..10_600).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn f64_in_unit_interval() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            let x = r.f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
