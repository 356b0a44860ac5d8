//! Credentials out of URLs, for every message and log line that names a server.

/// Query parameters whose values are secrets (`postgres://h/db?password=…`).
const SECRET_PARAMS: [&str; 6] = ["password", "pass", "passwd", "pwd", "secret", "token"];

/// `url` with its credentials replaced by `***`, for error messages and logs.
///
/// Hides the password of the user info (also when it holds a raw `/`, `?` or `#`, which a
/// URL parser would cut at), a user info without a password on `redis://` URLs (where a lone
/// one is the password), and the values of `password`-like query parameters. Text that is not
/// a URL is returned as it is unless it holds an `@`, when it is hidden whole.
///
/// ```
/// use idem::redact_url;
/// assert_eq!(redact_url("postgres://app:s3c/ret@db:5432/orders"), "postgres://app:***@db:5432/orders");
/// assert_eq!(redact_url("postgres://db/orders?user=app&password=x"), "postgres://db/orders?user=app&password=***");
/// assert_eq!(redact_url("redis://:pw@cache:6379/0"), "redis://:***@cache:6379/0");
/// assert_eq!(redact_url("mysql://root@127.0.0.1/test"), "mysql://root@127.0.0.1/test");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') {
            "<redacted>".to_owned()
        } else {
            url.to_owned()
        };
    };
    // The user info ends at the last `@`: a password may hold any other character.
    let (userinfo, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    out.push_str("://");
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None if scheme.starts_with("redis") => out.push_str("***@"),
            None => {
                out.push_str(info);
                out.push('@');
            }
        }
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _))
                        if SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s)) =>
                    {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn hides_every_form_of_password() {
        let cases = [
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("rediss://u:pw@h/1", "rediss://u:***@h/1"),
            ("redis://pw@h", "redis://***@h"),
            ("redis://h:6379/2", "redis://h:6379/2"),
            (
                "amqp://guest:secret@localhost:5672/%2f",
                "amqp://guest:***@localhost:5672/%2f",
            ),
            (
                "postgres://alice:s3c/ret@db/idem",
                "postgres://alice:***@db/idem",
            ),
            (
                "postgres://alice:a@b?c#d@db/idem",
                "postgres://alice:***@db/idem",
            ),
            (
                "postgres://h/db?password=s3cret&sslmode=off",
                "postgres://h/db?password=***&sslmode=off",
            ),
            (
                "postgres://postgres@127.0.0.1/test",
                "postgres://postgres@127.0.0.1/test",
            ),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("sqlite:idem.db", "sqlite:idem.db"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert!(!redact_url("user:secret@host").contains("secret"));
    }
}
