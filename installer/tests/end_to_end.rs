//! The installer end to end, on one machine: install mac1 and mac2 into two
//! temporary homes with `--root --no-load`, then run what the generated
//! LaunchAgents say, as launchd would — the ssh tunnel against a real sshd on
//! 127.0.0.1 with throw-away keys, and both nodes — and check that they link,
//! that a killed tunnel comes back when restarted as KeepAlive restarts it, and
//! that `--check` is green when up and names the fault when not.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sshd::Sshd;
use common::{figure, free_port, get_json, node_bin, output_text as text, port_open, wait_until};
use tensorlink_launchd::LaunchAgent;

/// A process started from a plist the way launchd starts it: its
/// ProgramArguments, only its EnvironmentVariables, its working directory, stdin
/// from /dev/null and output appended to its log.
struct Job {
    agent: LaunchAgent,
    child: Option<Child>,
}

impl Job {
    fn load(plist: &Path) -> Job {
        let agent = LaunchAgent::from_bytes(&std::fs::read(plist).unwrap()).unwrap();
        let mut job = Job { agent, child: None };
        job.start();
        job
    }

    fn start(&mut self) {
        let a = &self.agent;
        let log = |p: &Option<String>| {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p.as_ref().unwrap())
                .unwrap();
            Stdio::from(f)
        };
        let mut cmd = Command::new(&a.program_arguments[0]);
        cmd.args(&a.program_arguments[1..])
            .env_clear()
            .envs(&a.environment_variables)
            .env(
                "HOME",
                std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
            )
            .stdin(Stdio::null())
            .stdout(log(&a.standard_out_path))
            .stderr(log(&a.standard_error_path));
        if let Some(dir) = &a.working_directory {
            cmd.current_dir(dir);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// launchd's KeepAlive: whenever the job has exited, start it again after
    /// its ThrottleInterval, until `done` holds.
    fn keep_alive_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Duration {
        let throttle = Duration::from_secs(self.agent.throttle_interval.unwrap_or(10).into());
        let mut restarts = 0;
        let took = wait_until(timeout, what, || {
            if self.exited() {
                std::thread::sleep(throttle);
                self.start();
                restarts += 1;
            }
            done()
        });
        figure(&format!(
            "{}: {restarts} restart(s) by the KeepAlive emulation",
            self.agent.label
        ));
        took
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.agent.standard_error_path.as_ref().unwrap())
            .unwrap_or_default()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.agent.label, self.log());
        }
    }
}

fn install(args: &[&str], cluster: &Path, root: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_install"))
        .arg("--cluster")
        .arg(cluster)
        .arg("--root")
        .arg(root)
        .arg("--no-load")
        .args(args)
        .output()
        .unwrap()
}

/// The processes of the remote hold command under this test's sshd: the
/// login shell running `exec sleep 2147483647` and, once it has exec'd or if
/// it forks, the sleep. Only descendants of this sshd count, so other
/// processes on the machine never do.
fn holders(sshd: u32) -> Vec<u32> {
    let descends = |mut pid: u32| {
        while let Some(p) = parent(pid).filter(|&p| p > 1) {
            if p == sshd {
                return true;
            }
            pid = p;
        }
        false
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|arg| arg.ends_with(b"sleep 2147483647") || arg == b"2147483647")
            })
        })
        .filter(|&pid| descends(pid))
        .collect()
}

/// One hold command per session: the held processes whose parent is not
/// itself one of them.
fn sessions(held: &[u32]) -> usize {
    held.iter()
        .filter(|&&pid| !parent(pid).is_some_and(|p| held.contains(&p)))
        .count()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Running, not exited: a zombie waiting for its parent counts as gone.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn peer_up(api: u16, id: &str) -> bool {
    get_json(api, "/peers")
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|peers| peers.iter().any(|p| p["id"] == id && p["state"] == "up"))
}

fn lists_both(api: u16) -> bool {
    get_json(api, "/topology")
        .is_some_and(|t| t["nodes"].get("mac1").is_some() && t["nodes"].get("mac2").is_some())
}

