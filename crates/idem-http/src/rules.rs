//! Which requests the layer handles: rules of method + path pattern, each saying whether an
//! `Idempotency-Key` is required, optional, or ignored.
//!
//! The text form, used by `idem proxy --rule` and [`Rule::from_str`]:
//!
//! ```text
//! METHODS:PATTERN[=required|optional|off]
//! POST:/orders/*=required
//! POST,PUT,PATCH:/payments/**=optional
//! *:/health=off
//! ```
//!
//! `METHODS` is `*` (any method) or a comma-separated list. `PATTERN` is a path starting with
//! `/` whose segments are literals, `*` (exactly one segment) or, last, `**` (any number of
//! segments, none included). The requirement defaults to `required`. The first matching rule
//! decides; a request that no rule matches passes through untouched.

use std::fmt;
use std::str::FromStr;

use http::Method;

/// What a rule asks of a request's `Idempotency-Key`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Requirement {
    /// A request without a key is refused with 400.
    Required,
    /// A key is honoured when present; a request without one passes through.
    Optional,
    /// The layer ignores these requests (also with a key): they pass through.
    Off,
}

impl Requirement {
    fn as_str(self) -> &'static str {
        match self {
            Requirement::Required => "required",
            Requirement::Optional => "optional",
            Requirement::Off => "off",
        }
    }
}

/// Why a rule's text could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rule {rule:?}: {reason} (expected METHODS:PATTERN[=required|optional|off], e.g. POST:/orders/*=required)"
)]
pub struct RuleError {
    rule: String,
    reason: String,
}

impl RuleError {
    fn new(rule: &str, reason: impl Into<String>) -> Self {
        Self {
            rule: rule.to_owned(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A path pattern: literal segments, `*` for one segment, and a final `**` for the rest.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Parses a pattern such as `/orders/*/refunds` or `/api/**`.
    ///
    /// # Errors
    /// A description when the pattern does not start with `/`, or `**` is not last.
    pub fn new(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("the path pattern {text:?} does not start with '/'"));
        };
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err("'**' may only be the last segment".to_owned()),
                "*" => Segment::One,
                p if p.contains('*') => {
                    return Err(format!(
                        "segment {p:?} mixes '*' with text; use a whole '*' segment"
                    ));
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    /// Whether `path` (without its query) matches.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path);
        let mut parts = if path.is_empty() {
            None
        } else {
            Some(path.split('/'))
        };
        for seg in &self.segments {
            if *seg == Segment::Rest {
                return true;
            }
            let Some(part) = parts.as_mut().and_then(Iterator::next) else {
                return false;
            };
            match seg {
                Segment::Literal(l) if l != part => return false,
                Segment::One if part.is_empty() => return false,
                _ => {}
            }
        }
        parts.is_none_or(|mut p| p.next().is_none())
    }

    /// The pattern as written: it scopes idempotency keys (the "route" of a key).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One rule: methods, a path pattern and a [`Requirement`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Rule {
    methods: Option<Vec<Method>>,
    pattern: PathPattern,
    requirement: Requirement,
}

impl Rule {
    /// A rule for `methods` (empty: any method) on `pattern`.
    ///
    /// # Errors
    /// A [`RuleError`] for an invalid pattern.
    pub fn new(
        methods: impl IntoIterator<Item = Method>,
        pattern: &str,
        requirement: Requirement,
    ) -> Result<Self, RuleError> {
        let methods: Vec<Method> = methods.into_iter().collect();
        Ok(Self {
            methods: (!methods.is_empty()).then_some(methods),
            pattern: PathPattern::new(pattern).map_err(|e| RuleError::new(pattern, e))?,
            requirement,
        })
    }

    /// A key is required for `method` on `pattern`.
    ///
    /// # Errors
    /// A [`RuleError`] for an invalid pattern.
    pub fn required(method: Method, pattern: &str) -> Result<Self, RuleError> {
        Self::new([method], pattern, Requirement::Required)
    }

    /// A key is honoured when present for `method` on `pattern`.
    ///
    /// # Errors
    /// A [`RuleError`] for an invalid pattern.
    pub fn optional(method: Method, pattern: &str) -> Result<Self, RuleError> {
        Self::new([method], pattern, Requirement::Optional)
    }

    /// Whether the rule applies to this method and path.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method)) && self.pattern.matches(path)
    }

    /// The rule's path pattern.
    pub fn pattern(&self) -> &PathPattern {
        &self.pattern
    }

    /// The rule's requirement.
    pub fn requirement(&self) -> Requirement {
        self.requirement
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (methods, rest) = s
            .split_once(':')
            .ok_or_else(|| RuleError::new(s, "no ':' between the methods and the path"))?;
        let (pattern, requirement) = match rest.rsplit_once('=') {
            Some((p, r)) => (
                p,
                match r.trim().to_ascii_lowercase().as_str() {
                    "required" => Requirement::Required,
                    "optional" => Requirement::Optional,
                    "off" => Requirement::Off,
                    other => {
                        return Err(RuleError::new(
                            s,
                            format!("unknown requirement {other:?}; use required, optional or off"),
                        ));
                    }
                },
            ),
            None => (rest, Requirement::Required),
        };
        let methods = match methods.trim() {
            "*" => Vec::new(),
            "" => return Err(RuleError::new(s, "no method; use * for any")),
            list => list
                .split(',')
                .map(|m| {
                    let m = m.trim().to_ascii_uppercase();
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| RuleError::new(s, format!("invalid method {m:?}")))
                })
                .collect::<Result<_, _>>()?,
        };
        Rule::new(methods, pattern.trim(), requirement).map_err(|e| RuleError::new(s, e.reason))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.methods {
            None => f.write_str("*")?,
            Some(m) => {
                let names: Vec<&str> = m.iter().map(Method::as_str).collect();
                f.write_str(&names.join(","))?;
            }
        }
        write!(f, ":{}={}", self.pattern, self.requirement.as_str())
    }
}

