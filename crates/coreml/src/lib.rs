//! sdrs-coreml: Apple Core ML packages for sdrs.
//!
//! On every OS: `.mlpackage` folders read and written ([`package`], [`blob`], [`value`]), their
//! MIL program walked ([`program`]) and every compressed constant form coremltools writes
//! materialised ([`decode`]).

pub mod blob;
pub mod decode;
pub mod error;
pub mod package;
pub mod program;
pub mod runtime;
pub mod value;

pub use error::{Error, Result};
pub use package::{MlPackage, PackageWriter};
