//! URL arguments whose parse errors never show a password: clap's own error would repeat the
//! value as given, while the libraries' messages name the URL redacted.

use std::marker::PhantomData;

/// A URL type with a parser whose error message is safe to print.
pub(crate) trait RedactedParse: Sized + Clone + Send + Sync + 'static {
    /// Parses `text`; the error names the URL with its password hidden.
    fn parse_redacted(text: &str) -> Result<Self, String>;
}

impl RedactedParse for idem_broker::BrokerUrl {
    fn parse_redacted(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| e.message().to_owned())
    }
}

impl RedactedParse for idem_outbox::DbUrl {
    fn parse_redacted(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| e.message().to_owned())
    }
}

/// The clap value parser of a [`RedactedParse`] URL: `value_parser = UrlParser::<BrokerUrl>::new()`.
pub(crate) struct UrlParser<T>(PhantomData<fn() -> T>);

impl<T> UrlParser<T> {
    pub(crate) const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Clone for UrlParser<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T: RedactedParse> clap::builder::TypedValueParser for UrlParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg.map_or_else(|| "the URL".to_owned(), ToString::to_string);
        let fail = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for {name}: {message}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail("the URL is not UTF-8".to_owned()))?;
        T::parse_redacted(text).map_err(fail)
    }
}
