//! Start-up errors as one line that names the problem: "authentication failed for user
//! \"app\"", "the directory /var/lib/idem does not exist", not the driver's text three times.
//!
//! idem's errors ([`idem::StoreError`], [`idem_broker::BrokerError`]) already hold their
//! driver's text in their message, and keep the driver's error as their source: printing the
//! whole chain repeats it once per level.

use std::io;
use std::path::Path;

use crate::store_url::{OpenOptions, Opened, StoreUrl};

/// `e` and its sources as one line, each said once: a source is left out when its text, or
/// the last part of it (`db error: FATAL: role "x" does not exist` after a message that ends
/// with `role "x" does not exist (SQLSTATE 28000)`), is already there. idem's own errors are
/// taken without their kind (`store unavailable: `), which the line's start says better.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for link in e.chain() {
        let part = if let Some(e) = link.downcast_ref::<idem::StoreError>() {
            e.message().to_owned()
        } else if let Some(e) = link.downcast_ref::<idem_broker::BrokerError>() {
            e.message().to_owned()
        } else {
            link.to_string()
        };
        let part = part.trim();
        let tail = part.rsplit(": ").next().unwrap_or(part).trim();
        let said = text.contains(part) || (tail.len() >= 8 && text.contains(tail));
        if !part.is_empty() && !said {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(part);
        }
    }
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// Opens the store, and checks that a MySQL store answers and has its table: its pool connects
/// on first use, and a wrong password or a missing table would otherwise fail every message
/// (fail closed) instead of the start.
///
/// # Errors
/// One line naming the store and the problem.
pub(crate) async fn open_store(url: &StoreUrl, opts: OpenOptions) -> anyhow::Result<Opened> {
    let opened = url.open(opts).await.map_err(|e| {
        let text = cannot_open(url, &e);
        // A SQLite file is no server to wait for: a path that cannot be opened is a mistake.
        if matches!(url, StoreUrl::Sqlite(_)) {
            anyhow::Error::msg(text)
        } else {
            crate::exit::one_line_error(&e, text)
        }
    })?;
    if let Opened::Mysql(store) = &opened
        && let Err(e) = store.check_schema().await
    {
        let e = anyhow::Error::new(e);
        return Err(crate::exit::one_line_error(&e, cannot_open(url, &e)));
    }
    Ok(opened)
}

/// Why `url` could not be opened, as one line.
fn cannot_open(url: &StoreUrl, e: &anyhow::Error) -> String {
    match url {
        StoreUrl::Sqlite(path) => format!(
            "cannot open the SQLite file {}: {}",
            path.display(),
            sqlite_problem(path, e)
        ),
        _ => format!("cannot open the store {url}: {}", server_problem(url, e)),
    }
}

/// What keeps a SQLite file from opening. SQLite itself only says "unable to open database
/// file"; the file system says why.
fn sqlite_problem(path: &Path, e: &anyhow::Error) -> String {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.is_dir() {
        return "it is a directory".to_owned();
    }
    match dir.metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return format!("the directory {} does not exist", dir.display());
        }
        Err(e) => return format!("{}: {e}", dir.display()),
        Ok(m) if !m.is_dir() => return format!("{} is not a directory", dir.display()),
        Ok(_) => {}
    }
    use rustix::fs::{Access, access};
    if path.exists() {
        if let Err(e) = access(path, Access::READ_OK | Access::WRITE_OK) {
            return format!("cannot read and write it: {}", io::Error::from(e));
        }
    } else if let Err(e) = access(dir, Access::WRITE_OK | Access::EXEC_OK) {
        return format!(
            "cannot create it in {}: {}",
            dir.display(),
            io::Error::from(e)
        );
    }
    // SQLite's own reason, without the URL and the path the line already names.
    let text = one_line(e);
    if text.contains("file is not a database") {
        return "it is not a SQLite database (SQLite: file is not a database)".to_owned();
    }
    let shown = path.display().to_string();
    let text = text
        .strip_prefix(&format!("opening sqlite:{shown}: "))
        .unwrap_or(&text);
    text.replace(&format!("SQLite database {shown}: "), "")
        .replace(&format!(": {shown}"), "")
}

