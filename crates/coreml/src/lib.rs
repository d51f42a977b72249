//! sdrs-coreml: Apple Core ML packages for sdrs.
//!
//! On every OS: `.mlpackage` folders read and written ([`package`], [`blob`], [`value`]), their
//! MIL program walked ([`program`]) and every compressed constant form coremltools writes
//! materialised ([`decode`]); models and resources folders described ([`inspect`]); a program
//! split into chunks as coremltools' `bisect_model` splits it ([`chunk`]); weights palettized or
//! linearly quantized as coremltools' `optimize.coreml` does it ([`palettize`]).

pub mod blob;
pub mod chunk;
pub mod decode;
pub mod error;
pub mod inspect;
pub mod package;
pub mod palettize;
pub mod program;
pub mod runtime;
pub mod value;

pub use error::{Error, Result};
pub use package::{MlPackage, PackageWriter};
