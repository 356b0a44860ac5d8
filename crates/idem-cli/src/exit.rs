//! The exit status of a command that failed: 69 (`EX_UNAVAILABLE` of sysexits.h) when a server
//! it needs, the store or the broker, could not be reached, so that a supervisor can tell "start
//! me again later" from a mistake that a restart will not fix (1).

use std::fmt;
use std::io;
use std::process::ExitCode;

use idem::StoreErrorKind;
use idem_broker::BrokerErrorKind;

/// The exit status of a command that could not reach a server it needs.
pub(crate) const UNAVAILABLE: u8 = 69;

/// An error already said in one line, that came from a server out of reach: keeps that fact
/// where the error's chain was flattened into its text.
#[derive(Debug)]
pub(crate) struct Unreachable(pub(crate) String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// `text` as an error, marked [`Unreachable`] when `cause` says a server was out of reach.
pub(crate) fn one_line_error(cause: &anyhow::Error, text: String) -> anyhow::Error {
    if unreachable(cause) {
        anyhow::Error::new(Unreachable(text))
    } else {
        anyhow::Error::msg(text)
    }
}

/// Whether `e` says a server could not be reached (refused, reset, timed out, unavailable),
/// rather than refused what it was asked (a password, a schema, a setting).
pub(crate) fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|link| {
        if link.is::<Unreachable>() {
            return true;
        }
        if let Some(s) = link.downcast_ref::<idem::StoreError>() {
            return matches!(
                s.kind(),
                StoreErrorKind::Unavailable | StoreErrorKind::Timeout
            );
        }
        if let Some(o) = link.downcast_ref::<idem_outbox::OutboxError>() {
            return o.kind() == idem_outbox::OutboxErrorKind::Unavailable;
        }
        if let Some(b) = link.downcast_ref::<idem_broker::BrokerError>() {
            return matches!(
                b.kind(),
                BrokerErrorKind::Connection | BrokerErrorKind::Timeout
            );
        }
        link.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable
            )
        })
    })
}

/// The exit status for a command that failed with `e`.
pub(crate) fn status(e: &anyhow::Error) -> ExitCode {
    if unreachable(e) {
        ExitCode::from(UNAVAILABLE)
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_out_of_reach_are_told_apart() {
        let refused = anyhow::Error::new(io::Error::from(io::ErrorKind::ConnectionRefused))
            .context("cannot connect to amqp://127.0.0.1:1");
        assert!(unreachable(&refused));
        let down = anyhow::Error::new(idem::StoreError::unavailable("no answer"));
        assert!(unreachable(&down));
        let broker = anyhow::Error::new(idem_broker::BrokerError::new(
            BrokerErrorKind::Connection,
            "connection refused",
        ));
        assert!(unreachable(&broker));
        let flattened = one_line_error(&refused, "cannot connect to 127.0.0.1:1".into());
        assert!(unreachable(&flattened));
        let config = anyhow::Error::new(idem::StoreError::new(
            StoreErrorKind::Config,
            "bad password",
        ));
        assert!(!unreachable(&config));
        assert!(!unreachable(&one_line_error(
            &config,
            "bad password".into()
        )));
        assert!(!unreachable(&anyhow::anyhow!("--batch must be positive")));
    }
}
