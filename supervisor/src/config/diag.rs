//! Config errors that point at the mistake: file, line, column, dotted key,
//! what is wrong, and for a misspelt key or value the nearest valid one.
//!
//! serde reports *what* failed (and, through `serde_path_to_error`, *where in
//! the tree*); toml reports the byte span. This module joins the two.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

/// One located config mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted path of the offending key, e.g. `server.listen`.
    pub key: Option<String>,
    pub message: String,
    /// The nearest valid key or value, for a typo.
    pub suggestion: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, "; did you mean `{suggestion}`?")?;
        }
        Ok(())
    }
}

impl Diagnostic {
    /// A diagnostic at byte offset `offset` of `text`.
    pub fn at(
        file: &Path,
        text: &str,
        offset: usize,
        key: Option<String>,
        message: String,
    ) -> Self {
        let (line, column) = line_column(text, offset);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            key,
            message,
            suggestion: None,
        }
    }
}

/// Deserializes `text` (read from `file`) into `T`, turning any failure into
/// a located [`ConfigError::Invalid`].
pub(crate) fn deserialize<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let invalid = |d: Diagnostic| ConfigError::Invalid(Box::new(d));
    let deserializer = toml::Deserializer::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        invalid(Diagnostic::at(
            file,
            text,
            offset,
            None,
            e.message().to_string(),
        ))
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        // A `Spanned` field adds a segment of toml's own to the path.
        let path = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "")
            .replace("$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        let offset = inner.span().map_or(0, |s| s.start);
        let key = (!path.is_empty() && path != ".").then_some(path);
        invalid(explain(
            Diagnostic::at(file, text, offset, key, String::new()),
            inner.message(),
        ))
    })
}

/// Rewrites serde's messages into ours, adding a suggestion where serde
/// listed the valid names.
fn explain(mut d: Diagnostic, message: &str) -> Diagnostic {
    if let Some((given, expected)) = parse_unknown(message, "unknown field `") {
        d.suggestion = nearest(&given, &expected);
        d.message = if expected.is_empty() {
            "unknown key; this table takes no keys".to_string()
        } else {
            format!("unknown key; valid keys here: {}", expected.join(", "))
        };
    } else if let Some((given, expected)) = parse_unknown(message, "unknown variant `") {
        d.suggestion = nearest(&given, &expected);
        d.message = format!(
            "unknown value `{given}`; expected one of: {}",
            expected.join(", ")
        );
    } else {
        d.message = message.to_string();
    }
    d
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into the
/// given name and the expected names.
fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (given, tail) = rest.split_once('`')?;
    let expected = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((given.to_string(), expected))
}

/// The candidate most similar to `given`, if any is similar enough to be a
/// likely typo (the same measure and threshold clap uses).
fn nearest(given: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro(given, c), c))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.clone())
}

/// 1-based line and character column of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}
