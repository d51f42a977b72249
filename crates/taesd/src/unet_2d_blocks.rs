//! `AutoencoderTinyBlock` (diffusers `models/unets/unet_2d_blocks.py`), plus the pooled
//! group-norm branch that TAEF2 adds to some blocks (madebyollin/taesd `taesd.py`,
//! `Block(use_midblock_gn=True)`).

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;
use sdrs_blocks::Activation;
use sdrs_kernels::nn::{conv2d, conv2d_no_bias, group_norm, Conv2d, GroupNorm};
use sdrs_kernels::VarBuilder;

use crate::error::{Error, Result};

/// TAESD's `Block` hard-codes `nn.GroupNorm(4, n_gn)` in the pooled branch, with torch's default eps.
const POOL_GROUP_NORM_GROUPS: usize = 4;
const POOL_GROUP_NORM_EPS: f64 = 1e-5;

/// `x + conv1x1(relu(group_norm(conv1x1(x))))`, keys `pool.0`, `pool.1`, `pool.3`.
/// The hidden width (4x the block width in TAEF2) is read from the weights.
#[derive(Debug, Clone)]
pub struct PooledBranch {
    expand: Conv2d,
    norm: GroupNorm,
    project: Conv2d,
}

impl PooledBranch {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let key = format!("{}.0.weight", vb.pp("pool").prefix());
        let probe = vb.pp("pool").pp("0").get_unchecked("weight")?;
        let hidden = match probe.dims() {
            &[hidden, c, 1, 1] if c == channels && hidden % POOL_GROUP_NORM_GROUPS == 0 => hidden,
            dims => {
                return Err(Error::WeightShape {
                    key,
                    expected: format!(
                        "[H, {channels}, 1, 1] with H a multiple of {POOL_GROUP_NORM_GROUPS}"
                    ),
                    found: dims.to_vec(),
                })
            }
        };
        let vb = vb.pp("pool");
        let cfg = Conv2dConfig::default();
        let expand = conv2d_no_bias(channels, hidden, 1, cfg, vb.pp("0"))?;
        let norm = group_norm(
            POOL_GROUP_NORM_GROUPS,
            hidden,
            POOL_GROUP_NORM_EPS,
            vb.pp("1"),
        )?;
        let project = conv2d_no_bias(hidden, channels, 1, cfg, vb.pp("3"))?;
        Ok(Self {
            expand,
            norm,
            project,
        })
    }

    /// The branch alone (without the residual add).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's GroupNorm computes its statistics in f32 for half-precision inputs.
        let hs = self.norm.forward(&self.expand.forward(xs)?)?.relu()?;
        Ok(self.project.forward(&hs)?)
    }
}

/// Three 3x3 convs with the configured activation between them, a skip, and a final ReLU.
#[derive(Debug, Clone)]
pub struct AutoencoderTinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    pool: Option<PooledBranch>,
    act: Activation,
}

impl AutoencoderTinyBlock {
    /// The pooled branch is built when the weights have `pool.0.weight` (TAEF2), so the
    /// variant is recognised from the keys alone.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        act: Activation,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let vc = vb.pp("conv");
        let convs = [
            conv2d(in_channels, out_channels, 3, cfg, vc.pp("0"))?,
            conv2d(out_channels, out_channels, 3, cfg, vc.pp("2"))?,
            conv2d(out_channels, out_channels, 3, cfg, vc.pp("4"))?,
        ];
        let skip = if in_channels != out_channels {
            Some(conv2d_no_bias(
                in_channels,
                out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("skip"),
            )?)
        } else {
            None
        };
        let pool = if vb.contains_tensor("pool.0.weight") {
            Some(PooledBranch::new(vb.clone(), in_channels)?)
        } else {
            None
        };
        Ok(Self {
            convs,
            skip,
            pool,
            act,
        })
    }

    pub fn has_pooled_branch(&self) -> bool {
        self.pool.is_some()
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match &self.pool {
            Some(pool) => (xs + pool.forward(xs)?)?,
            None => xs.clone(),
        };
        let hs = self.convs[0].forward(&xs)?;
        let hs = self.convs[1].forward(&self.act.forward(&hs)?)?;
        let hs = self.convs[2].forward(&self.act.forward(&hs)?)?;
        let skip = match &self.skip {
            Some(skip) => skip.forward(&xs)?,
            None => xs,
        };
        // `fuse` is always a ReLU, whatever act_fn says.
        Ok((hs + skip)?.relu()?)
    }
}
