//! [`Table`]: the outbox table's name, checked once so that it can be spliced into SQL.

use crate::error::{OutboxError, OutboxErrorKind, err};

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_outbox";

/// The name of an outbox table: `name` or (PostgreSQL, MySQL) `schema.name`, each part
/// 1 to 48 ASCII letters, digits or underscores, not starting with a digit. Checked at
/// construction, so it is safe to splice into statements.
///
/// ```
/// use idem_outbox::Table;
/// assert_eq!(Table::new("app.outbox").unwrap().name(), "outbox");
/// assert!(Table::new("outbox; drop table x").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Table {
    schema: Option<String>,
    name: String,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            schema: None,
            name: DEFAULT_TABLE.to_owned(),
        }
    }
}

fn ident(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 48
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !part.as_bytes()[0].is_ascii_digit()
}

impl Table {
    /// Checks `name` (`table` or `schema.table`).
    ///
    /// # Errors
    /// [`OutboxErrorKind::Config`] when a part is empty, too long or has other characters.
    pub fn new(name: &str) -> Result<Self, OutboxError> {
        let (schema, table) = match name.split_once('.') {
            Some((s, t)) => (Some(s), t),
            None => (None, name),
        };
        if !ident(table) || schema.is_some_and(|s| !ident(s)) {
            return Err(err(
                OutboxErrorKind::Config,
                format!(
                    "bad outbox table name {name:?}: want `name` or `schema.name`, each 1 to 48 ASCII letters, digits or underscores"
                ),
            ));
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: table.to_owned(),
        })
    }

    /// The table name without its schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// `"schema"."name"` (PostgreSQL, SQLite).
    pub(crate) fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// `` `schema`.`name` `` (MySQL).
    pub(crate) fn backticked(&self) -> String {
        match &self.schema {
            Some(s) => format!("`{s}`.`{}`", self.name),
            None => format!("`{}`", self.name),
        }
    }

    /// A name derived from the table for its indexes, trigger and function: `name_suffix`.
    pub(crate) fn derived(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.name)
    }

    /// The PostgreSQL LISTEN/NOTIFY channel of this table.
    pub fn channel(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}_{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}