/// What keeps a networked store from opening: the user, the database, the host, named.
fn server_problem(url: &StoreUrl, e: &anyhow::Error) -> String {
    let parsed = match url {
        StoreUrl::Mysql(u) | StoreUrl::Postgres(u) | StoreUrl::Redis(u) => url::Url::parse(u).ok(),
        _ => None,
    };
    let user = parsed
        .as_ref()
        .map(|u| u.username().to_owned())
        .filter(|u| !u.is_empty());
    let database = parsed
        .as_ref()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .filter(|d| !d.is_empty());
    let host = parsed.as_ref().and_then(|u| {
        let port = u.port().or(match url {
            StoreUrl::Mysql(_) => Some(3306),
            StoreUrl::Postgres(_) => Some(5432),
            StoreUrl::Redis(_) => Some(6379),
            _ => None,
        })?;
        Some(format!("{}:{port}", u.host_str()?))
    });
    let quoted = |s: &Option<String>| s.as_deref().map(|s| format!("{s:?}")).unwrap_or_default();
    if let Some(mysql_async::Error::Server(s)) = e
        .chain()
        .find_map(|c| c.downcast_ref::<mysql_async::Error>())
    {
        let said = format!("MySQL error {}: {}", s.code, s.message);
        return match s.code {
            1045 => format!("authentication failed for user {} ({said})", quoted(&user)),
            1049 => format!("unknown database {} ({said})", quoted(&database)),
            1044 => format!(
                "user {} may not use database {} ({said})",
                quoted(&user),
                quoted(&database)
            ),
            1146 => format!("{said}; create the table with `idem migrate --store {url}`"),
            _ => said,
        };
    }
    if let Some(db) = e
        .chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .and_then(tokio_postgres::Error::as_db_error)
    {
        use tokio_postgres::error::SqlState;
        let said = format!("PostgreSQL: {} ({})", db.message(), db.code().code());
        return match db.code() {
            c if *c == SqlState::INVALID_PASSWORD => {
                format!("authentication failed for user {} ({said})", quoted(&user))
            }
            c if *c == SqlState::INVALID_CATALOG_NAME => {
                format!("unknown database {} ({said})", quoted(&database))
            }
            _ => said,
        };
    }
    if let Some(io) = e
        .chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .last()
    {
        let host = host.unwrap_or_else(|| "the server".to_owned());
        let text = io.to_string();
        return if text.contains("failed to lookup address") {
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            format!("cannot resolve host {name:?}: {text}")
        } else {
            format!("cannot connect to {host}: {text}")
        };
    }
    let mut text = one_line(e);
    // The contexts name the URL the line already starts with.
    for context in ["opening", "connecting to", "connect to"] {
        if let Some(rest) = text.strip_prefix(&format!("{context} {url}: ")) {
            text = rest.to_owned();
        }
    }
    match e.chain().find_map(|c| c.downcast_ref::<idem::StoreError>()) {
        Some(s) if s.kind() == idem::StoreErrorKind::Schema => {
            // The library's advice, in this command's terms.
            let advice = ["; create it with", ": create or upgrade it with"]
                .iter()
                .filter_map(|a| text.find(a))
                .min()
                .unwrap_or(text.len());
            text.truncate(advice);
            format!("{text}: create or upgrade it with `idem migrate --store {url}`")
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_drops_repeated_sources() {
        let inner = io::Error::other("ERROR 1045 (28000): Access denied");
        let e = anyhow::Error::new(inner)
            .context("Server error: `ERROR 1045 (28000): Access denied'")
            .context("opening mysql://root:***@h/test");
        assert_eq!(
            one_line(&e),
            "opening mysql://root:***@h/test: Server error: `ERROR 1045 (28000): Access denied'"
        );
        let store = idem::StoreError::new(
            idem::StoreErrorKind::Config,
            "connect: role \"x\" does not exist (SQLSTATE 28000)",
        )
        .with_source(io::Error::other(
            "db error: FATAL: role \"x\" does not exist",
        ));
        let e = anyhow::Error::new(store).context("opening x");
        assert_eq!(
            one_line(&e),
            "opening x: connect: role \"x\" does not exist (SQLSTATE 28000)"
        );
        let store = idem::StoreError::new(idem::StoreErrorKind::Unavailable, "unreachable")
            .with_source(io::Error::other("Connection refused (os error 111)"));
        assert_eq!(
            one_line(&anyhow::Error::new(store)),
            "unreachable: Connection refused (os error 111)"
        );
    }

    #[test]
    fn sqlite_problems_are_named() {
        let e = anyhow::anyhow!("unable to open database file");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("no/such/dir/idem.db");
        assert_eq!(
            sqlite_problem(&missing, &e),
            format!(
                "the directory {} does not exist",
                dir.path().join("no/such/dir").display()
            )
        );
        assert_eq!(sqlite_problem(dir.path(), &e), "it is a directory");
    }
}
