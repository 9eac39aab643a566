//! Passing open file descriptors over unix sockets (`SCM_RIGHTS`): the DNS socket handover
//! between two netd processes, systemd's file descriptor store, and the tests that stand in for
//! systemd.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Descriptors sent in one message at most (the kernel takes up to 253).
pub const FDS_PER_MESSAGE: usize = 32;

/// `sendmsg` of `data` with `fds` attached (`SCM_RIGHTS`) on a connected unix socket.
pub fn send_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = size_of::<RawFd>() * raw.len();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if raw.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(payload as u32) }) as usize };
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
        // its data (payload bytes, copied from `raw`) fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
        }
    }
    loop {
        // SAFETY: `msg` points to `iov`, `data` and `control`, all alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` into `buf`; returns the bytes received (0: the peer closed) and the descriptors
/// attached (`SCM_RIGHTS`, close-on-exec).
pub fn recv_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((size_of::<RawFd>() * FDS_PER_MESSAGE) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points to `iov` (into `buf`) and `control`, alive for the call, with
        // their lengths.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay within
    // it, and an SCM_RIGHTS header's data is an array of descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i * size_of::<RawFd>()).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were truncated (too many in one message)"));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let many: Vec<std::fs::File> = (0..FDS_PER_MESSAGE).map(|_| file.try_clone().unwrap()).collect();
        let fds: Vec<BorrowedFd> = many.iter().map(|f| f.as_fd()).collect();
        send_fds(a.as_fd(), b"x", &fds).unwrap();
        let mut buf = [0u8; 8];
        let (n, got) = recv_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, got.len()), (1, FDS_PER_MESSAGE));
        // The same open file: writing through one is seen through the other.
        use std::io::Write;
        let mut f = std::fs::File::from(got.into_iter().next().unwrap());
        f.write_all(b"hello").unwrap();
        assert_eq!(file.metadata().unwrap().len(), 5);
        // Nothing attached: no descriptors.
        send_fds(a.as_fd(), b"yz", &[]).unwrap();
        assert_eq!(recv_fds(b.as_fd(), &mut buf).map(|(n, fds)| (n, fds.len())).unwrap(), (2, 0));
    }
}
