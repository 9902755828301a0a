// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page contents for tests: one seeded generator, the kinds of page the
//! store treats differently (random, compressible text, zero,
//! same-filled), handles, and the checksum tests compare pages by.

use vtmem_protocol::{Handle, ObjectId, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

/// One page of data.
pub type Page = [u8; PAGE_SIZE];

/// A seeded xorshift64* generator: the same seed, the same sequence.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with the next values.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A deterministic, incompressible page, distinct for every `seed`.
pub fn random_page(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    Rng::new(seed).fill(&mut p);
    p
}

/// A deterministic page whose first `random_bytes` bytes are random and the
/// rest zero: LZ4 stores it in a little more than `random_bytes`, so a
/// range of values reaches every size class of the store's allocator.
pub fn sized_page(seed: u64, random_bytes: usize) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let n = random_bytes.clamp(8, PAGE_SIZE);
    Rng::new(seed).fill(&mut p[..n]);
    p
}

/// A deterministic page that compresses well, distinct for every `seed`:
/// a line naming the seed, repeated.
pub fn text_page(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let line = format!("page {seed:016x} of a vtmem test; ");
    for (i, b) in p.iter_mut().enumerate() {
        *b = line.as_bytes()[i % line.len()];
    }
    p
}

/// A page of zeros.
pub fn zero_page() -> Page {
    [0u8; PAGE_SIZE]
}

/// A page that repeats the 8-byte little-endian `word`.
pub fn same_filled_page(word: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&word.to_le_bytes());
    }
    p
}

/// The handle of page `index` of object `[object, 0, 0]` in `pool`.
pub fn handle(pool: u32, object: u64, index: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([object, 0, 0]),
        index,
    }
}

/// A page's checksum (XXH3-64), to compare pages cheaply.
pub fn checksum(page: &Page) -> u64 {
    xxh3_64(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_deterministic_and_distinct() {
        assert_eq!(random_page(7), random_page(7));
        assert_ne!(random_page(7), random_page(8));
        assert_ne!(random_page(0), zero_page());
        assert_eq!(text_page(3), text_page(3));
        assert_ne!(text_page(3), text_page(4));
        assert_ne!(checksum(&random_page(1)), checksum(&random_page(2)));
        let s = same_filled_page(0x0102_0304_0506_0708);
        assert!(s.chunks_exact(8).all(|w| w == &s[..8]));
        assert_eq!(s[0], 8);
    }

    #[test]
    fn the_generator_is_seeded() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], Rng::new(6).next_u64());
        assert!((0..100).all(|_| a.below(10) < 10));
        let mut short = [0u8; 5];
        Rng::new(1).fill(&mut short);
        assert_eq!(short[..], Rng::new(1).next_u64().to_le_bytes()[..5]);
    }

    #[test]
    fn handles() {
        let h = handle(3, 9, 17);
        assert_eq!((h.pool, h.object, h.index), (3, ObjectId([9, 0, 0]), 17));
    }
}
