//! `struct virtio_net_hdr` (10 bytes), which an `IFF_VNET_HDR` TUN puts in
//! front of every packet read and expects in front of every packet written.
//!
//! The device is switched to little-endian headers (`TUNSETVNETLE`) when it
//! is opened, so the 16-bit fields are always little-endian here.

/// Size of the header as the TUN device uses it (the default
/// `TUNSETVNETHDRSZ`, without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the packet carries a partial checksum: sum from `csum_start` to
/// the end and store at `csum_start + csum_offset` (the field already holds
/// the pseudo-header sum).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified (`CHECKSUM_UNNECESSARY`).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// Flag bit or'ed into `gso_type`: the TCP super-packet had CWR set.
pub const GSO_ECN: u8 = 0x80;

/// A decoded `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers to replicate in front of every segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Decodes the first [`VNET_HDR_LEN`] bytes of `b`; `None` if shorter.
    pub fn parse(b: &[u8]) -> Option<VirtioNetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 52, 0, 0x8c, 0x05, 20, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Some(h));
        assert_eq!(h.gso_kind(), GSO_TCPV4);
        assert!(h.needs_csum());
    }

    #[test]
    fn short_input_is_rejected() {
        assert_eq!(VirtioNetHdr::parse(&[0; 9]), None);
        assert_eq!(VirtioNetHdr::parse(&[0; 10]), Some(VirtioNetHdr::default()));
    }
}