#[test]
fn installed_agents_link_two_nodes_through_a_real_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let (p1, a1, p2, a2, l, r) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    // mac2 is this machine's sshd; mac1's address is never dialed (nobody tunnels to it).
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "[[nodes]]\nid = \"mac1\"\naddress = \"127.0.0.2\"\nssh_user = \"{u}\"\nnode_port = {p1}\napi_port = {a1}\n\n\
             [[nodes]]\nid = \"mac2\"\naddress = \"127.0.0.1\"\nssh_user = \"{u}\"\nssh_port = {sp}\nnode_port = {p2}\napi_port = {a2}\n\n\
             [[links]]\nfrom = \"mac1\"\nto = \"mac2\"\nlocal_port = {l}\nremote_port = {r}\n",
            u = sshd.user,
            sp = sshd.port
        ),
    )
    .unwrap();

    // Two homes; mac1's has a space in it, like "Application Support" paths do.
    let (home1, home2) = (dir.path().join("mac1 home"), dir.path().join("mac2home"));
    let ssh_dir = home1.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::copy(sshd.dir.join("client_key"), ssh_dir.join("id_ed25519")).unwrap();
    std::fs::set_permissions(
        ssh_dir.join("id_ed25519"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::copy(sshd.dir.join("known_hosts"), ssh_dir.join("known_hosts")).unwrap();

    let node = node_bin();
    let node = node.to_str().unwrap();
    for (id, home) in [("mac1", &home1), ("mac2", &home2)] {
        let out = install(&["--node", id, "--node-binary", node], &cluster, home);
        assert!(out.status.success(), "install {id}:\n{}", text(&out));
    }
    let agents = |home: &PathBuf, label: &str| {
        home.join(format!("Library/LaunchAgents/dev.tensorlink.{label}.plist"))
    };

    let start = Instant::now();
    let mut tunnel = Job::load(&agents(&home1, "tunnel.mac2"));
    let _mac2 = Job::load(&agents(&home2, "node"));
    let _mac1 = Job::load(&agents(&home1, "node"));
    wait_until(
        Duration::from_secs(15),
        "both nodes to list both through the installed tunnel",
        || lists_both(a1) && lists_both(a2),
    );
    figure(&format!(
        "installed agents: both /topology list both {:?} after start",
        start.elapsed()
    ));
    assert!(port_open(l) && port_open(r));

    let check = install(&["--node", "mac1", "--check"], &cluster, &home1);
    let report = text(&check);
    assert!(check.status.success(), "--check should be green:\n{report}");
    assert!(
        report.contains("[ok  ] tunnel to mac2")
            && report.contains("[ok  ] link to mac2")
            && report.contains("lists all 2 nodes"),
        "{report}"
    );
    // The receiving Mac checks the -R end that lands on it, and its peer through it.
    let far = install(&["--node", "mac2", "--check"], &cluster, &home2);
    let far_report = text(&far);
    assert!(
        far.status.success(),
        "--check on mac2 should be green:\n{far_report}"
    );
    assert!(
        far_report.contains(&format!(
            "[ok  ] tunnel from mac1: port {r} forwarded by sshd"
        )) && far_report.contains("[ok  ] link to mac1: mac1 answered a handshake"),
        "{far_report}"
    );

    // kill -9 the ssh client; restart it as KeepAlive does after ThrottleInterval.
    // With -tt the far end's hold command dies with the session: nothing leaks.
    let held = holders(sshd.pid());
    assert_eq!(
        sessions(&held),
        1,
        "one remote hold command while the tunnel is up: {held:?}"
    );
    tunnel.kill();
    wait_until(
        Duration::from_secs(5),
        "the far hold command to end with its session",
        || !held.iter().any(|&pid| alive(pid)),
    );
    wait_until(Duration::from_secs(5), "mac1 to lose mac2", || {
        !peer_up(a1, "mac2")
    });
    let down = install(&["--node", "mac1", "--check"], &cluster, &home1);
    let report = text(&down);
    assert!(
        !down.status.success(),
        "--check must fail with the tunnel down:\n{report}"
    );
    assert!(
        report.contains("[FAIL] tunnel to mac2: forwarded port") && report.contains("is down"),
        "{report}"
    );

    let restarted = Instant::now();
    tunnel.start();
    wait_until(
        Duration::from_secs(15),
        "both links back after the ssh restart",
        || peer_up(a1, "mac2") && peer_up(a2, "mac1"),
    );
    figure(&format!(
        "installed agents: linked again {:?} after the killed ssh was restarted",
        restarted.elapsed()
    ));

    // Another process on the tunnel's -L port: named, and it is not ssh.
    tunnel.kill();
    wait_until(Duration::from_secs(5), "the -L port to be released", || {
        !port_open(l)
    });
    let squatter = std::net::TcpListener::bind(("127.0.0.1", l)).unwrap();
    let taken = install(&["--node", "mac1", "--check"], &cluster, &home1);
    let report = text(&taken);
    assert!(!taken.status.success());
    assert!(
        report.contains(&format!("port {l} is held by")) && report.contains("not by ssh"),
        "{report}"
    );
    drop(squatter);

    // The stale -R port: the far side still holds it (here: another listener)
    // when the tunnel comes back. ssh must exit (ExitOnForwardFailure) so that
    // launchd retries, and the retries must converge once the port is free.
    // sshd binds "localhost": both loopbacks, as a stale session holds them.
    let stale: Vec<_> = [("127.0.0.1", true), ("::1", false)]
        .into_iter()
        .filter_map(
            |(ip, required)| match std::net::TcpListener::bind((ip, r)) {
                Ok(l) => Some(l),
                Err(e) if required => panic!("binding {ip}:{r}: {e}"),
                Err(_) => None, // no IPv6 loopback here: sshd cannot bind it either
            },
        )
        .collect();
    tunnel.start();
    wait_until(
        Duration::from_secs(10),
        "ssh to give up on the taken -R port",
        || tunnel.exited(),
    );
    assert!(
        tunnel.log().contains("remote port forwarding failed"),
        "{}",
        tunnel.log()
    );
    let report = text(&install(&["--node", "mac1", "--check"], &cluster, &home1));
    assert!(
        report.contains(&format!("the -R port {r} is taken on mac2")),
        "{report}"
    );
    drop(stale);
    let converged = tunnel.keep_alive_until(
        Duration::from_secs(20),
        "the tunnel to recover once the -R port is free",
        || peer_up(a1, "mac2") && peer_up(a2, "mac1"),
    );
    figure(&format!(
        "installed agents: stale -R port case converged {converged:?} after the port was freed"
    ));

    // Uninstall removes what install wrote, and running it twice is fine.
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_install"))
            .arg("--root")
            .arg(&home1)
            .args(["--no-load", "--uninstall"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(!home1
        .join("Library/Application Support/tensorlink")
        .exists());
    assert!(!agents(&home1, "node").exists() && !agents(&home1, "tunnel.mac2").exists());
    assert!(
        ssh_dir.join("id_ed25519").exists(),
        "the user's own files stay"
    );
}
