//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Sums are carried as `u32` accumulators of big-endian 16-bit words that
//! callers chain (`sum(data, acc)`), fold with [`fold`] and invert with
//! [`finish`]. The bulk loop reads 16 bytes at a time in native byte order
//! (the ones'-complement sum is byte-order independent, RFC 1071 §2(B)) and
//! converts once at the end, so a 64 KiB payload costs a few microseconds.

/// Adds `data`, taken as big-endian 16-bit words (an odd last byte is padded
/// with a zero on the right), to the running sum `acc`. The result is folded
/// to at most 17 bits, so it can be chained any number of times.
#[inline]
pub fn sum(data: &[u8], acc: u32) -> u32 {
    // Native-order accumulation of 32-bit halves in two 64-bit accumulators:
    // each step adds < 2^34, so 64 KiB (4096 steps) cannot overflow.
    let mut a: u64 = 0;
    let mut b: u64 = 0;
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        let x = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let y = u64::from_ne_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]);
        a += (x & 0xffff_ffff) + (x >> 32);
        b += (y & 0xffff_ffff) + (y >> 32);
    }
    let mut rest = chunks.remainder();
    while rest.len() >= 2 {
        a += u64::from(u16::from_ne_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        a += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    let mut s = a + b;
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    let mut s = s as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    // `s` is the native-order word sum; RFC 1071 byte-order independence
    // turns it into the big-endian one with a byte swap on little-endian.
    let be = u32::from(u16::from_be(s as u16));
    fold_partial(acc as u64 + be as u64)
}

#[inline]
fn fold_partial(s: u64) -> u32 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u32
}

/// Folds a running sum to 16 bits (end-around carry).
#[inline]
pub fn fold(acc: u32) -> u16 {
    let s = (acc & 0xffff) + (acc >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum to store: the ones' complement of the folded sum.
#[inline]
pub fn finish(acc: u32) -> u16 {
    !fold(acc)
}

/// The IPv4 pseudo-header sum for TCP/UDP: source, destination, protocol
/// and the transport length (header + payload).
#[inline]
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let w = |b: [u8; 4]| {
        u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]))
    };
    w(src) + w(dst) + u32::from(proto) + u32::from(len)
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered
/// data changed from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline]
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    let s = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(s)
}

/// The checksum over `data` with the checksum field (if inside `data`)
/// already zeroed.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Independent, obviously-correct reference: RFC 1071's loop over
    /// big-endian words with a 64-bit accumulator.
    pub(crate) fn reference_sum(data: &[u8]) -> u16 {
        let mut s: u64 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            s += (u64::from(data[i]) << 8) | u64::from(data[i + 1]);
            i += 2;
        }
        if i < data.len() {
            s += u64::from(data[i]) << 8;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// Reference checksum: ones' complement of the reference sum.
    pub(crate) fn reference_checksum(data: &[u8]) -> u16 {
        !reference_sum(data)
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn sum_matches_reference_for_all_lengths_and_alignments() {
        let data = pseudo_random(70_000, 7);
        for len in (0..300).chain([1499, 1500, 65_535, 65_536]) {
            for off in 0..3 {
                let d = &data[off..off + len];
                assert_eq!(fold(sum(d, 0)), reference_sum(d), "len {len} off {off}");
            }
        }
    }

    #[test]
    fn all_ones_does_not_overflow() {
        let d = vec![0xffu8; 65_536];
        assert_eq!(fold(sum(&d, 0)), reference_sum(&d));
        // A large running sum chains without overflow.
        assert_eq!(
            fold(sum(&d, u32::MAX)),
            fold(fold(sum(&d, 0)) as u32 + fold(u32::MAX) as u32)
        );
    }

    #[test]
    fn chaining_equals_one_pass_on_even_boundaries() {
        let d = pseudo_random(4000, 3);
        let chained = sum(&d[1000..], sum(&d[..1000], 0));
        assert_eq!(fold(chained), reference_sum(&d));
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d, 0)), 0xddf2);
        assert_eq!(checksum(&d), !0xddf2);
    }

    #[test]
    fn incremental_update_keeps_the_header_valid() {
        for seed in 1..200u64 {
            let mut h = pseudo_random(20, seed);
            h[0] = 0x45;
            h[10] = 0;
            h[11] = 0;
            let c = reference_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            for new_ttl in [0u8, 1, 63, 255] {
                let mut h2 = h.clone();
                let old = u16::from_be_bytes([h2[8], h2[9]]);
                h2[8] = new_ttl;
                let new = u16::from_be_bytes([h2[8], h2[9]]);
                let c2 = update(u16::from_be_bytes([h2[10], h2[11]]), old, new);
                h2[10..12].copy_from_slice(&c2.to_be_bytes());
                // A valid header sums to 0xffff (its checksum verifies).
                assert_eq!(reference_sum(&h2), 0xffff, "seed {seed} ttl {new_ttl}");
            }
        }
    }

    #[test]
    fn pseudo_header_matches_bytes() {
        let src = [10, 244, 1, 2];
        let dst = [10, 244, 2, 3];
        let bytes = [10, 244, 1, 2, 10, 244, 2, 3, 0, 6, 0x05, 0xdc];
        assert_eq!(
            fold(pseudo_header(src, dst, 6, 1500)),
            reference_sum(&bytes)
        );
    }
}
