//! The original TAESD files (madebyollin/taesd `taesd.py`: `taesd_encoder.safetensors`,
//! `taesd_decoder.safetensors`, likewise taesdxl/taesd3/taef1/taef2) in diffusers terms:
//! the bare `nn.Sequential` keys renamed to `AutoencoderTiny` keys, and the configuration
//! recovered from the keys and shapes alone.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::AutoencoderTinyConfig;
use crate::error::{BareKeyError, Error, Half, Result};

/// Renames one key of an original TAESD file to the diffusers `AutoencoderTiny` key.
///
/// The encoder's `nn.Sequential` is diffusers' `encoder.layers` index for index. The decoder's
/// index 0 is the parameter-free clamp that diffusers moved into `DecoderTiny.forward`, so the
/// bare decoder index `i` is diffusers' `decoder.layers.{i-1}`.
pub fn bare_to_diffusers_key(half: Half, key: &str) -> std::result::Result<String, BareKeyError> {
    let (index, rest) = key.split_once('.').ok_or(BareKeyError::NotALayerIndex)?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || rest.is_empty() {
        return Err(BareKeyError::NotALayerIndex);
    }
    let index: usize = index.parse().map_err(|_| BareKeyError::NotALayerIndex)?;
    let index = match half {
        Half::Encoder => index,
        Half::Decoder => index
            .checked_sub(1)
            .ok_or(BareKeyError::ClampHasNoWeights)?,
    };
    Ok(format!("{}.layers.{index}.{rest}", half.module_name()))
}

/// What the weights of one half say about its structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfStructure {
    /// Image channels: the encoder's input, or the decoder's output.
    pub image_channels: usize,
    pub latent_channels: usize,
    /// Per stage, in diffusers order.
    pub block_out_channels: Vec<usize>,
    pub num_blocks: Vec<usize>,
    /// Blocks with TAEF2's pooled group-norm branch (`pool.*` keys).
    pub pooled_blocks: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Conv {
        out: usize,
        input: usize,
        bias: bool,
    },
    Block {
        width: usize,
        pooled: bool,
    },
}

