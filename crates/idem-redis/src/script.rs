//! The Lua scripts (one per transition, in `lua/`), and how they are sent: `EVALSHA` alone or
//! pipelined, with the script loaded again when the server answers `NOSCRIPT` (after a restart,
//! a failover or a `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, Script, ServerErrorKind, Value};

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("../lua/prelude.lua"),
            include_str!(concat!("../lua/", $file))
        ))
    };
}

/// Every script, hashed once per process.
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
    pub(crate) extend: Script,
    pub(crate) fail: Script,
    pub(crate) purge: Script,
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim: script!("claim.lua"),
    complete: script!("complete.lua"),
    release: script!("release.lua"),
    extend: script!("extend.lua"),
    fail: script!("fail.lua"),
    purge: script!("purge.lua"),
});

/// `EVALSHA <script> 1 <key>`: the caller appends the script's arguments.
pub(crate) fn evalsha(script: &Script, key: &str) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(1).arg(key);
    cmd
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

/// Sends one script call; on `NOSCRIPT` (the script did not run), loads it and sends it again.
pub(crate) async fn eval(
    conn: &mut (impl ConnectionLike + Send),
    script: &Script,
    cmd: &Cmd,
) -> Result<Value, RedisError> {
    let value = conn.req_packed_command(cmd).await?;
    if !is_noscript(&value) {
        return Ok(value);
    }
    script.load_async(conn).await?;
    conn.req_packed_command(cmd).await
}

/// Sends a pipeline of calls of one script in one round trip; the replies come back in order,
/// server errors included. Calls answered with `NOSCRIPT` did not run: the script is loaded and
/// they are sent again, in their order.
///
/// With `wait` (a `WAIT` command), the pipeline ends with it, after every call; when calls are
/// sent again, so is the `WAIT`, after them. Its reply (the replicas that acknowledged every
/// write of the connection so far) is returned beside the calls' replies.
///
/// Redis runs a pipeline's commands in order but not atomically, so when the script vanishes and
/// another client loads it again while this pipeline runs, a later call may have run before an
/// earlier one that is retried. Calls on different keys are independent, and for two calls on
/// the same key this is the same as another consumer's call running in between: every answer
/// is still true of the record.
pub(crate) async fn eval_pipeline(
    conn: &mut (impl ConnectionLike + Send),
    script: &Script,
    pipe: &Pipeline,
    wait: Option<&Cmd>,
) -> Result<(Vec<Value>, Option<Value>), RedisError> {
    let mut values = match wait {
        None => conn.req_packed_commands(pipe, 0, pipe.len()).await?,
        Some(wait) => {
            let mut with_wait = pipe.clone();
            with_wait.add_command(wait.clone());
            conn.req_packed_commands(&with_wait, 0, with_wait.len())
                .await?
        }
    };
    let mut waited = wait.and_then(|_| values.pop());
    let missing: Vec<usize> = (0..values.len())
        .filter(|&i| is_noscript(&values[i]))
        .collect();
    if missing.is_empty() {
        return Ok((values, waited));
    }
    script.load_async(conn).await?;
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let mut retry = redis::pipe();
    for &i in &missing {
        retry.add_command(cmds[i].clone());
    }
    if let Some(wait) = wait {
        retry.add_command(wait.clone());
    }
    let mut again = conn.req_packed_commands(&retry, 0, retry.len()).await?;
    if wait.is_some() {
        waited = again.pop();
    }
    for (i, v) in missing.into_iter().zip(again) {
        values[i] = v;
    }
    Ok((values, waited))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_carry_the_prelude() {
        for s in [
            &SCRIPTS.claim,
            &SCRIPTS.complete,
            &SCRIPTS.release,
            &SCRIPTS.extend,
            &SCRIPTS.fail,
            &SCRIPTS.purge,
        ] {
            assert_eq!(s.get_hash().len(), 40);
        }
        let hashes: std::collections::HashSet<_> = [
            SCRIPTS.claim.get_hash(),
            SCRIPTS.complete.get_hash(),
            SCRIPTS.release.get_hash(),
            SCRIPTS.extend.get_hash(),
            SCRIPTS.fail.get_hash(),
            SCRIPTS.purge.get_hash(),
        ]
        .into_iter()
        .collect();
        assert_eq!(hashes.len(), 6, "every script is distinct");
    }
}
