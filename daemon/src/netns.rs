//! Network namespaces: run code inside a pod's network namespace to create sockets
//! there (DESIGN §2), and the socket options the daemon's sockets carry.
//!
//! A socket keeps the network namespace it was created in for its whole life, so the
//! daemon, living in the node's namespace, creates its in-pod sockets on a dedicated
//! thread that enters the pod's namespace with `setns`, creates them, and switches back;
//! the sockets can then be driven from any thread or tokio task. Tokio's worker threads
//! never change namespace.
//!
//! Every socket made here carries a [`SocketMark`]: the daemon's mark, which the
//! capture programs recognise and never redirect.
//!
//! Creating sockets in another namespace needs `CAP_SYS_ADMIN`; marks and transparent
//! sockets need `CAP_NET_ADMIN`.

use std::{
    fs::File,
    io, mem,
    net::{SocketAddrV4, TcpListener, TcpStream},
    num::NonZeroU32,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{
        self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, setsockopt, sockopt,
    },
};

/// The current thread's network namespace (`/proc/self` would name the main thread's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14; the same value on every
/// architecture but alpha, mips, parisc and sparc, which the daemon does not target).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Backlog of the daemon's listeners; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// An open handle on a network namespace, e.g. `/run/netns/<name>` or
/// `/proc/<pid>/ns/net`. While it is open the namespace stays alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

/// The kernel's identifier of a network namespace (`SO_NETNS_COOKIE`,
/// `bpf_get_netns_cookie`): unique for the life of the system, never reused.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NetnsCookie(pub u64);

/// A socket mark (`SO_MARK`), never zero: zero is what every unmarked socket carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SocketMark(NonZeroU32);

/// A TCP socket created (marked, possibly bound) but not connected yet: a std type for
/// it does not exist. Turn it into a tokio socket with [`UnconnectedTcp::into_tokio`].
#[derive(Debug)]
pub struct UnconnectedTcp(OwnedFd);

/// Why code could not run in a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace handle could not be opened.
    #[error("opening network namespace {}", path.display())]
    Open {
        /// The handle's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// No thread could be started to enter the namespace.
    #[error("starting a thread to enter network namespace {}", path.display())]
    Thread {
        /// The handle's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `setns` into the namespace failed (not a network namespace, or no privilege).
    #[error("entering network namespace {}", path.display())]
    Enter {
        /// The handle's path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The closure run in the namespace failed.
    #[error("in network namespace {}", path.display())]
    Run {
        /// The handle's path.
        path: PathBuf,
        /// The closure's error.
        #[source]
        source: io::Error,
    },
    /// The closure run in the namespace panicked.
    #[error("a panic in network namespace {}", path.display())]
    Panicked {
        /// The handle's path.
        path: PathBuf,
    },
}

impl Netns {
    /// Opens the namespace handle at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The path the handle was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a dedicated thread inside this namespace and returns its result;
    /// sockets `f` creates belong to this namespace for good. Blocks for the thread's
    /// lifetime (tens of microseconds plus `f`): from async code, keep `f` short or use
    /// `spawn_blocking`.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("ambit-netns".to_owned())
                .spawn_scoped(scope, || self.run_on_this_thread(f))
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            thread.join().map_err(|_| NetnsError::Panicked {
                path: self.path.clone(),
            })?
        })
    }

    /// The namespace's cookie, read from a socket created inside it.
    pub fn cookie(&self) -> Result<NetnsCookie, NetnsError> {
        self.run(|| {
            let probe = socket::socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            netns_cookie(&probe)
        })
    }

    /// Enters the namespace on the current thread, runs `f`, and returns to the
    /// thread's previous namespace. Only ever called on a thread of [`Netns::run`].
    fn run_on_this_thread<T>(&self, f: impl FnOnce() -> io::Result<T>) -> Result<T, NetnsError> {
        let path = || self.path.clone();
        let home = File::open(THREAD_NETNS).map_err(|source| NetnsError::Enter {
            path: path(),
            source,
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
            path: path(),
            source: errno.into(),
        })?;
        let result = f().map_err(|source| NetnsError::Run {
            path: path(),
            source,
        });
        if let Err(errno) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Harmless: the thread ends right after this and no other code runs on it.
            tracing::warn!(netns = %self.path.display(), %errno, "returning from a network namespace");
        }
        result
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl SocketMark {
    /// The mark `mark`, or `None` for zero.
    pub const fn new(mark: u32) -> Option<Self> {
        match NonZeroU32::new(mark) {
            Some(mark) => Some(Self(mark)),
            None => None,
        }
    }

    /// The mark's value.
    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl std::fmt::Display for SocketMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl std::str::FromStr for SocketMark {
    type Err = String;

    /// Decimal or `0x`-prefixed hexadecimal, not zero.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map_err(|e| format!("invalid socket mark {s:?}: {e}"))?;
        Self::new(value).ok_or_else(|| "the socket mark must not be zero".to_owned())
    }
}