/// Recovers the structure of one half from its diffusers-named keys (`encoder.layers.*` or
/// `decoder.layers.*`; other keys are ignored) and their shapes. `path` only labels errors.
pub fn infer_half_structure(
    half: Half,
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<HalfStructure> {
    let prefix = format!("{}.layers.", half.module_name());
    let own: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let fail = |reason: String| Error::UnknownVariant {
        half,
        path: path.to_path_buf(),
        reason,
        shapes: own.clone(),
    };

    let mut by_layer: BTreeMap<usize, BTreeMap<&str, &[usize]>> = BTreeMap::new();
    for (key, shape) in &own {
        let tail = &key[prefix.len()..];
        let parsed = tail
            .split_once('.')
            .and_then(|(i, rest)| i.parse::<usize>().ok().map(|i| (i, rest)));
        let Some((index, rest)) = parsed else {
            return Err(fail(format!("{key} has no layer index")));
        };
        by_layer.entry(index).or_default().insert(rest, shape);
    }
    let mut layers = BTreeMap::new();
    for (&index, params) in &by_layer {
        let seen = classify(params).map_err(|why| fail(format!("layer {index}: {why}")))?;
        layers.insert(index, seen);
    }
    match half {
        Half::Encoder => walk_encoder(&layers),
        Half::Decoder => walk_decoder(&layers),
    }
    .map_err(fail)
}

fn classify(params: &BTreeMap<&str, &[usize]>) -> std::result::Result<Seen, String> {
    let conv_shape = |name: &str| -> std::result::Result<(usize, usize), String> {
        match params.get(name) {
            Some(&[out, input, 3, 3]) => Ok((*out, *input)),
            Some(shape) => Err(format!("{name} has shape {shape:?}, expected a 3x3 conv")),
            None => Err(format!("{name} is missing")),
        }
    };
    if params.contains_key("weight") {
        let (out, input) = conv_shape("weight")?;
        let bias = match params.get("bias") {
            Some(&[n]) if *n == out => true,
            Some(shape) => return Err(format!("bias has shape {shape:?}, expected [{out}]")),
            None => false,
        };
        if params.len() > 1 + usize::from(bias) {
            return Err("a conv with unexpected extra tensors".to_string());
        }
        return Ok(Seen::Conv { out, input, bias });
    }
    if params.contains_key("conv.0.weight") {
        let mut width = None;
        for name in ["conv.0.weight", "conv.2.weight", "conv.4.weight"] {
            let (out, input) = conv_shape(name)?;
            if input != out || width.is_some_and(|w| w != out) {
                return Err(format!(
                    "block convs change width ({name} is {out}x{input}); AutoencoderTiny blocks keep it"
                ));
            }
            width = Some(out);
        }
        let pooled = params.keys().any(|k| k.starts_with("pool."));
        let allowed = |k: &str| {
            ["conv.0.", "conv.2.", "conv.4."].iter().any(|p| {
                k.strip_prefix(p)
                    .is_some_and(|t| t == "weight" || t == "bias")
            }) || [
                "pool.0.weight",
                "pool.1.weight",
                "pool.1.bias",
                "pool.3.weight",
            ]
            .contains(&k)
        };
        if let Some(extra) = params.keys().find(|k| !allowed(k)) {
            return Err(format!("block has an unexpected tensor {extra}"));
        }
        return Ok(Seen::Block {
            width: width.unwrap_or_default(),
            pooled,
        });
    }
    Err("neither a conv nor an AutoencoderTinyBlock".to_string())
}

fn walk_encoder(layers: &BTreeMap<usize, Seen>) -> std::result::Result<HalfStructure, String> {
    let count = layers.len();
    if let Some((expected, found)) = layers.keys().enumerate().find(|(i, k)| i != *k) {
        return Err(format!(
            "layer {expected} is missing (found {found} next); an AutoencoderTiny encoder has weights in every layer"
        ));
    }
    let Some(Seen::Conv {
        out: first_width,
        input: image_channels,
        bias: true,
    }) = layers.get(&0).copied()
    else {
        return Err("layer 0 is not a 3x3 conv with bias".to_string());
    };
    let mut widths = vec![first_width];
    let mut blocks = vec![0];
    let mut pooled_blocks = 0;
    let mut width = first_width;
    let mut latent_channels = None;
    for index in 1..count {
        match layers[&index] {
            Seen::Block { width: w, pooled } => {
                if w != width {
                    return Err(format!(
                        "block {index} is {w} wide inside a {width}-wide stage"
                    ));
                }
                if let Some(last) = blocks.last_mut() {
                    *last += 1;
                }
                pooled_blocks += usize::from(pooled);
            }
            Seen::Conv { out, input, bias } => {
                if input != width {
                    return Err(format!("conv {index} takes {input} channels, not {width}"));
                }
                if index == count - 1 {
                    if !bias {
                        return Err(format!("final conv {index} has no bias"));
                    }
                    latent_channels = Some(out);
                } else {
                    if bias {
                        return Err(format!(
                            "downsampling conv {index} has a bias (not an AutoencoderTiny encoder)"
                        ));
                    }
                    widths.push(out);
                    blocks.push(0);
                    width = out;
                }
            }
        }
    }
    let latent_channels = latent_channels.ok_or("the last layer is not the latent conv")?;
    Ok(HalfStructure {
        image_channels,
        latent_channels,
        block_out_channels: widths,
        num_blocks: blocks,
        pooled_blocks,
    })
}

fn walk_decoder(layers: &BTreeMap<usize, Seen>) -> std::result::Result<HalfStructure, String> {
    let Some(Seen::Conv {
        out: first_width,
        input: latent_channels,
        bias: true,
    }) = layers.get(&0).copied()
    else {
        return Err("layer 0 is not a 3x3 conv with bias from the latents".to_string());
    };
    if layers.contains_key(&1) {
        return Err("layer 1 should be the parameter-free activation".to_string());
    }
    let last_index = layers.keys().next_back().copied().unwrap_or_default();
    let mut widths = Vec::new();
    let mut blocks = Vec::new();
    let mut in_stage = 0;
    let mut pooled_blocks = 0;
    let mut width = first_width;
    let mut index = 2;
    loop {
        match layers.get(&index).copied() {
            Some(Seen::Block { width: w, pooled }) => {
                if w != width {
                    return Err(format!("block {index} is {w} wide inside a {width}-wide stage"));
                }
                in_stage += 1;
                pooled_blocks += usize::from(pooled);
                index += 1;
            }
            // A gap is the parameter-free upsample, followed by a bias-free conv.
            None if index < last_index => match layers.get(&(index + 1)).copied() {
                Some(Seen::Conv {
                    out,
                    input,
                    bias: false,
                }) if input == width => {
                    widths.push(width);
                    blocks.push(in_stage);
                    in_stage = 0;
                    width = out;
                    index += 2;
                }
                other => {
                    return Err(format!(
                        "layer {} after the upsample at {index} is {other:?}, expected a bias-free {width}-channel conv",
                        index + 1
                    ))
                }
            },
            Some(Seen::Conv {
                out,
                input,
                bias: true,
            }) if index == last_index && input == width => {
                widths.push(width);
                blocks.push(in_stage);
                return Ok(HalfStructure {
                    image_channels: out,
                    latent_channels,
                    block_out_channels: widths,
                    num_blocks: blocks,
                    pooled_blocks,
                });
            }
            other => {
                return Err(format!(
                    "layer {index} is {other:?}; expected a {width}-wide block, an upsample, or the final conv with bias"
                ))
            }
        }
    }
}

/// The diffusers config that the recovered structures describe; what the weights cannot tell
/// (activation, upsampling, latent scaling) keeps the diffusers defaults, which are TAESD's.
pub fn config_from_structures(
    encoder: Option<&HalfStructure>,
    decoder: Option<&HalfStructure>,
) -> Result<AutoencoderTinyConfig> {
    let mut cfg = AutoencoderTinyConfig::default();
    if let Some(enc) = encoder {
        cfg.in_channels = enc.image_channels;
        cfg.latent_channels = enc.latent_channels;
        cfg.encoder_block_out_channels = enc.block_out_channels.clone();
        cfg.num_encoder_blocks = enc.num_blocks.clone();
    }
    if let Some(dec) = decoder {
        if let Some(enc) = encoder {
            if enc.latent_channels != dec.latent_channels {
                return Err(Error::LatentChannelsMismatch {
                    encoder: enc.latent_channels,
                    decoder: dec.latent_channels,
                });
            }
        }
        cfg.out_channels = dec.image_channels;
        cfg.latent_channels = dec.latent_channels;
        cfg.decoder_block_out_channels = dec.block_out_channels.clone();
        cfg.num_decoder_blocks = dec.num_blocks.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_keys_keep_their_index() {
        assert_eq!(
            bare_to_diffusers_key(Half::Encoder, "0.weight").unwrap(),
            "encoder.layers.0.weight"
        );
        assert_eq!(
            bare_to_diffusers_key(Half::Encoder, "12.pool.1.bias").unwrap(),
            "encoder.layers.12.pool.1.bias"
        );
    }

    #[test]
    fn decoder_keys_shift_past_the_clamp() {
        assert_eq!(
            bare_to_diffusers_key(Half::Decoder, "1.weight").unwrap(),
            "decoder.layers.0.weight"
        );
        assert_eq!(
            bare_to_diffusers_key(Half::Decoder, "10.conv.4.bias").unwrap(),
            "decoder.layers.9.conv.4.bias"
        );
        assert_eq!(
            bare_to_diffusers_key(Half::Decoder, "0.weight"),
            Err(BareKeyError::ClampHasNoWeights)
        );
    }

    #[test]
    fn non_index_keys_are_rejected() {
        for key in [
            "encoder.layers.0.weight",
            "weight",
            "x1.bias",
            "3",
            "3.",
            ".weight",
        ] {
            assert_eq!(
                bare_to_diffusers_key(Half::Encoder, key),
                Err(BareKeyError::NotALayerIndex),
                "{key}"
            );
        }
    }

    fn conv(map: &mut BTreeMap<String, Vec<usize>>, key: &str, out: usize, inp: usize, bias: bool) {
        map.insert(format!("{key}.weight"), vec![out, inp, 3, 3]);
        if bias {
            map.insert(format!("{key}.bias"), vec![out]);
        }
    }

    fn block(map: &mut BTreeMap<String, Vec<usize>>, key: &str, width: usize, pooled: bool) {
        for i in [0, 2, 4] {
            conv(map, &format!("{key}.conv.{i}"), width, width, true);
        }
        if pooled {
            map.insert(format!("{key}.pool.0.weight"), vec![4 * width, width, 1, 1]);
            map.insert(format!("{key}.pool.1.weight"), vec![4 * width]);
            map.insert(format!("{key}.pool.1.bias"), vec![4 * width]);
            map.insert(format!("{key}.pool.3.weight"), vec![width, 4 * width, 1, 1]);
        }
    }

    /// Builds original-layout shapes as taesd.py's `Encoder`/`Decoder` lay them out.
    fn bare_encoder(
        latent: usize,
        blocks: &[usize],
        pooled_stage: Option<usize>,
    ) -> Vec<(String, Vec<usize>)> {
        let mut map = BTreeMap::new();
        let mut i = 0;
        for (stage, &n) in blocks.iter().enumerate() {
            conv(
                &mut map,
                &i.to_string(),
                64,
                if stage == 0 { 3 } else { 64 },
                stage == 0,
            );
            i += 1;
            for _ in 0..n {
                block(&mut map, &i.to_string(), 64, pooled_stage == Some(stage));
                i += 1;
            }
        }
        conv(&mut map, &i.to_string(), latent, 64, true);
        map.into_iter().collect()
    }

    fn bare_decoder(
        latent: usize,
        blocks: &[usize],
        pooled_stage: Option<usize>,
    ) -> Vec<(String, Vec<usize>)> {
        let mut map = BTreeMap::new();
        conv(&mut map, "1", 64, latent, true);
        let mut i = 3;
        for (stage, &n) in blocks.iter().enumerate() {
            for _ in 0..n {
                block(&mut map, &i.to_string(), 64, pooled_stage == Some(stage));
                i += 1;
            }
            if stage + 1 == blocks.len() {
                conv(&mut map, &i.to_string(), 3, 64, true);
            } else {
                conv(&mut map, &(i + 1).to_string(), 64, 64, false);
                i += 2;
            }
        }
        map.into_iter().collect()
    }

    fn translate(half: Half, bare: &[(String, Vec<usize>)]) -> BTreeMap<String, Vec<usize>> {
        bare.iter()
            .map(|(k, v)| (bare_to_diffusers_key(half, k).unwrap(), v.clone()))
            .collect()
    }

    #[test]
    fn recovers_taesd_and_taef2_structures() {
        let path = Path::new("test");
        for (latent, pooled) in [(4, None), (16, None), (32, Some(3))] {
            let enc = translate(Half::Encoder, &bare_encoder(latent, &[1, 3, 3, 3], pooled));
            let enc = infer_half_structure(Half::Encoder, path, &enc).unwrap();
            assert_eq!(enc.latent_channels, latent);
            assert_eq!(enc.num_blocks, vec![1, 3, 3, 3]);
            assert_eq!(enc.block_out_channels, vec![64; 4]);
            assert_eq!(enc.image_channels, 3);
            assert_eq!(enc.pooled_blocks, if pooled.is_some() { 3 } else { 0 });

            let dec_pooled = pooled.map(|_| 0);
            let dec = translate(
                Half::Decoder,
                &bare_decoder(latent, &[3, 3, 3, 1], dec_pooled),
            );
            let dec = infer_half_structure(Half::Decoder, path, &dec).unwrap();
            assert_eq!(dec.latent_channels, latent);
            assert_eq!(dec.num_blocks, vec![3, 3, 3, 1]);
            assert_eq!(dec.image_channels, 3);
            assert_eq!(dec.pooled_blocks, if pooled.is_some() { 3 } else { 0 });

            let cfg = config_from_structures(Some(&enc), Some(&dec)).unwrap();
            assert_eq!(cfg.latent_channels, latent);
            assert_eq!(
                cfg,
                AutoencoderTinyConfig {
                    latent_channels: latent,
                    ..Default::default()
                }
            );
        }
    }

    #[test]
    fn other_stage_counts_are_read_from_the_keys() {
        let path = Path::new("test");
        let enc = translate(Half::Encoder, &bare_encoder(8, &[2, 1, 4], None));
        let enc = infer_half_structure(Half::Encoder, path, &enc).unwrap();
        assert_eq!(enc.num_blocks, vec![2, 1, 4]);
        let dec = translate(Half::Decoder, &bare_decoder(8, &[1, 0, 2], None));
        let dec = infer_half_structure(Half::Decoder, path, &dec).unwrap();
        assert_eq!(dec.num_blocks, vec![1, 0, 2]);
        let cfg = config_from_structures(Some(&enc), Some(&dec)).unwrap();
        assert_eq!(cfg.encoder_downsampling_factor(), 4);
        assert_eq!(cfg.decoder_upsampling_factor(), 4);
    }

    #[test]
    fn mismatched_halves_and_foreign_layouts_are_reported() {
        let path = Path::new("test");
        let enc = translate(Half::Encoder, &bare_encoder(4, &[1, 3, 3, 3], None));
        let enc = infer_half_structure(Half::Encoder, path, &enc).unwrap();
        let dec = translate(Half::Decoder, &bare_decoder(16, &[3, 3, 3, 1], None));
        let dec = infer_half_structure(Half::Decoder, path, &dec).unwrap();
        assert!(matches!(
            config_from_structures(Some(&enc), Some(&dec)),
            Err(Error::LatentChannelsMismatch {
                encoder: 4,
                decoder: 16
            })
        ));

        // taesana-like encoder: conv, ReLU, conv (stride 2, with bias) -> a gap at index 1.
        let mut map = BTreeMap::new();
        conv(&mut map, "encoder.layers.0", 32, 3, true);
        conv(&mut map, "encoder.layers.2", 64, 32, true);
        block(&mut map, "encoder.layers.4", 64, false);
        conv(&mut map, "encoder.layers.5", 32, 64, true);
        let err = infer_half_structure(Half::Encoder, path, &map).unwrap_err();
        match err {
            Error::UnknownVariant { half, shapes, .. } => {
                assert_eq!(half, Half::Encoder);
                assert!(shapes
                    .iter()
                    .any(|(k, s)| k == "encoder.layers.2.weight" && s == &[64, 32, 3, 3]));
            }
            other => panic!("unexpected {other}"),
        }
    }
}
