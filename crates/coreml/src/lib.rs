//! sdrs-coreml: Apple Core ML packages for sdrs.
//!
//! On every OS: `.mlpackage` folders read and written ([`package`], [`blob`], [`value`]), their
//! MIL program walked ([`program`]) and every compressed constant form coremltools writes
//! materialised ([`decode`]); a program split into chunks as coremltools' `bisect_model` splits
//! it ([`chunk`]).

pub mod blob;
pub mod chunk;
pub mod decode;
pub mod error;
pub mod package;
pub mod program;
pub mod value;

pub use error::{Error, Result};
pub use package::{MlPackage, PackageWriter};
