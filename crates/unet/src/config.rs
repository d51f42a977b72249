//! `UNet2DConditionConfig`: the `unet/config.json` of diffusers' `UNet2DConditionModel` (follows
//! `models/unets/unet_2d_condition.py`, `UNet2DConditionModel.__init__` and `_check_config`).

use std::fmt::Debug;
use std::path::Path;

use serde::Deserialize;

use crate::activations::Activation;
use crate::error::{Error, Result};

/// The most layers (resnets per block, transformer blocks per layer) a config may ask for: SD1.5
/// has 2 and 1, SDXL 2 and 10; a count in the millions can only be a mistake, and would be
/// allocated before any weight is read.
pub const MAX_LAYERS_PER_BLOCK: usize = 100;

/// A config value that is either one value for every block or a list with one per block
/// (`attention_head_dim: 8` or `attention_head_dim: [5, 10, 20, 20]`).
///
/// `Many` is tried first so that a list nested in a list (`transformer_layers_per_block:
/// [1, 2, 10]`) reads as one value per block, not as a single per-layer list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T: Clone + Debug> OneOrMany<T> {
    /// One value per item: the single value repeated, or the list, which must have `count` items.
    pub fn expand(&self, key: &str, count: usize) -> Result<Vec<T>> {
        match self {
            Self::One(value) => Ok(vec![value.clone(); count]),
            Self::Many(values) if values.len() == count => Ok(values.clone()),
            Self::Many(values) => Err(Error::InvalidConfig {
                key: key.to_string(),
                value: format!("{values:?}"),
                expected: format!("one value or a list of {count}"),
            }),
        }
    }

    /// The value for item `index`: the single value, or the list's item (diffusers indexes the
    /// list without checking its length in a few places, e.g. the mid block's transformer depth).
    pub fn at(&self, key: &str, index: usize) -> Result<T> {
        match self {
            Self::One(value) => Ok(value.clone()),
            Self::Many(values) => values
                .get(index)
                .cloned()
                .ok_or_else(|| Error::InvalidConfig {
                    key: key.to_string(),
                    value: format!("{values:?}"),
                    expected: format!("at least {} values", index + 1),
                }),
        }
    }
}

