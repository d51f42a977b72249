//! `coreml/`: Apple's Core ML packages made from the tiny fixture models with coremltools 9.0.
//! `coreml_decode:<package>:<weight>`: every compressed constant recorded in
//! `compressed/<package>.decoded.safetensors` materialises bit for bit as coremltools
//! materialised it (the case's difference is the number of differing values).

use std::path::Path;

use sdrs_coreml::program::{const_producers, main_block};
use sdrs_coreml::value::Values;
use sdrs_coreml::{decode, MlPackage};
use sdrs_pipeline::{Error, Result};

use super::{ExtendedFixtures, Runner};
use crate::tolerances::CaseKind;

/// A Core ML error as the parity runner's error, naming the fixture.
fn coreml_error(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidParameter {
        name: "coreml fixture",
        value: what.display().to_string(),
        expected: format!("a package sdrs-coreml reads ({e})"),
    }
}

impl Runner<'_> {
    /// Every case of the extended set `coreml/` (reported missing as the other sets are).
    pub(super) fn coreml_cases(&mut self, extended: &ExtendedFixtures) -> Result<()> {
        let Some(dir) = self.extended_set(extended, "coreml/compressed", CaseKind::BitExact) else {
            return Ok(());
        };
        self.coreml_decode_cases(&dir)
    }

    fn coreml_decode_cases(&mut self, dir: &Path) -> Result<()> {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".decoded.safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            self.push(super::CaseResult {
                name: "coreml_decode".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: super::Outcome::Fail(Some(format!(
                    "{} has no *.decoded.safetensors",
                    dir.display()
                ))),
            });
        }
        for file in files {
            let stem = file.trim_end_matches(".decoded.safetensors").to_string();
            let package = dir.join(format!("{stem}.mlpackage"));
            let reference = dir.join(&file);
            let names = match reference_names(&reference) {
                Ok(n) => n,
                Err(e) => {
                    self.case(format!("coreml_decode:{stem}"), CaseKind::BitExact, |_| {
                        Err(e)
                    });
                    continue;
                }
            };
            let opened = MlPackage::open(&package).map_err(|e| coreml_error(&package, e));
            let pkg = match opened {
                Ok(p) => p,
                Err(e) => {
                    self.case(format!("coreml_decode:{stem}"), CaseKind::BitExact, |_| {
                        Err(e)
                    });
                    continue;
                }
            };
            for name in names {
                self.case(
                    format!("coreml_decode:{stem}:{name}"),
                    CaseKind::BitExact,
                    |_| decode_diff(&pkg, &reference, &name),
                );
            }
        }
        Ok(())
    }
}

fn reference_names(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| coreml_error(path, e))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    Ok(names)
}

/// The number of values of `name` that differ from coremltools' (a shape or dtype mismatch is
/// an error).
fn decode_diff(pkg: &MlPackage, reference: &Path, name: &str) -> Result<f64> {
    let bytes = std::fs::read(reference).map_err(|source| Error::Io {
        path: reference.to_path_buf(),
        source,
    })?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| coreml_error(reference, e))?;
    let want = st.tensor(name).map_err(|e| coreml_error(reference, e))?;
    let program = pkg.program().map_err(|e| coreml_error(&pkg.path, e))?;
    let (_, _, block) = main_block(program).map_err(|e| coreml_error(&pkg.path, e))?;
    let op = block
        .operations
        .iter()
        .find(|op| decode::is_constexpr(op) && op.outputs.iter().any(|o| o.name == name))
        .ok_or_else(|| Error::InvalidParameter {
            name: "coreml weight",
            value: name.to_string(),
            expected: format!("a constexpr op of {}", pkg.path.display()),
        })?;
    let got = decode::materialize(op, &const_producers(block), pkg.weights.as_ref())
        .map_err(|e| coreml_error(&pkg.path, e))?;
    if got.shape != want.shape() {
        return Err(Error::InvalidParameter {
            name: "coreml decoded shape",
            value: format!("{name}: {:?}", got.shape),
            expected: format!("{:?} as coremltools materialises it", want.shape()),
        });
    }
    let ours: Vec<u16> = match (&got.values, want.dtype()) {
        (Values::F16(v), safetensors::Dtype::F16) => v.iter().map(|x| x.to_bits()).collect(),
        (_, dtype) => {
            return Err(Error::InvalidParameter {
                name: "coreml decoded dtype",
                value: format!("{name}: {}", sdrs_coreml::value::dtype_name(got.dtype)),
                expected: format!("{dtype:?} as coremltools materialises it"),
            })
        }
    };
    let theirs = want
        .data()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    Ok(ours.iter().zip(theirs).filter(|(a, b)| **a != *b).count() as f64)
}