impl UnconnectedTcp {
    /// The socket for tokio, to `connect` from there (non-blocking already).
    pub fn into_tokio(self) -> tokio::net::TcpSocket {
        tokio::net::TcpSocket::from_std_stream(TcpStream::from(self.0))
    }

    /// The socket as a std stream, for blocking use (connect with `nix` or
    /// convert further); it is non-blocking.
    pub fn into_std(self) -> TcpStream {
        TcpStream::from(self.0)
    }
}

impl AsFd for UnconnectedTcp {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A non-blocking TCP listener on `addr` carrying `mark`, in the calling thread's
/// namespace (call it inside [`Netns::run`]). `SO_REUSEADDR` is set, so a restarted
/// daemon can bind again while connections of its predecessor linger. Ready for
/// `tokio::net::TcpListener::from_std`.
pub fn tcp_listener(addr: SocketAddrV4, mark: SocketMark) -> io::Result<TcpListener> {
    let fd = tcp_socket_fd(mark)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    socket::listen(&fd, Backlog::new(LISTEN_BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}

/// A non-blocking, unconnected TCP socket carrying `mark`, in the calling thread's
/// namespace (call it inside [`Netns::run`]): the daemon's connections leave a pod
/// from such sockets and are never captured.
pub fn tcp_socket(mark: SocketMark) -> io::Result<UnconnectedTcp> {
    tcp_socket_fd(mark).map(UnconnectedTcp)
}

/// A non-blocking TCP socket carrying `mark`, with `IP_TRANSPARENT` and
/// `IP_FREEBIND`, bound to `bind` (typically the client's address, which is not
/// local): connecting from it preserves the client's source IP towards the app, once
/// the pod routes the replies back to it (see NOTES-kernel.md).
pub fn transparent_tcp_socket(bind: SocketAddrV4, mark: SocketMark) -> io::Result<UnconnectedTcp> {
    let fd = tcp_socket_fd(mark)?;
    setsockopt(&fd, sockopt::IpTransparent, &true)?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(bind))?;
    Ok(UnconnectedTcp(fd))
}

/// The cookie of the network namespace `socket` belongs to (`SO_NETNS_COOKIE`).
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<NetnsCookie> {
    let mut cookie: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    getsockopt_raw(socket.as_fd(), SO_NETNS_COOKIE, &mut cookie, &mut len)?;
    if len as usize != mem::size_of::<u64>() {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE returned {len} bytes, expected 8"
        )));
    }
    Ok(NetnsCookie(cookie))
}

/// The mark `socket` carries (`SO_MARK`); zero when unmarked.
pub fn socket_mark(socket: &impl AsFd) -> io::Result<u32> {
    Ok(socket::getsockopt(socket, sockopt::Mark)?)
}

fn tcp_socket_fd(mark: SocketMark) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::Mark, &mark.get())?;
    Ok(fd)
}

/// `getsockopt(SOL_SOCKET, name)` into a `u64`: nix has no wrapper for
/// `SO_NETNS_COOKIE`.
#[expect(unsafe_code, reason = "getsockopt(2) with an option nix does not wrap")]
fn getsockopt_raw(
    socket: std::os::fd::BorrowedFd<'_>,
    name: libc::c_int,
    value: &mut u64,
    len: &mut libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: `value` is valid for writes of `*len` (8) bytes and `len` for one
    // socklen_t; the descriptor is borrowed, hence open, for the call.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            std::ptr::from_mut(value).cast(),
            len,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_decimal_and_hex_and_refuse_zero() {
        assert_eq!("1337".parse::<SocketMark>().unwrap().get(), 1337);
        assert_eq!("0x539".parse::<SocketMark>().unwrap().get(), 0x539);
        assert!("0".parse::<SocketMark>().is_err());
        assert!("x".parse::<SocketMark>().is_err());
        assert_eq!(SocketMark::new(0x539).unwrap().to_string(), "0x539");
    }

    /// Needs no privilege: the cookie of the test's own namespace, read twice, is the
    /// same, and differs from zero.
    #[test]
    fn netns_cookie_is_stable_within_a_namespace() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (ca, cb) = (netns_cookie(&a).unwrap(), netns_cookie(&b).unwrap());
        assert_eq!(ca, cb);
        assert_ne!(ca.0, 0);
    }
}
