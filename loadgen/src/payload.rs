//! Deterministic payloads: frame `seq` of connection `conn` has bytes that a
//! counter-based generator recomputes at any offset, so each echo is checked
//! byte for byte as it arrives, in any split, without keeping what was sent.

/// The splitmix64 increment (2^64 / φ), which spreads consecutive inputs.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finalizer: a cheap bijective mix whose output passes
/// statistical tests, so neighbouring frames share no byte pattern.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of frame `seq` on the connection numbered `conn` (unique in a run).
pub fn seed(conn: u64, seq: u64) -> u64 {
    mix(conn.wrapping_mul(GOLDEN) ^ mix(seq.wrapping_add(GOLDEN)))
}

/// The payload's `k`-th little-endian 8-byte word.
fn word(seed: u64, k: u64) -> [u8; 8] {
    mix(seed.wrapping_add(k.wrapping_mul(GOLDEN))).to_le_bytes()
}

/// Walks the payload from byte `offset` for `len` bytes in word-aligned
/// pieces, giving each piece's position in the walk and its expected bytes.
fn walk(seed: u64, offset: usize, len: usize, mut f: impl FnMut(usize, &[u8]) -> bool) -> bool {
    let mut done = 0;
    while done < len {
        let pos = offset + done;
        let w = word(seed, (pos / 8) as u64);
        let start = pos % 8;
        let take = (8 - start).min(len - done);
        if !f(done, &w[start..start + take]) {
            return false;
        }
        done += take;
    }
    true
}

/// Writes the payload's bytes `offset..offset + out.len()` into `out`.
pub fn fill(seed: u64, offset: usize, out: &mut [u8]) {
    walk(seed, offset, out.len(), |at, expected| {
        out[at..at + expected.len()].copy_from_slice(expected);
        true
    });
}

/// Whether `bytes` are the payload's bytes from `offset` on.
pub fn matches(seed: u64, offset: usize, bytes: &[u8]) -> bool {
    walk(seed, offset, bytes.len(), |at, expected| bytes[at..at + expected.len()] == *expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        fill(seed, 0, &mut v);
        v
    }

    #[test]
    fn same_inputs_same_bytes_other_inputs_other_bytes() {
        assert_eq!(payload(seed(3, 9), 100), payload(seed(3, 9), 100));
        assert_ne!(payload(seed(3, 9), 64), payload(seed(3, 10), 64));
        assert_ne!(payload(seed(3, 9), 64), payload(seed(4, 9), 64));
        assert_ne!(seed(0, 1), seed(1, 0));
    }

    #[test]
    fn any_offset_and_length_agrees_with_the_whole() {
        let s = seed(7, 42);
        let whole = payload(s, 77);
        for off in 0..whole.len() {
            for end in off..=whole.len() {
                let mut part = vec![0; end - off];
                fill(s, off, &mut part);
                assert_eq!(part, whole[off..end], "{off}..{end}");
                assert!(matches(s, off, &whole[off..end]));
            }
        }
    }

    #[test]
    fn one_flipped_bit_anywhere_is_caught() {
        let s = seed(1, 2);
        let whole = payload(s, 40);
        for i in 0..whole.len() {
            for bit in 0..8 {
                let mut bad = whole.clone();
                bad[i] ^= 1 << bit;
                assert!(!matches(s, 0, &bad), "byte {i} bit {bit}");
                assert!(!matches(s, i, &bad[i..]), "from {i}");
            }
        }
    }
}
