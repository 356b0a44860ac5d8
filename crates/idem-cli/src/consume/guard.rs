//! `idem __exec-guard`: the watchdog between the sidecar and each `--exec` command, so that a
//! command never outlives the sidecar, even one killed with SIGKILL.
//!
//! A command runs in a process group of its own (a ctrl-c at the terminal must reach the
//! sidecar, which lets commands finish within `--grace`, not the commands). Without a watchdog,
//! a sidecar killed with SIGKILL (the OOM killer, `kill -9`, a container runtime past its stop
//! timeout) would leave its commands running: they would finish their effects unrecorded, and
//! once the lease ended the restarted sidecar would run them again. `PR_SET_PDEATHSIG` needs
//! `unsafe` and only reaches the direct child, not what a `sh -c` starts.
//!
//! So the sidecar runs, per command, its own executable as this hidden subcommand, as the
//! leader of a new process group, with one end of a socket pair as its stdin (the *control*
//! socket) and the command's stdout (a pipe to the sidecar, or the sidecar's own stdout) as its
//! stdout. The guard:
//!
//! 1. reads the payload (`--payload-bytes` long) from the control socket; if the socket ends
//!    first, the sidecar is gone and nothing runs;
//! 2. starts the command in its own process group (the guard's), the payload on a pipe to its
//!    stdin, the stdout handed over (the guard keeps no copy, so the sidecar sees the end of
//!    the output when the command and whatever it started have closed it) and stderr inherited;
//! 3. writes `status <raw wait status>` (or `error <text>` if the command cannot start) back on
//!    the control socket when the command exits;
//! 4. reads the control socket until it ends, then kills its whole process group (SIGKILL),
//!    itself included.
//!
//! The control socket ends when the sidecar closes it (the command's work is over: its
//! leftovers must go) or when the sidecar dies, for any reason: the kernel closes the sidecar's
//! end with the process. Either way every process of the command's group dies with the guard.
//! Only a process that leaves the group on purpose (`setsid`, `setpgid`) escapes.
//!
//! While the guard lives (until the sidecar has read the command's status and output), the
//! group's id cannot be reused, so the sidecar can kill the group at any time (timeout, grace
//! over) without hitting an unrelated process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, Stdio};

/// The hidden subcommand's name.
pub(crate) const SUBCOMMAND: &str = "__exec-guard";

/// `idem __exec-guard --payload-bytes N -- PROGRAM [ARGS…]` (started by `idem consume` only).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Bytes of payload to read from stdin before starting the command.
    #[arg(long, value_name = "N")]
    payload_bytes: u64,
    /// The program (a path) and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_parser = clap::value_parser!(OsString)
    )]
    command: Vec<OsString>,
}

/// Runs the guard; returns only if it could not do its job (the normal end is a SIGKILL of its
/// own process group).
pub(crate) fn run(args: Args) -> ExitCode {
    match guard(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem consume: the command's watchdog failed: {e}");
            ExitCode::from(125)
        }
    }
}

fn guard(args: &Args) -> io::Result<()> {
    use rustix::process::{Signal, getpgrp, getpid, kill_current_process_group, setpgid};
    // The sidecar starts the guard as a group leader; run by hand, it must not kill the
    // group of whoever started it.
    if getpgrp() != getpid() {
        setpgid(None, None)?;
    }
    let mut control = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut payload = Vec::new();
    (&mut control)
        .take(args.payload_bytes)
        .read_to_end(&mut payload)?;
    if payload.len() as u64 != args.payload_bytes {
        // The sidecar died before it sent the whole payload: run nothing.
        return Ok(());
    }
    let report = control.try_clone()?;
    // The command gets the stdout; the guard must not hold it, or the sidecar would wait for
    // the guard to end before it saw the end of the output.
    let stdout = io::stdout().as_fd().try_clone_to_owned()?;
    rustix::stdio::dup2_stdout(File::open("/dev/null")?)?;
    let (program, program_args) = args
        .command
        .split_first()
        .ok_or_else(|| io::Error::other("no command"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(program_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::inherit());
    let spawned = cmd.spawn();
    // Closes the guard's copy of the stdout.
    drop(cmd);
    match spawned {
        Ok(mut child) => {
            let stdin = child.stdin.take();
            std::thread::spawn(move || feed(stdin, &payload));
            std::thread::spawn(move || {
                let line = match child.wait() {
                    Ok(status) => format!("status {}\n", status.into_raw()),
                    Err(e) => format!("error waiting for the command: {e}\n"),
                };
                // A failed write means the sidecar is gone: the main thread sees it too.
                let _ = (&report).write_all(line.as_bytes());
            });
        }
        Err(e) => {
            let line = format!("error {}\n", e.to_string().replace('\n', " "));
            let _ = (&report).write_all(line.as_bytes());
        }
    }
    // Nothing more comes from the sidecar: this returns at the end of the socket (closed by
    // the sidecar, or by the kernel when the sidecar died), or on an error reading it.
    let mut rest = [0u8; 64];
    loop {
        match control.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    kill_current_process_group(Signal::KILL)?;
    Ok(())
}

/// Writes the payload to the command's stdin and closes it. A command need not read its stdin.
fn feed(stdin: Option<std::process::ChildStdin>, payload: &[u8]) {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(payload);
    }
}
