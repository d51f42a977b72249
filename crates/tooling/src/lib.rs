//! Developer tooling for sdrs, kept out of the production crates: the parity runner behind
//! `sdrs parity` (every reference case of a fixtures folder against what sdrs computes), the one
//! table of parity tolerances it and the parity tests judge by, and the FLOP counts `sdrs bench`
//! turns measured times into GFLOP/s with, and a span recorder for the tests of tracing spans.

pub mod flops;
pub mod parity;
pub mod spans;
pub mod tolerances;
