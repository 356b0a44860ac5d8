//! `--exec COMMAND`: runs a command per key, the payload on its stdin, the key and the message's
//! metadata in its environment.
//!
//! Each command runs under a watchdog, [`guard`](super::guard): a copy of this executable that
//! leads a process group of its own and starts the command in it. A ctrl-c at the terminal
//! reaches the sidecar (which then lets running commands finish within `--grace`), not the
//! commands. A command past `--timeout`, or still running when the grace ends, is killed with
//! its whole group (SIGKILL), so the children of a `sh -c` go too; so is whatever a command
//! that exited left running in its group. And the whole group dies with the sidecar, however
//! the sidecar dies (SIGKILL included): the guard kills it when its control socket to the
//! sidecar ends. A command can never finish an effect after its sidecar is gone, to be run
//! again once its lease ends.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use idem::{Acquisition, Attempt};
use idem_broker::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Failure, ResultMode, guard};

/// Prefix of the variables holding a message's headers. Variables the sidecar sets only for
/// some messages (this prefix and [`MESSAGE_ID`]) are removed from what commands inherit, so
/// that a message without them never shows the sidecar's own values.
const HEADER_PREFIX: &str = "IDEM_HEADER_";
/// The variable holding the producer's message id.
const MESSAGE_ID: &str = "IDEM_MESSAGE_ID";

/// A command to run per key.
#[derive(Debug)]
pub(crate) struct Exec {
    /// The watchdog's program: this executable.
    guard: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    /// The command as the operator wrote it, for reasons and logs.
    shown: String,
    timeout: Duration,
    result: ResultMode,
    /// Inherited variables to remove from every command's environment.
    stale: Vec<std::ffi::OsString>,
}

impl Exec {
    /// Splits `command` into words (or prepares `sh -c command`) and checks that the program
    /// exists, so a typo fails at start rather than dead-lettering every message.
    ///
    /// # Errors
    /// An empty or badly quoted command, or a program that cannot be found or run.
    pub(crate) fn new(
        command: &str,
        shell: bool,
        timeout: Duration,
        result: ResultMode,
    ) -> anyhow::Result<Exec> {
        let words = if shell {
            vec!["sh".to_owned(), "-c".to_owned(), command.to_owned()]
        } else {
            shell_words::split(command)
                .with_context(|| format!("cannot split --exec {command:?} into words"))?
        };
        let Some((program, args)) = words.split_first() else {
            bail!("--exec is empty: give the command to run per message");
        };
        if command.trim().is_empty() {
            bail!("--exec is empty: give the command to run per message");
        }
        let program = find_program(program)?;
        let guard = guard_program()?;
        let stale = std::env::vars_os()
            .map(|(name, _)| name)
            .filter(|name| {
                let n = name.as_bytes();
                n.starts_with(HEADER_PREFIX.as_bytes()) || n == MESSAGE_ID.as_bytes()
            })
            .collect();
        Ok(Exec {
            guard,
            program,
            args: args.to_vec(),
            shown: command.to_owned(),
            timeout,
            result,
            stale,
        })
    }

