//! Who holds a TCP port: the seed's `lsof -i :50052` as a function. `lsof`
//! (always on macOS) is asked first, `ss` (Linux) second; the parsers are pure.

use std::process::{Command, Stdio};

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

/// Whether this process could bind 127.0.0.1:`port` now.
pub fn is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
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
}
