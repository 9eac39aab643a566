//! Thin wrappers over the system calls the datapath uses. Every `unsafe`
//! block of the crate that talks to the kernel is here.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SOL_UDP`: the socket option level of `UDP_SEGMENT` / `UDP_GRO`.
pub const SOL_UDP: libc::c_int = 17;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// An `ifreq` with the name filled in. The caller has checked that `name`
/// is 1..=15 bytes without NUL.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is a plain C struct (arrays, integers and a union of
    // those and pointers) for which all-zero bytes is a valid value.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

/// Opens one queue of the multi-queue TUN device `name`: `IFF_TUN|
/// IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE`, non-blocking, close-on-exec.
/// With `create`, the device must not exist yet (`IFF_TUN_EXCL`: EBUSY
/// otherwise), so two datapaths never share one device by accident.
pub fn open_tun_queue(name: &str, create: bool) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: `path` is a valid NUL-terminated string; open has no other
    // memory effects.
    let fd = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name);
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
    if create {
        flags |= libc::IFF_TUN_EXCL;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(fd)
}

/// `TUNSETPERSIST`: a persistent device outlives its queues (no process
/// holding it open); clearing the flag makes it vanish with the last queue.
pub fn tun_set_persist(fd: RawFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value (an unsigned long).
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, persist as libc::c_ulong) })?;
    Ok(())
}

/// `setpriority(PRIO_PROCESS, gettid(), nice)`: the nice value of the
/// calling thread only (Linux applies it per thread).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority has no memory effects.
    cvt(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) })?;
    Ok(())
}

/// Whether link `name` exists in the caller's namespace.
pub fn link_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the kernel may hand us.
pub fn tun_set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long).
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) })?;
    Ok(())
}

/// `TUNSETVNETHDRSZ`.
pub fn tun_set_vnet_hdr_sz(fd: RawFd, size: libc::c_int) -> io::Result<()> {
    let mut v = size;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &mut v as *mut libc::c_int) })?;
    Ok(())
}

/// `TUNSETVNETLE`: little-endian virtio headers whatever the host.
pub fn tun_set_vnet_le(fd: RawFd) -> io::Result<()> {
    let mut v: libc::c_int = 1;
    // SAFETY: TUNSETVNETLE reads one `int` through the pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETVNETLE, &mut v as *mut libc::c_int) })?;
    Ok(())
}

/// A datagram socket for interface ioctls, in the caller's namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SIOCSIFMTU` on link `name`.
pub fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let s = control_socket()?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: SIOCSIFMTU reads a `struct ifreq`, which `req` is.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFMTU as _,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Sets `IFF_UP` on link `name` (read-modify-write of its flags).
pub fn set_up(name: &str) -> io::Result<()> {
    let s = control_socket()?;
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq`.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCGIFFLAGS as _,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: the kernel just wrote `ifru_flags`, the union member read.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `req` is.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFFLAGS as _,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Sets an `int` socket option.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one `int` and we pass its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Reads an `int` socket option.
pub fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` has room for the `int` and `len` says so.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(value)
}

pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A UDP socket with `SO_REUSEPORT`, bound to `local`.
pub fn udp_socket(local: SocketAddrV4) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let sa = sockaddr_in(local);
    // SAFETY: `sa` is a valid sockaddr_in and we pass its exact size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// The local address a socket is bound to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: all-zero bytes is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` has room for an IPv4 address and `len` says so.
    cvt(unsafe {
        libc::getsockname(
            fd,
            &mut sa as *mut libc::sockaddr_in as *mut libc::sockaddr,
            &mut len,
        )
    })?;
    Ok(SocketAddrV4::new(
        u32::from_be(sa.sin_addr.s_addr).into(),
        u16::from_be(sa.sin_port),
    ))
}

/// A non-blocking `eventfd`, used to wake every worker at stop.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2) call.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the eventfd readable for good (nobody reads it).
pub fn eventfd_signal(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, as eventfd requires.
    let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    cvt_size(n).map(|_| ())
}

/// Waits until `fd` has `events` or `stop` is readable; returns `true` if
/// `stop` is. EINTR counts as a spurious wake-up (`false`).
pub fn wait(fd: RawFd, events: libc::c_short, stop: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd and we pass its length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(fds[1].revents != 0)
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) })
}

/// writev(2). The caller builds `iov` from live slices.
pub fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec points to memory the caller keeps alive and
    // unaliased for the duration of the call (the kernel only reads it).
    cvt_size(unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) })
}

/// sendmmsg(2); returns how many messages were sent.
pub fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: every mmsghdr's name, iovecs and control buffer point to
    // memory the caller keeps alive for the duration of the call.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, flags) };
    cvt(r).map(|n| n as usize)
}

/// recvmmsg(2) without timeout; returns how many messages were received.
pub fn recvmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: every mmsghdr's name, iovecs and control buffer point to
    // writable memory of the advertised sizes that the caller keeps alive
    // for the duration of the call.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            flags,
            std::ptr::null_mut(),
        )
    };
    cvt(r).map(|n| n as usize)
}

