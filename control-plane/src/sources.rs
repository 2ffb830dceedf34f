//! Where the controller learns about the platform. Every source produces the same typed
//! [`Object`]s, so everything after a source (index, translation, discovery) is one code path.
//!
//! - [`files`]: local mode, a folder of multi-document YAML, hot-reloaded.

pub mod files;
pub mod kubernetes;
mod parse;

pub use parse::{ParseError, Parsed, parse_documents};

// NOTE: the objects live in `crate::model` (sources, CRD types and index all use them).
pub use crate::model::*;
