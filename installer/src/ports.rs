//! Who holds a TCP port: the seed's `lsof -i :50052` as a function. `lsof`
//! (always on macOS) is asked first, `ss` (Linux) second; the parsers are pure.
//! Also the other questions the checks ask the system: is a port free, does
//! a far Mac's sshd answer, how long has a process been running.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    pub command: String,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.command, self.pid)
    }
}

/// The process listening on TCP `port`, if the tools can tell.
pub fn listener(port: u16) -> Option<Listener> {
    let lsof = run(
        "lsof",
        &["-nP", &format!("-iTCP:{port}"), "-sTCP:LISTEN", "-Fpc"],
    );
    if let Some(l) = lsof.as_deref().and_then(parse_lsof) {
        return Some(l);
    }
    let ss = run("ss", &["-ltnpH", &format!("sport = :{port}")]);
    ss.as_deref().and_then(parse_ss)
}

/// Whether anything listens on 127.0.0.1:`port` (a bind attempt says so without tools).
pub fn is_listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        std::time::Duration::from_millis(300),
    )
    .is_ok()
}

/// Whether the node (or ssh) could bind 127.0.0.1:`port` now.
///
/// Not with `std::net::TcpListener::bind`: it sets `SO_REUSEADDR`, and under
/// BSD rules (macOS) a bind to `127.0.0.1:P` with that option succeeds beside
/// another program's `*:P` listener, so the port would look free while that
/// program answers every connection to it. The probe binds without it; a
/// refusal with nothing listening is only old connections in TIME_WAIT, which
/// the node's own bind (with `SO_REUSEADDR`) gets past.
pub fn is_free(port: u16) -> bool {
    let bound =
        probe_socket().and_then(|s| s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into()));
    verdict(bound, || is_listening(port))
}

fn probe_socket() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::STREAM, None)
}

fn verdict(bound: io::Result<()>, listening: impl FnOnce() -> bool) -> bool {
    match bound {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => !listening(),
        Err(_) => false,
    }
}

/// Whether something accepts TCP at `address:port` within two seconds, from
/// this process: the installer, run from Terminal or over ssh, which Local
/// Network privacy exempts.
pub fn answers(address: &str, port: u16) -> bool {
    let Ok(mut addrs) = (address, port).to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// How long process `pid` has been running (`ps -o etime=`, on macOS and Linux).
pub fn process_age(pid: u32) -> Option<Duration> {
    parse_etime(run("ps", &["-o", "etime=", "-p", &pid.to_string()])?.trim())
}

/// `ps`'s elapsed time: `[[dd-]hh:]mm:ss`.
pub fn parse_etime(text: &str) -> Option<Duration> {
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().ok()?, rest),
        None => (0, text),
    };
    let mut secs = 0u64;
    let parts: Vec<&str> = rest.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    for p in parts {
        secs = secs * 60 + p.parse::<u64>().ok()?;
    }
    Some(Duration::from_secs(days * 86_400 + secs))
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `lsof -F pc` output: `p<pid>` then `c<command>` lines.
pub fn parse_lsof(text: &str) -> Option<Listener> {
    let mut pid = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix('p') {
            pid = p.parse().ok();
        } else if let (Some(c), Some(pid)) = (line.strip_prefix('c'), pid) {
            return Some(Listener {
                pid,
                command: c.to_owned(),
            });
        }
    }
    None
}

/// `ss -ltnpH` output: `… users:(("ssh",pid=123,fd=4))`.
pub fn parse_ss(text: &str) -> Option<Listener> {
    let users = text
        .lines()
        .find_map(|l| l.split_once("users:((").map(|(_, u)| u))?;
    let command = users.strip_prefix('"')?.split('"').next()?.to_owned();
    let pid = users
        .split("pid=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(Listener { pid, command })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lsof_and_ss() {
        assert_eq!(
            parse_lsof("p4242\ncssh\nf5\n"),
            Some(Listener {
                pid: 4242,
                command: "ssh".into()
            })
        );
        assert_eq!(parse_lsof(""), None);
        assert_eq!(
            parse_ss("LISTEN 0 128 127.0.0.1:50052 0.0.0.0:* users:((\"ssh\",pid=777,fd=5))\n"),
            Some(Listener {
                pid: 777,
                command: "ssh".into()
            })
        );
        assert_eq!(parse_ss("LISTEN 0 128 127.0.0.1:50052 0.0.0.0:*\n"), None);
    }

    #[test]
    fn elapsed_times_as_ps_prints_them() {
        assert_eq!(parse_etime("00:07"), Some(Duration::from_secs(7)));
        assert_eq!(parse_etime("01:02:03"), Some(Duration::from_secs(3723)));
        assert_eq!(
            parse_etime("2-01:02:03"),
            Some(Duration::from_secs(2 * 86_400 + 3723))
        );
        assert_eq!(parse_etime(""), None);
        assert_eq!(parse_etime("7"), None);
        let age = process_age(std::process::id()).expect("ps reports this test's age");
        assert!(age < Duration::from_secs(3600), "{age:?}");
    }

    #[test]
    fn the_port_probe_binds_without_so_reuseaddr() {
        // With SO_REUSEADDR, a BSD bind succeeds beside another program's
        // wildcard listener: the probe must not set it.
        assert!(!probe_socket().unwrap().reuse_address().unwrap());
    }

    #[test]
    fn a_wildcard_listener_takes_the_port_and_time_wait_does_not() {
        let other = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = other.local_addr().unwrap().port();
        assert!(!is_free(port), "another program's *:{port} listener");
        drop(other);
        // Another test's child process can hold a copy of the listener for
        // the moment between its fork and exec: free once that has passed.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_free(port) {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} still taken"
            );
            std::thread::yield_now();
        }
        let in_use = || Err(io::Error::from(io::ErrorKind::AddrInUse));
        assert!(
            verdict(in_use(), || false),
            "TIME_WAIT only: the node's bind gets past it"
        );
        assert!(!verdict(in_use(), || true));
        assert!(!verdict(
            Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            || false
        ));
    }
}
