//! End-to-end tests of the `sdrs` binary against the reference fixtures in `tests/fixtures`.

mod bad_input;
mod batch;
mod bench;
mod embeddings;
mod generate;
mod hostile;
mod hub;
mod inpaint;
mod lora;
mod parity;
mod prompt_syntax;
mod quantize;
mod roundtrip;
mod serve;
mod trace;
mod util;
mod vae_tiling;