/// The UNet's configuration. Field names and defaults are `UNet2DConditionModel.__init__`'s; keys
/// we do not use (`_class_name`, `_diffusers_version`, ...) are ignored. [`Self::check_supported`]
/// rejects options whose values this implementation cannot reproduce.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent height and width the model was trained at (`null` in diffusers' default).
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Maps the input from `[0, 1]` to `[-1, 1]` before `conv_in`.
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer depth per block, or per block and resnet layer (`[[1, 1], [2, 2], ...]`).
    pub transformer_layers_per_block: OneOrMany<OneOrMany<usize>>,
    /// The up blocks' depths when they are not the down blocks' reversed (asymmetric UNets).
    pub reverse_transformer_layers_per_block: Option<Vec<OneOrMany<usize>>>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the NUMBER OF HEADS for these UNets: see [`Self::num_heads_per_block`].
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub dual_cross_attention: bool,
    /// `proj_in` / `proj_out` of the transformers are linear layers (SD2.x, SDXL), not 1x1 convs.
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    /// `text_time` for SDXL: pooled text embeddings and size/crop time ids are added to the time
    /// embedding.
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(OneOrMany::One(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// The down-block types we implement (after diffusers strips a `UNetRes` prefix).
pub const DOWN_BLOCK_TYPES: &str = "CrossAttnDownBlock2D, DownBlock2D";
/// The up-block types we implement.
pub const UP_BLOCK_TYPES: &str = "CrossAttnUpBlock2D, UpBlock2D";

/// diffusers' `get_down_block` / `get_up_block` accept block names with a `UNetRes` prefix.
pub(crate) fn block_type_name(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

fn unsupported(key: &str, value: impl Debug, accepted: &str) -> Error {
    Error::Unsupported {
        key: key.to_string(),
        value: format!("{value:?}"),
        accepted: accepted.to_string(),
    }
}

impl UNet2DConditionConfig {
    /// Reads a `unet/config.json`. The values are checked by [`Self::check_supported`], which
    /// `UNet2DConditionModel::new` also calls.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // serde reads a struct from a JSON array too (field by field), which would turn a
        // mangled config into a confusing shape mismatch later.
        if !text.trim_start().starts_with('{') {
            return Err(Error::Json {
                path: path.to_path_buf(),
                source: serde::de::Error::custom("the config is not a JSON object ({...})"),
            });
        }
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Number of down (and up) blocks.
    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Rejects every option set to a value this implementation does not reproduce, and list
    /// lengths that do not match the number of blocks (diffusers' `_check_config`).
    pub fn check_supported(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            return Err(Error::InvalidConfig {
                key: "block_out_channels".to_string(),
                value: "[]".to_string(),
                expected: "at least one block".to_string(),
            });
        }
        for (key, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(Error::InvalidConfig {
                    key: key.to_string(),
                    value: format!("{len} blocks"),
                    expected: format!(
                        "as many blocks as block_out_channels {:?}",
                        self.block_out_channels
                    ),
                });
            }
        }
        for name in &self.down_block_types {
            if !matches!(
                block_type_name(name),
                "CrossAttnDownBlock2D" | "DownBlock2D"
            ) {
                return Err(unsupported("down_block_types", name, DOWN_BLOCK_TYPES));
            }
        }
        for name in &self.up_block_types {
            if !matches!(block_type_name(name), "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(unsupported("up_block_types", name, UP_BLOCK_TYPES));
            }
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                return Err(unsupported(
                    "mid_block_type",
                    mid,
                    "\"UNetMidBlock2DCrossAttn\", null",
                ));
            }
        }
        if self
            .only_cross_attention
            .expand("only_cross_attention", n)?
            .contains(&true)
        {
            return Err(unsupported(
                "only_cross_attention",
                &self.only_cross_attention,
                "false",
            ));
        }
        Activation::from_config("act_fn", &self.act_fn)?;
        if self.norm_num_groups.is_none() {
            return Err(unsupported("norm_num_groups", "null", "a number of groups"));
        }
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return Err(unsupported(
                "encoder_hid_dim_type",
                (&self.encoder_hid_dim_type, self.encoder_hid_dim),
                "null (with encoder_hid_dim null)",
            ));
        }
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", true, "false"));
        }
        if let Some(class_embed_type) = &self.class_embed_type {
            return Err(unsupported("class_embed_type", class_embed_type, "null"));
        }
        if let Some(num_class_embeds) = self.num_class_embeds {
            return Err(unsupported("num_class_embeds", num_class_embeds, "null"));
        }
        if self.class_embeddings_concat {
            return Err(unsupported("class_embeddings_concat", true, "false"));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                for (key, value) in [
                    ("addition_time_embed_dim", self.addition_time_embed_dim),
                    (
                        "projection_class_embeddings_input_dim",
                        self.projection_class_embeddings_input_dim,
                    ),
                ] {
                    if value.is_none() {
                        return Err(Error::InvalidConfig {
                            key: key.to_string(),
                            value: "null".to_string(),
                            expected: "a size, as addition_embed_type is \"text_time\"".to_string(),
                        });
                    }
                }
            }
            Some(other) => {
                return Err(unsupported(
                    "addition_embed_type",
                    other,
                    "null, \"text_time\"",
                ))
            }
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "\"default\"",
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "\"positional\"",
            ));
        }
        if let Some(act) = &self.time_embedding_act_fn {
            Activation::from_config("time_embedding_act_fn", act)?;
        }
        if let Some(act) = &self.timestep_post_act {
            Activation::from_config("timestep_post_act", act)?;
        }
        if let Some(dim) = self.time_cond_proj_dim {
            return Err(unsupported("time_cond_proj_dim", dim, "null"));
        }
        if self.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                &self.attention_type,
                "\"default\"",
            ));
        }
        for (key, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            // An even kernel with padding (k - 1) / 2 changes the spatial size.
            if kernel % 2 == 0 {
                return Err(unsupported(key, kernel, "an odd kernel size"));
            }
        }
        let layers = self.layers_per_block.expand("layers_per_block", n)?;
        if let Some(&too_many) = layers.iter().find(|&&l| l > MAX_LAYERS_PER_BLOCK) {
            return Err(Error::InvalidConfig {
                key: "layers_per_block".to_string(),
                value: too_many.to_string(),
                expected: format!("at most {MAX_LAYERS_PER_BLOCK} layers per block"),
            });
        }
        let depths = match &self.transformer_layers_per_block {
            OneOrMany::One(depth) => vec![depth.clone()],
            OneOrMany::Many(per_block) => per_block.clone(),
        };
        let deepest = depths
            .iter()
            .flat_map(|d| match d {
                OneOrMany::One(depth) => vec![*depth],
                OneOrMany::Many(per_layer) => per_layer.clone(),
            })
            .max()
            .unwrap_or(0);
        if deepest > MAX_LAYERS_PER_BLOCK {
            return Err(Error::InvalidConfig {
                key: "transformer_layers_per_block".to_string(),
                value: deepest.to_string(),
                expected: format!("at most {MAX_LAYERS_PER_BLOCK} transformer layers"),
            });
        }
        self.cross_attention_dim.expand("cross_attention_dim", n)?;
        self.attention_head_dim.expand("attention_head_dim", n)?;
        let heads = self.num_heads_per_block()?;
        if let Some(i) = heads.iter().position(|&h| h == 0) {
            return Err(Error::InvalidConfig {
                key: "attention_head_dim".to_string(),
                value: format!("{heads:?}"),
                expected: format!("a non-zero number of heads for block {i}"),
            });
        }
        self.down_transformer_layers()?;
        self.up_transformer_layers()?;
        // `resnet_skip_time_act`, `resnet_out_scale_factor`, `cross_attention_norm`,
        // `mid_block_only_cross_attention` and `addition_embed_type_num_heads` only reach block
        // types we do not build (ResnetDownsampleBlock2D, SimpleCrossAttn*, `text` embeddings):
        // diffusers ignores them for ours, and so do we. `dropout` does nothing at inference.
        Ok(())
    }

    /// The number of attention heads of each down block (the up blocks use it reversed).
    ///
    /// diffusers quirk (huggingface/diffusers#2011): the key `attention_head_dim` of SD1.x, SD2.x
    /// and SDXL configs actually holds the NUMBER OF HEADS; each transformer's head size is its
    /// channel count divided by it. `UNet2DConditionModel.__init__` does
    /// `num_attention_heads = num_attention_heads or attention_head_dim`, and we do the same
    /// here, in this one place. (diffusers itself refuses a non-null `num_attention_heads`; we take
    /// it as the head count it names.)
    pub fn num_heads_per_block(&self) -> Result<Vec<usize>> {
        let n = self.num_blocks();
        match &self.num_attention_heads {
            Some(heads) => heads.expand("num_attention_heads", n),
            None => self.attention_head_dim.expand("attention_head_dim", n),
        }
    }

    /// Per down block, the transformer depth of each of its `layers_per_block` layers.
    pub fn down_transformer_layers(&self) -> Result<Vec<Vec<usize>>> {
        let key = "transformer_layers_per_block";
        let n = self.num_blocks();
        let layers = self.layers_per_block.expand("layers_per_block", n)?;
        let per_block = self.transformer_layers_per_block.expand(key, n)?;
        per_block
            .iter()
            .zip(&layers)
            .map(|(depth, &layers)| depth.expand(key, layers))
            .collect()
    }

    /// Per up block (in up order), the transformer depth of each of its `layers_per_block + 1`
    /// layers: `reverse_transformer_layers_per_block` when given, else the down depths reversed.
    pub fn up_transformer_layers(&self) -> Result<Vec<Vec<usize>>> {
        let n = self.num_blocks();
        let mut layers = self.layers_per_block.expand("layers_per_block", n)?;
        layers.reverse();
        let (key, per_block) = match &self.reverse_transformer_layers_per_block {
            Some(reverse) => {
                let key = "reverse_transformer_layers_per_block";
                (key, OneOrMany::Many(reverse.clone()).expand(key, n)?)
            }
            None => {
                let key = "transformer_layers_per_block";
                if let OneOrMany::Many(blocks) = &self.transformer_layers_per_block {
                    if blocks.iter().any(|b| matches!(b, OneOrMany::Many(_))) {
                        // diffusers' `_check_config` demands the reverse list in this case.
                        return Err(Error::InvalidConfig {
                            key: "reverse_transformer_layers_per_block".to_string(),
                            value: "null".to_string(),
                            expected: "a list, as transformer_layers_per_block gives \
                                       per-layer depths (an asymmetric UNet)"
                                .to_string(),
                        });
                    }
                }
                let mut per_block = self.transformer_layers_per_block.expand(key, n)?;
                per_block.reverse();
                (key, per_block)
            }
        };
        per_block
            .iter()
            .zip(&layers)
            .map(|(depth, &layers)| depth.expand(key, layers + 1))
            .collect()
    }

    /// Whether each down block (in down order) has cross-attention transformers: a
    /// `CrossAttnDownBlock2D`, with or without diffusers' `UNetRes` prefix. Meant for configs that
    /// passed [`Self::check_supported`], where every other name is a `DownBlock2D`.
    pub fn down_blocks_have_cross_attention(&self) -> Vec<bool> {
        self.down_block_types
            .iter()
            .map(|name| block_type_name(name) == "CrossAttnDownBlock2D")
            .collect()
    }

    /// Whether each up block (in up order) has cross-attention transformers: a
    /// `CrossAttnUpBlock2D`, with or without the `UNetRes` prefix (see
    /// [`Self::down_blocks_have_cross_attention`]).
    pub fn up_blocks_have_cross_attention(&self) -> Vec<bool> {
        self.up_block_types
            .iter()
            .map(|name| block_type_name(name) == "CrossAttnUpBlock2D")
            .collect()
    }

    /// The number of resnet layers of each up block (in up order): diffusers gives up block `i`
    /// `reversed(layers_per_block)[i] + 1` layers, the extra one taking the skip connection of the
    /// down block's input.
    pub fn up_layers_per_block(&self) -> Result<Vec<usize>> {
        let mut layers = self
            .layers_per_block
            .expand("layers_per_block", self.num_blocks())?;
        layers.reverse();
        Ok(layers.into_iter().map(|l| l.saturating_add(1)).collect())
    }

    /// The mid block's transformer depth: diffusers passes `transformer_layers_per_block[-1]` to a
    /// one-layer mid block, which takes its first entry.
    pub fn mid_transformer_layers(&self) -> Result<usize> {
        let key = "transformer_layers_per_block";
        let last = self
            .transformer_layers_per_block
            .at(key, self.num_blocks().saturating_sub(1))?;
        last.at(key, 0)
    }

    /// Size of the time embedding fed to every resnet.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels.first().copied().unwrap_or(0) * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> UNet2DConditionConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_diffusers_defaults() {
        let cfg = parse("{}");
        assert_eq!(cfg, UNet2DConditionConfig::default());
        assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(cfg.num_heads_per_block().unwrap(), vec![8; 4]);
        assert_eq!(cfg.time_embed_dim(), 1280);
        cfg.check_supported().unwrap();
    }

    #[test]
    fn attention_head_dim_is_the_head_count_unless_num_attention_heads_is_set() {
        let cfg = parse(r#"{"attention_head_dim": [5, 10, 20, 20]}"#);
        assert_eq!(cfg.num_heads_per_block().unwrap(), vec![5, 10, 20, 20]);
        let cfg = parse(r#"{"attention_head_dim": 64, "num_attention_heads": 4}"#);
        assert_eq!(cfg.num_heads_per_block().unwrap(), vec![4; 4]);
    }

    #[test]
    fn transformer_depths_follow_diffusers() {
        let cfg = parse(
            r#"{"block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10]}"#,
        );
        assert_eq!(
            cfg.down_transformer_layers().unwrap(),
            vec![vec![1, 1], vec![2, 2], vec![10, 10]]
        );
        assert_eq!(
            cfg.up_transformer_layers().unwrap(),
            vec![vec![10, 10, 10], vec![2, 2, 2], vec![1, 1, 1]]
        );
        assert_eq!(cfg.mid_transformer_layers().unwrap(), 10);
    }

    #[test]
    fn block_kinds_and_up_layers_follow_diffusers() {
        let cfg = parse(
            r#"{"block_out_channels": [32, 64, 64],
                "down_block_types": ["UNetResCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UNetResCrossAttnUpBlock2D"],
                "layers_per_block": [1, 2, 3]}"#,
        );
        cfg.check_supported().unwrap();
        assert_eq!(
            cfg.down_blocks_have_cross_attention(),
            vec![true, true, false]
        );
        assert_eq!(
            cfg.up_blocks_have_cross_attention(),
            vec![false, true, true]
        );
        assert_eq!(cfg.up_layers_per_block().unwrap(), vec![4, 3, 2]);
        assert_eq!(
            cfg.up_transformer_layers()
                .unwrap()
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            cfg.up_layers_per_block().unwrap()
        );
        let cfg = parse(r#"{"layers_per_block": [1, 2]}"#);
        assert!(matches!(
            cfg.up_layers_per_block(),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn nested_depths_need_the_reverse_list() {
        let json = r#"{"block_out_channels": [32, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "transformer_layers_per_block": [[0], [2]]"#;
        let cfg = parse(&format!("{json}}}"));
        assert!(matches!(
            cfg.check_supported(),
            Err(Error::InvalidConfig { .. })
        ));
        let cfg = parse(&format!(
            r#"{json}, "reverse_transformer_layers_per_block": [[3, 1], [0, 0]]}}"#
        ));
        cfg.check_supported().unwrap();
        assert_eq!(
            cfg.up_transformer_layers().unwrap(),
            vec![vec![3, 1], vec![0, 0]]
        );
        assert_eq!(cfg.mid_transformer_layers().unwrap(), 2);
    }

    #[test]
    fn unsupported_values_name_the_key() {
        for (json, key) in [
            (
                r#"{"resnet_time_scale_shift": "scale_shift"}"#,
                "resnet_time_scale_shift",
            ),
            (r#"{"addition_embed_type": "text"}"#, "addition_embed_type"),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"act_fn": "tanh"}"#, "act_fn"),
            (r#"{"time_cond_proj_dim": 256}"#, "time_cond_proj_dim"),
            (
                r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#,
                "mid_block_type",
            ),
            (r#"{"only_cross_attention": true}"#, "only_cross_attention"),
            (r#"{"attention_type": "gated"}"#, "attention_type"),
        ] {
            match parse(json).check_supported() {
                Err(Error::Unsupported { key: found, .. }) => assert_eq!(found, key, "{json}"),
                other => panic!("{json}: expected Unsupported, got {other:?}"),
            }
        }
    }

    #[test]
    fn list_lengths_must_match_the_blocks() {
        let cfg = parse(r#"{"attention_head_dim": [8, 8]}"#);
        match cfg.check_supported() {
            Err(Error::InvalidConfig { key, .. }) => assert_eq!(key, "attention_head_dim"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn text_time_needs_its_sizes() {
        let cfg = parse(r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256}"#);
        match cfg.check_supported() {
            Err(Error::InvalidConfig { key, .. }) => {
                assert_eq!(key, "projection_class_embeddings_input_dim")
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn layers_per_block_one_billion_or_u64_max_is_refused_without_capacity_overflow() {
        for json in [
            r#"{"layers_per_block": 1000000000}"#,
            r#"{"layers_per_block": 18446744073709551615}"#,
            r#"{"transformer_layers_per_block": 18446744073709551615}"#,
            r#"{"transformer_layers_per_block": [1, [2, 18446744073709551615], 1, 1]}"#,
        ] {
            match parse(json).check_supported() {
                Err(Error::InvalidConfig { key, expected, .. }) => {
                    assert!(key.contains("layers_per_block"), "{json}: {key}");
                    assert!(expected.contains("100"), "{json}: {expected}");
                }
                other => panic!("{json}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