    /// Runs the command for one message, under its watchdog ([`guard`](super::guard)). Keeps
    /// at most `limit + 1` bytes of stdout: the executor fails the key when a result is over
    /// the store's limit, and one byte more is enough for it to tell.
    ///
    /// # Errors
    /// A [`Failure`] when the command cannot start, exits with another status than 0, is
    /// killed, or outlives the timeout.
    pub(crate) async fn run(
        &self,
        message: &Message,
        attempt: &Attempt,
        limit: usize,
    ) -> Result<Bytes, Failure> {
        let cannot_run = |e: io::Error| Failure(format!("cannot run `{}`: {e}", self.shown));
        let payload = message.payload().clone();
        let (control, guard_end) = std::os::unix::net::UnixStream::pair().map_err(cannot_run)?;
        let mut cmd = tokio::process::Command::new(&self.guard);
        cmd.arg(guard::SUBCOMMAND)
            .arg("--payload-bytes")
            .arg(payload.len().to_string())
            .arg("--")
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::from(OwnedFd::from(guard_end)))
            .stdout(match self.result {
                ResultMode::Output => Stdio::piped(),
                ResultMode::None => Stdio::inherit(),
            })
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        for name in &self.stale {
            cmd.env_remove(name);
        }
        for (name, value) in environment(message, attempt) {
            cmd.env(name, value);
        }
        let spawned = cmd.spawn();
        // Closes the sidecar's copy of the guard's end of the control socket.
        drop(cmd);
        let mut child = spawned.map_err(cannot_run)?;
        // Declared after `child`, so dropped before it: the group is killed before the guard
        // can be reaped.
        let group = GroupKiller::new(child.id());
        let mut control = control
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(control))
            .map_err(cannot_run)?;
        let stdout = child.stdout.take();
        let (mut from_guard, mut to_guard) = control.split();
        let work = async {
            // The guard reads the whole payload before it starts the command. A failed write
            // means the guard is gone, which the missing report says.
            let feed = async { to_guard.write_all(&payload).await };
            let mut io =
                std::pin::pin!(async { tokio::join!(feed, read_bounded(stdout, limit)).1 });
            let mut report = std::pin::pin!(read_report(&mut from_guard));
            let mut output = None;
            let report = loop {
                tokio::select! {
                    out = &mut io, if output.is_none() => output = Some(out),
                    report = &mut report => break report,
                }
            };
            let output = match output {
                Some(out) => out,
                // The command exited, but something it started in the background still holds
                // its stdout: its exit status is the result. The holders are killed (the
                // guard is alive, so the group's id cannot have been reused) and what was
                // written is read to the end.
                None => match tokio::time::timeout(LEFTOVER_WAIT, &mut io).await {
                    Ok(out) => out,
                    Err(_) => {
                        group.kill();
                        io.await
                    }
                },
            };
            (report, output)
        };
        let done = tokio::time::timeout(self.timeout, work).await;
        // Whatever the command left running in its group goes, with the guard; then the guard
        // is reaped.
        group.kill();
        let guard_status = child.wait().await;
        group.reaped();
        let Ok((report, output)) = done else {
            return Err(Failure(format!(
                "`{}` timed out after {} and was killed",
                self.shown,
                crate::duration::exact(self.timeout)
            )));
        };
        let status = match report {
            Report::Exited(status) => status,
            Report::CannotRun(why) => {
                return Err(Failure(format!("cannot run `{}`: {why}", self.shown)));
            }
            Report::Gone => {
                let how = match guard_status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(Failure(format!(
                    "`{}` was killed: its watchdog process ended ({how}) before the command did",
                    self.shown
                )));
            }
        };
        if !status.success() {
            return Err(Failure(format!("`{}` failed: {status}", self.shown)));
        }
        let (out, total) =
            output.map_err(|e| Failure(format!("reading the stdout of `{}`: {e}", self.shown)))?;
        if total > limit as u64 {
            tracing::error!(
                key = %attempt.key(),
                bytes = total,
                limit,
                "the command's stdout is over the store's result limit: the key is \
                 failed (its effect is not repeated); use --result none for commands \
                 that print more"
            );
        }
        Ok(Bytes::from(out))
    }
}

/// What the guard reported on the control socket.
enum Report {
    /// The command exited (or was killed) with this status.
    Exited(std::process::ExitStatus),
    /// The command could not be started.
    CannotRun(String),
    /// The guard ended without a report (it was killed).
    Gone,
}

/// Reads the guard's one-line report.
async fn read_report(r: &mut (impl AsyncRead + Unpin)) -> Report {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.contains(&b'\n') && line.len() < 4096 {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return Report::Gone,
            Ok(n) => line.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&line);
    let line = line.lines().next().unwrap_or_default();
    match line.split_once(' ') {
        Some(("status", raw)) => match raw.trim().parse::<i32>() {
            Ok(raw) => Report::Exited(std::process::ExitStatus::from_raw(raw)),
            Err(_) => Report::CannotRun(format!("unexpected watchdog report {line:?}")),
        },
        Some(("error", why)) => Report::CannotRun(why.to_owned()),
        _ => Report::CannotRun(format!("unexpected watchdog report {line:?}")),
    }
}

/// Reads all of `r`, keeping at most `limit + 1` bytes; returns them and the total read.
async fn read_bounded(
    r: Option<impl AsyncRead + Unpin>,
    limit: usize,
) -> io::Result<(Vec<u8>, u64)> {
    let Some(mut r) = r else {
        return Ok((Vec::new(), 0));
    };
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((kept, total));
        }
        total += n as u64;
        let room = limit.saturating_add(1).saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// The variables a command gets for one message.
