//! End-to-end tests of the `sdrs` binary against the reference fixtures in `tests/fixtures`.

mod bad_input;
mod bench;
mod generate;
mod hub;
mod parity;
mod prompt_syntax;
mod quantize;
mod roundtrip;
mod trace;
mod util;