/// An ordered list of rules: the first that matches decides.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// No rules: every request passes through.
    pub fn new() -> Self {
        Self::default()
    }

    /// The default when none is configured: `POST,PATCH:/**=optional` (Stripe's model: a key is
    /// honoured on every POST and PATCH that carries one).
    pub fn default_rules() -> Self {
        let mut rules = Self::new();
        rules.push(Rule {
            methods: Some(vec![Method::POST, Method::PATCH]),
            pattern: PathPattern {
                text: "/**".to_owned(),
                segments: vec![Segment::Rest],
            },
            requirement: Requirement::Optional,
        });
        rules
    }

    /// Adds a rule after the existing ones.
    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    /// The first rule matching the request, if any.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(method, path))
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }
}

impl FromIterator<Rule> for Rules {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> Self {
        Self {
            rules: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match() {
        let p = PathPattern::new("/orders/*").unwrap();
        assert!(p.matches("/orders/42"));
        assert!(!p.matches("/orders"));
        assert!(!p.matches("/orders/"));
        assert!(!p.matches("/orders/42/items"));
        let p = PathPattern::new("/api/**").unwrap();
        assert!(p.matches("/api"));
        assert!(p.matches("/api/a/b/c"));
        assert!(!p.matches("/apix"));
        let p = PathPattern::new("/").unwrap();
        assert!(p.matches("/"));
        assert!(!p.matches("/a"));
        let p = PathPattern::new("/orders").unwrap();
        assert!(p.matches("/orders"));
        assert!(!p.matches("/orders/1"));
        assert!(PathPattern::new("orders").is_err());
        assert!(PathPattern::new("/**/x").is_err());
        assert!(PathPattern::new("/a*").is_err());
    }

    #[test]
    fn rules_parse_and_print() {
        let r: Rule = "POST:/orders/*=required".parse().unwrap();
        assert!(r.matches(&Method::POST, "/orders/1"));
        assert!(!r.matches(&Method::PUT, "/orders/1"));
        assert_eq!(r.to_string(), "POST:/orders/*=required");
        let r: Rule = "post, put:/p/**".parse().unwrap();
        assert_eq!(r.requirement(), Requirement::Required);
        assert!(r.matches(&Method::PUT, "/p/x"));
        let r: Rule = "*:/health=OFF".parse().unwrap();
        assert!(r.matches(&Method::GET, "/health"));
        assert_eq!(r.requirement(), Requirement::Off);
        for bad in ["/orders", ":/x", "POST:/x=maybe", "POST:x", "P OST:/x"] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.to_string().contains("invalid rule"), "{e}");
        }
        let rules: Rules = ["*:/health=off", "*:/**=optional"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        assert_eq!(
            rules.find(&Method::GET, "/health").unwrap().requirement(),
            Requirement::Off
        );
        assert_eq!(
            rules.find(&Method::GET, "/x").unwrap().requirement(),
            Requirement::Optional
        );
        let d = Rules::default_rules();
        assert!(d.find(&Method::POST, "/anything/at/all").is_some());
        assert!(d.find(&Method::GET, "/x").is_none());
    }
}