pub(crate) fn environment(
    message: &Message,
    attempt: &Attempt,
) -> Vec<(String, std::ffi::OsString)> {
    let key = attempt.key();
    let mut env = vec![
        ("IDEMPOTENCY_KEY".to_owned(), key.to_string().into()),
        ("IDEM_NAMESPACE".to_owned(), key.namespace().as_str().into()),
        ("IDEM_KEY_ID".to_owned(), key.id().into()),
        (
            "IDEM_ATTEMPT".to_owned(),
            attempt.number().to_string().into(),
        ),
        (
            "IDEM_ACQUISITION".to_owned(),
            acquisition(attempt.acquisition()).into(),
        ),
        (
            "IDEM_DELIVERY_COUNT".to_owned(),
            message.delivery_count().to_string().into(),
        ),
        ("IDEM_ORIGIN".to_owned(), message.origin().into()),
    ];
    if let Some(id) = message.message_id() {
        env.push((MESSAGE_ID.to_owned(), id.into()));
    }
    for (name, value) in message.headers() {
        // A variable cannot hold NUL; such a header is left out.
        if value.contains(&0) {
            continue;
        }
        let var = format!("{HEADER_PREFIX}{}", env_name(name));
        if env.iter().any(|(n, _)| *n == var) {
            continue; // the first header of a name wins, as Message::header does
        }
        env.push((var, OsStr::from_bytes(value).to_owned()));
    }
    env
}

/// `name` as an environment variable name: ASCII letters upper-cased, anything but A-Z 0-9
/// as `_`.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// How the claim came about, as `new`, `retry`, `takeover` (the previous owner's lease ended:
/// it may have done the effect) or `reprocess` (the record had outlived its retention).
pub(crate) fn acquisition(a: Acquisition) -> &'static str {
    match a {
        Acquisition::New => "new",
        Acquisition::Retry => "retry",
        Acquisition::Takeover => "takeover",
        Acquisition::Reprocess => "reprocess",
        _ => "other",
    }
}

/// How long the output of a command that exited may take to end before what it left running
/// in the background is killed.
const LEFTOVER_WAIT: Duration = Duration::from_secs(1);

/// Kills a command's process group (its guard's): on timeout, after the command exited, or when
/// its future is dropped (the shutdown grace ended). Never after the guard, the group's leader,
/// was reaped: the group's id could then be reused.
struct GroupKiller {
    pgid: Option<rustix::process::Pid>,
    reaped: AtomicBool,
}

