//! Apple-only system calls, written against the documented macOS headers and
//! kept minimal; scripts/check-apple type-checks them on Linux.

use std::io;
use std::os::fd::AsRawFd;

use socket2::SockRef;

/// `TCP_NOTSENT_LOWAT` from macOS `<netinet/tcp.h>` (`#define TCP_NOTSENT_LOWAT 0x201`);
/// the libc crate does not export it for Apple targets, nor socket2 a setter.
const TCP_NOTSENT_LOWAT: libc::c_int = 0x201;

pub fn set_tcp_notsent_lowat(sock: &SockRef<'_>, bytes: u32) -> io::Result<()> {
    let value: libc::c_int = bytes.min(libc::c_int::MAX as u32) as libc::c_int;
    // SAFETY: a valid socket descriptor, a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
