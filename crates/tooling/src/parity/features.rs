//! `features/`: the reference cases of the features users expect from a Stable Diffusion tool
//! (LoRA, textual inversion, AUTOMATIC1111 prompt weighting, inpainting, tiled VAE), each feature's
//! cases in its own module of `parity/`.

use super::{ExtendedFixtures, Runner};
use crate::tolerances::CaseKind;
use sdrs_pipeline::Result;

impl Runner<'_> {
    /// Every case of the extended set `features/` (reported missing as the other sets are).
    pub(super) fn feature_cases(&mut self, extended: &ExtendedFixtures) -> Result<()> {
        let Some(dir) = self.extended_set(extended, "features", CaseKind::Pipeline) else {
            return Ok(());
        };
        self.inpainting_cases(&dir)?;
        self.tiled_vae_cases(&dir)?;
        self.lora_cases(&dir)?;
        self.textual_inversion_cases(&dir)?;
        self.prompt_weighting_cases(&dir)?;
        Ok(())
    }
}