impl GroupKiller {
    fn new(pid: Option<u32>) -> Self {
        Self {
            pgid: pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw),
            reaped: AtomicBool::new(false),
        }
    }

    fn reaped(&self) {
        self.reaped.store(true, Ordering::Release);
    }

    fn kill(&self) {
        if self.reaped.load(Ordering::Acquire) {
            return;
        }
        if let Some(pgid) = self.pgid {
            // ESRCH: the group is already gone.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The program that runs a command's watchdog: this very executable. `/proc/self/exe` is it
/// even after its file was replaced or deleted (an upgrade in place), so the watchdog always
/// speaks the sidecar's protocol.
#[cfg(not(test))]
fn guard_program() -> anyhow::Result<PathBuf> {
    let this = Path::new("/proc/self/exe");
    if this.exists() {
        return Ok(this.to_path_buf());
    }
    std::env::current_exe().context("cannot find the idem executable (it runs each --exec command)")
}

/// In unit tests, this executable is the test harness: the watchdog is the `idem` binary cargo
/// built next to it (`cargo test` builds it for the integration tests).
#[cfg(test)]
fn guard_program() -> anyhow::Result<PathBuf> {
    let harness = std::env::current_exe()?;
    let idem = harness
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("idem"))
        .context("no directory above the test harness")?;
    anyhow::ensure!(
        idem.is_file(),
        "{} is missing: build the idem binary first (cargo test -p idem-cli builds it)",
        idem.display()
    );
    Ok(idem)
}

/// Finds `program` the way `execvp` would, so that a missing one is reported at start.
fn find_program(program: &str) -> anyhow::Result<PathBuf> {
    let runnable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !runnable(&path) {
            bail!("--exec: {program} is not an executable file");
        }
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .with_context(|| format!("--exec: cannot find the program {program:?} on PATH"))
}

#[cfg(test)]
mod tests {
    use idem::{Executor, MemoryStore, Namespace, Outcome};

    use super::*;

    fn exec(command: &str, timeout: Duration) -> Exec {
        Exec::new(command, false, timeout, ResultMode::Output).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs `e` on `message` once, under a claim of a fresh memory store limited to `limit`
    /// result bytes.
    async fn run_once(e: &Exec, message: &Message, limit: usize) -> Outcome<Bytes, Failure> {
        let executor = Executor::new(MemoryStore::new().max_result_bytes(limit));
        let key = Namespace::new("t")
            .and_then(|ns| ns.key("k-1"))
            .unwrap_or_else(|e| panic!("{e}"));
        executor
            .run(key, message.payload(), |attempt| async move {
                e.run(message, &attempt, limit).await
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn header_names_become_variable_names() {
        assert_eq!(env_name("Content-Type"), "CONTENT_TYPE");
        assert_eq!(env_name("x.trace/id"), "X_TRACE_ID");
    }

    #[tokio::test]
    async fn the_command_gets_the_payload_and_the_key_and_its_stdout_is_the_result() {
        let e = exec(
            r#"sh -c 'printf "%s|%s|%s|%s|" "$IDEMPOTENCY_KEY" "$IDEM_MESSAGE_ID" "$IDEM_HEADER_X_TENANT" "$IDEM_ATTEMPT"; cat'"#,
            Duration::from_secs(10),
        );
        let message = Message::new("orders", &b"{\"amount\": 10}"[..])
            .with_message_id("m-1")
            .with_header("x-tenant", &b"acme"[..]);
        match run_once(&e, &message, 1024).await {
            Outcome::Executed(out) => {
                assert_eq!(&out[..], &b"t:k-1|m-1|acme|1|{\"amount\": 10}"[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_a_failed_attempt() {
        let e = exec("sh -c 'exit 3'", Duration::from_secs(10));
        match run_once(&e, &Message::new("q", &b""[..]), 1024).await {
            Outcome::Released { error, .. } => {
                assert!(error.0.contains("exit status: 3"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_timed_out_command_is_killed_with_its_children() {
        // The grandchild (`sleep`) would outlive a kill of `sh` alone.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pidfile = dir.path().join("pid");
        let e = exec(
            &format!("sh -c 'sleep 30 & echo $! > {}; wait'", pidfile.display()),
            Duration::from_millis(500),
        );
        let started = std::time::Instant::now();
        match run_once(&e, &Message::new("q", &b""[..]), 1024).await {
            Outcome::Released { error, .. } => {
                assert!(error.0.contains("timed out after 500ms"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_killed(&pidfile, "the grandchild");
    }

    /// A command that succeeded but left a background process holding its stdout: its exit
    /// status decides (not a timeout that would run its effect again), and the leftover is
    /// killed.
    #[tokio::test]
    async fn a_command_that_leaves_a_background_process_succeeds_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pidfile = dir.path().join("pid");
        let e = exec(
            &format!(
                "sh -c 'sleep 30 & echo $! > {}; echo ok'",
                pidfile.display()
            ),
            Duration::from_secs(20),
        );
        let started = std::time::Instant::now();
        match run_once(&e, &Message::new("q", &b""[..]), 1024).await {
            Outcome::Executed(out) => assert_eq!(&out[..], b"ok\n"),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the background process: {:?}",
            started.elapsed()
        );
        assert_killed(&pidfile, "the background process");
    }

    /// Waits until the process whose pid is in `pidfile` is gone, or a zombie waiting for a
    /// reaper that is not ours.
    fn assert_killed(pidfile: &Path, what: &str) {
        let pid = std::fs::read_to_string(pidfile).unwrap_or_else(|e| panic!("{e}"));
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&stat).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} ({}) survived",
                pid.trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn stdout_over_the_result_limit_fails_the_key_instead_of_truncating() {
        let e = exec("head -c 5000 /dev/zero", Duration::from_secs(10));
        match run_once(&e, &Message::new("q", &b""[..]), 1000).await {
            Outcome::Exhausted { reason, .. } => {
                assert!(
                    reason.contains("over the store's limit of 1000"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_programs_are_reported_at_start() {
        let new = |c: &str| Exec::new(c, false, Duration::from_secs(1), ResultMode::Output);
        let err = |c: &str| match new(c) {
            Ok(_) => panic!("{c:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err("no-such-program-xyz --flag").contains("cannot find the program"));
        assert!(err("'unterminated").contains("cannot split"));
        assert!(err("  ").contains("empty"));
        assert!(err("/no/such/file").contains("not an executable file"));
        assert!(new("sh -c 'exit 0'").is_ok());
    }
}