/// An all-zero `mmsghdr`, to be filled in.
pub fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: all-zero bytes is a valid mmsghdr (null pointers, zero lengths).
    unsafe { zeroed() }
}

/// An `iovec` for `data` (read-only use by the kernel: send, writev).
#[inline]
pub fn iovec(data: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }
}

/// A control message buffer: room for a few `cmsghdr` + small payloads,
/// aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct CmsgBuf(pub [u8; 64]);

impl Default for CmsgBuf {
    fn default() -> Self {
        CmsgBuf([0; 64])
    }
}

const CMSG_HDR: usize = size_of::<libc::cmsghdr>();
const CMSG_ALIGN: usize = size_of::<usize>();

fn cmsg_align(n: usize) -> usize {
    (n + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

impl CmsgBuf {
    /// Writes one `SOL_UDP`/`UDP_SEGMENT` message carrying `seg_size`;
    /// returns the control length to put in the msghdr.
    pub fn set_udp_segment(&mut self, seg_size: u16) -> usize {
        let len = CMSG_HDR + 2;
        let b = &mut self.0;
        b[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
        let lvl = size_of::<usize>();
        b[lvl..lvl + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
        b[lvl + 4..lvl + 8].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
        b[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&seg_size.to_ne_bytes());
        cmsg_align(len)
    }

    /// Finds the `SOL_UDP`/`UDP_GRO` message among the first `len` bytes
    /// (as the kernel returned them) and returns its segment size.
    pub fn udp_gro_size(&self, len: usize) -> Option<usize> {
        let b = &self.0[..len.min(self.0.len())];
        let mut off = 0;
        while off + CMSG_HDR <= b.len() {
            let mut w = [0u8; size_of::<usize>()];
            w.copy_from_slice(&b[off..off + size_of::<usize>()]);
            let clen = usize::from_ne_bytes(w);
            if clen < CMSG_HDR || off + clen > b.len() {
                return None;
            }
            let lvl = off + size_of::<usize>();
            let level = i32::from_ne_bytes([b[lvl], b[lvl + 1], b[lvl + 2], b[lvl + 3]]);
            let ty = i32::from_ne_bytes([b[lvl + 4], b[lvl + 5], b[lvl + 6], b[lvl + 7]]);
            if level == SOL_UDP && ty == libc::UDP_GRO && clen >= CMSG_HDR + 4 {
                let d = off + CMSG_HDR;
                let v = i32::from_ne_bytes([b[d], b[d + 1], b[d + 2], b[d + 3]]);
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            off += cmsg_align(clen);
        }
        None
    }
}

/// Best-effort `net.ipv6.conf.NAME.disable_ipv6 = 1` in the caller's
/// namespace: the overlay is IPv4 only, and an IPv6-enabled TUN sends
/// router solicitations and MLD reports we would only drop.
pub fn disable_ipv6(name: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_segment_cmsg_layout_matches_libc() {
        let mut c = CmsgBuf::default();
        let len = c.set_udp_segment(1472);
        // SAFETY: pure arithmetic on constants.
        let space = unsafe { libc::CMSG_SPACE(2) } as usize;
        assert_eq!(len, space);
        // SAFETY: a msghdr pointing at our buffer, read with libc's macros.
        unsafe {
            let mut m: libc::msghdr = zeroed();
            m.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
            m.msg_controllen = len as _;
            let h = libc::CMSG_FIRSTHDR(&m);
            assert!(!h.is_null());
            assert_eq!((*h).cmsg_level, SOL_UDP);
            assert_eq!((*h).cmsg_type, libc::UDP_SEGMENT);
            assert_eq!((*h).cmsg_len as usize, libc::CMSG_LEN(2) as usize);
            let d = libc::CMSG_DATA(h) as *const u16;
            assert_eq!(d.read_unaligned(), 1472);
        }
    }

    #[test]
    fn udp_gro_cmsg_is_found_after_another_message() {
        let mut c = CmsgBuf::default();
        // First a foreign message (SOL_SOCKET, type 99, 4 bytes), then UDP_GRO.
        let first = CMSG_HDR + 4;
        c.0[..size_of::<usize>()].copy_from_slice(&first.to_ne_bytes());
        let l = size_of::<usize>();
        c.0[l..l + 4].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        c.0[l + 4..l + 8].copy_from_slice(&99i32.to_ne_bytes());
        let off = cmsg_align(first);
        let b = &mut c.0[off..];
        b[..l].copy_from_slice(&(CMSG_HDR + 4).to_ne_bytes());
        b[l..l + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
        b[l + 4..l + 8].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        b[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1400i32.to_ne_bytes());
        let total = off + cmsg_align(CMSG_HDR + 4);
        assert_eq!(c.udp_gro_size(total), Some(1400));
        assert_eq!(c.udp_gro_size(off), None);
        assert_eq!(c.udp_gro_size(0), None);
    }
}
