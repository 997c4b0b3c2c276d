//! The Calico selector language (being written; see issue 5).

use std::collections::BTreeMap;

/// An endpoint's or namespace's labels.
pub type Labels = BTreeMap<String, String>;

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        Ok(Self(s.to_owned()))
    }

    pub fn all() -> Self {
        Self("all()".to_owned())
    }

    pub fn matches(&self, _labels: &Labels) -> bool {
        false
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
