//! The proxy's one source of randomness: splitmix64 (Steele, Lea and Flood,
//! "Fast splittable pseudorandom number generators", 2014), keyed per
//! (seed, toxic name, connection number), so a seed replays which
//! connections a toxic affects, every jitter and every slice size.

/// splitmix64's increment: the odd integer closest to 2^64 / φ.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function (MurmurHash3's finalizer, variant 13): a
/// bijection on `u64` that spreads every input bit over every output bit.
fn finalize(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of a toxic on a connection: `h = finalize(seed + γ)`, then for
/// each byte `b` of the toxic's name (UTF-8) and then of the connection
/// number (8 bytes, little-endian): `h = finalize((h ^ b) + γ)`.
pub(crate) fn key(seed: u64, name: &str, conn: u64) -> u64 {
    name.bytes()
        .chain(conn.to_le_bytes())
        .fold(finalize(seed.wrapping_add(GAMMA)), |h, b| finalize((h ^ u64::from(b)).wrapping_add(GAMMA)))
}

/// The top 53 bits of `x` as a float in `[0, 1)`.
pub(crate) fn unit(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A splitmix64 generator.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    /// Advances by [`GAMMA`] per draw; the draw is its [`finalize`].
    state: u64,
}

impl Rng {
    /// A generator whose first draw is `finalize(seed + γ)`.
    pub(crate) fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        finalize(self.state)
    }

    /// Uniform in `[0, n)` for `n >= 1`, by multiply-shift (Lemire); the
    /// bias, below `n / 2^64`, is of no concern here.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input() {
        let k = key(7, "lat", 3);
        assert_eq!(k, key(7, "lat", 3));
        assert_ne!(k, key(8, "lat", 3));
        assert_ne!(k, key(7, "lau", 3));
        assert_ne!(k, key(7, "lat", 4));
        // The name's bytes and the number's do not run into each other.
        assert_ne!(key(7, "a", 0), key(7, "", 0x61));
    }

    #[test]
    fn draws_are_in_range_and_spread() {
        let mut rng = Rng::new(1);
        let draws: Vec<u64> = (0..1000).map(|_| rng.below(10)).collect();
        assert!(draws.iter().all(|&d| d < 10));
        for v in 0..10 {
            let n = draws.iter().filter(|&&d| d == v).count();
            assert!((50..150).contains(&n), "{v} drawn {n} times in 1000");
        }
        let u: Vec<f64> = (0..1000).map(|i| unit(key(7, "t", i))).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let below_half = u.iter().filter(|&&x| x < 0.5).count();
        assert!((400..600).contains(&below_half), "{below_half} of 1000 below 0.5");
    }
}
