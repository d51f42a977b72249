//! Weight compression of an ML program as coremltools 9.0's `optimize.coreml` passes do it
//! (`_quantization_passes.py`: `palettize_weights`, `linear_quantize_weights`; `optimize/_utils.py`:
//! `infer_block_sizes`, `compute_qparams_by_dtype`, `pack_elements_into_bits`).
//!
//! - Palettization (k-means, 1/2/3/4/6/8 bits): per tensor as the iOS16 `constexpr_lut_to_dense`
//!   (attributes `lut`, packed `indices`, `shape`) before iOS18, as the iOS18 form (inputs `indices`
//!   uint{n} of the weight's shape, `lut` [G0, .., Gr-1, 2^n, 1]) from the iOS18 opset on, where it
//!   may also be per grouped channel (groups of output channels).
//! - Linear symmetric quantization: int8 per channel as the iOS16 `constexpr_affine_dequantize`;
//!   from iOS18 on `constexpr_blockwise_shift_scale` (int8 or int4, per channel or per block along
//!   the input channels).
//! - Mixed bits: a per-weight palettization width (a recipe), other weights left as they are.
//!
//! A weight is compressed as coremltools chooses: a `const` of at least 10 fp16/fp32 elements
//! (what it would keep in weight.bin) of more than `weight_threshold` elements and rank above 1,
//! consumed by some op, whose input/output channel axes its consumers agree on. The new op takes
//! the const's place, is named `<const name>_palettized` / `_quantized`, and its consumers read it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use coreml_proto::proto::mil_spec::{
    argument::{binding::Binding, Binding as ArgBinding},
    Argument, Block, DataType, NamedValueType, Operation, Value,
};
use coreml_proto::proto::Model;

mod linear;
mod lut;

use linear::quantize_op;
use lut::palettize_op;

use crate::blob::BlobFile;
use crate::decode::is_constexpr;
use crate::error::{Error, Result};
use crate::package::{model_type_name, program_of_mut, write_package, MlPackage};
use crate::program::{const_producers, const_val, input_arg, input_var_names, op_name, Arg};
use crate::value::{
    dtype_bits, dtype_name, immediate_value, make_tensor_type, read_value, tensor_type, TensorData,
    Values,
};

/// coremltools' default `weight_threshold`: weights of at most this many elements stay dense.
pub const DEFAULT_WEIGHT_THRESHOLD: usize = 2048;

/// Palettization widths coremltools accepts (`palettize_weights._SUPPORTED_NBITS`).
pub const PALETTE_BITS: [u32; 6] = [1, 2, 3, 4, 6, 8];

/// The width a recipe uses for "leave this weight in fp16".
pub const RECIPE_KEEP_BITS: u32 = 16;

/// How many lookup tables a palettized weight gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One table for the whole tensor.
    PerTensor,
    /// One table per `group_size` output channels (iOS18 opset only).
    PerGroupedChannel { group_size: usize },
}

/// The integer type of linear quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearDtype {
    Int8,
    Int4,
}

impl LinearDtype {
    fn bits(self) -> u32 {
        match self {
            LinearDtype::Int8 => 8,
            LinearDtype::Int4 => 4,
        }
    }
}

/// What to do to the weights.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// k-means palettization with `nbits`-bit indices.
    Palettize {
        nbits: u32,
        granularity: Granularity,
    },
    /// Linear symmetric quantization; `block_size` None is per output channel, `Some(b)` blocks of
    /// `b` input channels (iOS18 opset only).
    Linear {
        dtype: LinearDtype,
        block_size: Option<usize>,
    },
    /// Per-tensor k-means palettization at a width per weight.
    Recipe(Recipe),
}

/// Palettization widths by `const` op name; [`RECIPE_KEEP_BITS`] (16) keeps a weight in fp16,
/// weights the recipe does not name are left as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recipe {
    pub bits: BTreeMap<String, u32>,
}

impl Recipe {
    /// Reads a JSON object `{"<const op name>": bits, ...}`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::error::io(path))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::error::format(path, format!("not JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| {
            crate::error::format(
                path,
                "expected an object mapping weight (const op) names to bits",
            )
        })?;
        let mut bits = BTreeMap::new();
        for (name, v) in obj {
            let b = v
                .as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| PALETTE_BITS.contains(b) || *b == RECIPE_KEEP_BITS)
                .ok_or_else(|| {
                    crate::error::format(
                        path,
                        format!("{name}: {v} bits; expected one of {} or 16", bits_list()),
                    )
                })?;
            bits.insert(name.clone(), b);
        }
        Ok(Self { bits })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompressOptions {
    pub mode: Mode,
    /// Weights of at most this many elements stay dense (coremltools: 2048).
    pub weight_threshold: usize,
}

impl CompressOptions {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            weight_threshold: DEFAULT_WEIGHT_THRESHOLD,
        }
    }
}

/// A weight coremltools would have considered but left dense, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub weight: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressReport {
    /// Weights replaced by a `constexpr_*` op.
    pub compressed: usize,
    /// Weight-file-sized constants left as they were (small, unconsumed, not selected, skipped).
    pub kept: usize,
    /// Bytes of every constant of the program before and after (packed sizes).
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Compressed tensors clustered entirely by the coremltools-identical k-means path (fp16,
    /// every clustered group of at least 10,000 elements).
    pub exact_kmeans: usize,
    /// Weights large enough to compress that were left dense as coremltools leaves them
    /// (channel count not divisible by the group or block, ambiguous channel axis, ...).
    pub skipped: Vec<Skipped>,
}

pub(super) fn bits_list() -> String {
    PALETTE_BITS
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `src`, compresses its weights and writes the result as `dest` (atomically).
pub fn compress_package(src: &Path, dest: &Path, opts: &CompressOptions) -> Result<CompressReport> {
    if overlaps(src, dest) {
        return Err(Error::InvalidParameter {
            name: "dest",
            value: dest.display().to_string(),
            expected: "a path outside the source package (it is rewritten from it)".into(),
        });
    }
    let MlPackage {
        mut model, weights, ..
    } = MlPackage::open(src)?;
    let report = compress_program(&mut model, weights.as_ref(), opts)?;
    write_package(&mut model, weights.as_ref(), dest)?;
    Ok(report)
}

/// Whether `dest` is `src` or lies inside it (paths compared once resolved; `dest` need not
/// exist).
fn overlaps(src: &Path, dest: &Path) -> bool {
    let canon = |p: &Path| -> Option<std::path::PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let parent = match p.parent() {
            Some(x) if !x.as_os_str().is_empty() => x.canonicalize().ok()?,
            _ => std::env::current_dir().ok()?,
        };
        Some(parent.join(p.file_name()?))
    };
    match (canon(src), canon(dest)) {
        (Some(x), Some(y)) => y.starts_with(&x),
        _ => src == dest,
    }
}

/// The compression of one weight.
#[derive(Clone, Copy, Debug)]
enum Plan {
    Lut {
        nbits: u32,
        group_size: Option<usize>,
    },
    Linear {
        bits: u32,
        block_size: Option<usize>,
    },
}

/// The op forms an opset allows: iOS16 (CoreML6), iOS17 (CoreML7) or iOS18+ (CoreML8+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) ios18: bool,
}

fn target_of(opset: &str, spec: i32) -> Result<Target> {
    let level = opset
        .strip_prefix("CoreML")
        .and_then(|n| n.parse::<u32>().ok());
    let (ios16, ios18) = match level {
        Some(n) => (n >= 6, n >= 8),
        None => (spec >= 7, spec >= 9),
    };
    if !ios16 {
        return Err(Error::Unsupported {
            what: format!("opset {opset} (specification version {spec})"),
            reason: "compressed weights need the iOS16 opset (CoreML6, specification 7) or later"
                .into(),
        });
    }
    Ok(Target { ios18 })
}

fn needs_ios18(what: &str, opset: &str, spec: i32) -> Error {
    Error::Unsupported {
        what: format!("{what} on opset {opset} (specification version {spec})"),
        reason: "it is supported since iOS18 (opset CoreML8, specification 9), as in \
                 coremltools: re-convert the model with minimum_deployment_target iOS18"
            .into(),
    }
}

fn validate(opts: &CompressOptions) -> Result<()> {
    match &opts.mode {
        Mode::Palettize { nbits, granularity } => {
            if !PALETTE_BITS.contains(nbits) {
                return Err(Error::InvalidParameter {
                    name: "nbits",
                    value: nbits.to_string(),
                    expected: format!("one of {}", bits_list()),
                });
            }
            if let Granularity::PerGroupedChannel { group_size: 0 } = granularity {
                return Err(Error::InvalidParameter {
                    name: "group_size",
                    value: "0".into(),
                    expected: "at least 1 output channel per group".into(),
                });
            }
        }
        Mode::Linear {
            block_size: Some(0),
            ..
        } => {
            return Err(Error::InvalidParameter {
                name: "block_size",
                value: "0".into(),
                expected: "at least 1 input channel per block".into(),
            });
        }
        Mode::Linear { .. } => {}
        Mode::Recipe(r) => {
            if let Some((name, b)) = r
                .bits
                .iter()
                .find(|(_, b)| !PALETTE_BITS.contains(b) && **b != RECIPE_KEEP_BITS)
            {
                return Err(Error::InvalidParameter {
                    name: "recipe bits",
                    value: format!("{name}: {b}"),
                    expected: format!("one of {} or 16 (left fp16)", bits_list()),
                });
            }
        }
    }
    Ok(())
}

fn check_target(opts: &CompressOptions, target: Target, opset: &str, spec: i32) -> Result<()> {
    if target.ios18 {
        return Ok(());
    }
    match &opts.mode {
        Mode::Palettize { nbits, granularity } => {
            if let Granularity::PerGroupedChannel { .. } = granularity {
                return Err(needs_ios18(
                    "per_grouped_channel palettization",
                    opset,
                    spec,
                ));
            }
            if *nbits == 3 {
                return Err(needs_ios18("3-bit palettization", opset, spec));
            }
        }
        Mode::Linear { dtype, block_size } => {
            if block_size.is_some() {
                return Err(needs_ios18("per_block quantization", opset, spec));
            }
            if *dtype == LinearDtype::Int4 {
                return Err(needs_ios18("4-bit quantization", opset, spec));
            }
        }
        Mode::Recipe(r) => {
            if let Some((name, _)) = r.bits.iter().find(|(_, b)| **b == 3) {
                return Err(needs_ios18(
                    &format!("3-bit palettization (recipe entry {name})"),
                    opset,
                    spec,
                ));
            }
        }
    }
    Ok(())
}

/// Compresses the weights of an in-memory model; `weights` is the weight.bin its constants refer
/// to. The model is only changed when the whole program could be compressed.
pub fn compress_program(
    model: &mut Model,
    weights: Option<&BlobFile>,
    opts: &CompressOptions,
) -> Result<CompressReport> {
    validate(opts)?;
    let spec = model.specification_version;
    let type_name = model_type_name(model);
    let mut work = model.clone();
    let program = program_of_mut(&mut work).ok_or_else(|| Error::Unsupported {
        what: "model".into(),
        reason: format!(
            "not an ML program (model type {type_name}); only ML programs are compressed"
        ),
    })?;
    if let Mode::Recipe(r) = &opts.mode {
        // Checked before any clustering, so that a mistyped name fails at once.
        let mut known: HashSet<&str> = HashSet::new();
        for f in program.functions.values() {
            for block in f.block_specializations.values() {
                for op in block.operations.iter().filter(|op| op.r#type == "const") {
                    known.insert(op_name(op));
                    known.extend(op.outputs.iter().map(|o| o.name.as_str()));
                }
            }
        }
        if let Some(missing) = r.bits.keys().find(|k| !known.contains(k.as_str())) {
            return Err(Error::InvalidParameter {
                name: "recipe",
                value: missing.clone(),
                expected: "names of const ops (weights) of the model".into(),
            });
        }
    }
    let mut report = CompressReport::default();
    let mut names: Vec<String> = program.functions.keys().cloned().collect();
    names.sort();
    for fname in names {
        let Some(f) = program.functions.get_mut(&fname) else {
            continue;
        };
        let opset = f.opset.clone();
        let target = target_of(&opset, spec)?;
        check_target(opts, target, &opset, spec)?;
        let Some(block) = f.block_specializations.get_mut(&opset) else {
            return Err(Error::Unsupported {
                what: format!("function {fname}"),
                reason: format!("no block for its opset {opset}"),
            });
        };
        if let Some(op) = block.operations.iter().find(|op| is_constexpr(op)) {
            let n = block
                .operations
                .iter()
                .filter(|op| is_constexpr(op))
                .count();
            return Err(Error::Unsupported {
                what: format!("op {} ({})", op_name(op), op.r#type),
                reason: format!(
                    "the model is already compressed ({n} constexpr_* ops in function {fname}); \
                     refusing to compress it again (coremltools would leave those ops as they are \
                     and compress only the dense consts): start from the uncompressed model"
                ),
            });
        }
        report.weight_bytes_before += block_bytes(block);
        compress_block(block, weights, opts, target, &mut report)?;
        report.weight_bytes_after += block_bytes(block);
    }
    *model = work;
    Ok(report)
}

/// Which plan a const gets under the options (None: not selected).
fn plan_for(opts: &CompressOptions, name: &str) -> Option<Plan> {
    match &opts.mode {
        Mode::Palettize { nbits, granularity } => Some(Plan::Lut {
            nbits: *nbits,
            group_size: match granularity {
                Granularity::PerTensor => None,
                Granularity::PerGroupedChannel { group_size } => Some(*group_size),
            },
        }),
        Mode::Linear { dtype, block_size } => Some(Plan::Linear {
            bits: dtype.bits(),
            block_size: *block_size,
        }),
        Mode::Recipe(r) => match r.bits.get(name) {
            Some(&b) if b != RECIPE_KEEP_BITS => Some(Plan::Lut {
                nbits: b,
                group_size: None,
            }),
            _ => None,
        },
    }
}

struct Replacement {
    index: usize,
    op: Operation,
    old: String,
    new: String,
}

fn compress_block(
    block: &mut Block,
    weights: Option<&BlobFile>,
    opts: &CompressOptions,
    target: Target,
    report: &mut CompressReport,
) -> Result<()> {
    let mut replacements = Vec::new();
    {
        let consts = const_producers(block);
        let mut consumers: HashMap<&str, Vec<&Operation>> = HashMap::new();
        for op in &block.operations {
            let mut used: Vec<&str> = input_var_names(op);
            for inner in &op.blocks {
                nested_uses(inner, &mut used);
            }
            used.sort_unstable();
            used.dedup();
            for name in used {
                consumers.entry(name).or_default().push(op);
            }
        }
        let block_outputs: HashSet<&str> = block.outputs.iter().map(|s| s.as_str()).collect();

        for (index, op) in block.operations.iter().enumerate() {
            let Some(val) = const_val(op) else { continue };
            let name = op_name(op).to_string();
            let Some(out) = op.outputs.first().map(|o| o.name.as_str()) else {
                continue;
            };
            // A recipe names a weight by its const op's name or, failing that, its output var.
            let recipe_key = match &opts.mode {
                Mode::Recipe(r) if r.bits.contains_key(&name) => Some(name.as_str()),
                Mode::Recipe(r) if r.bits.contains_key(out) => Some(out),
                _ => None,
            };
            let Some((dtype, shape)) = val.r#type.as_ref().and_then(tensor_type) else {
                continue;
            };
            let numel: usize = shape.iter().product();
            // coremltools' `is_valid_op`: what `should_use_weight_file` (at its default iOS15
            // specification) would keep in weight.bin.
            let weight_file = numel >= 10
                && matches!(
                    dtype,
                    DataType::Float16 | DataType::Float32 | DataType::Uint8 | DataType::Int8
                );
            if !weight_file {
                continue;
            }
            let Some(plan) = plan_for(opts, recipe_key.unwrap_or(&name)) else {
                report.kept += 1;
                continue;
            };
            let users = consumers.get(out).map(|v| v.as_slice()).unwrap_or(&[]);
            if users.is_empty() || block_outputs.contains(out) {
                // coremltools leaves consts that feed nothing or the block's outputs.
                report.kept += 1;
                continue;
            }
            if shape.len() <= 1 || numel <= opts.weight_threshold {
                report.kept += 1;
                continue;
            }
            if !matches!(dtype, DataType::Float16 | DataType::Float32) {
                skip(
                    report,
                    &name,
                    format!(
                        "{} weight; only fp16 and fp32 weights are compressed",
                        dtype_name(dtype)
                    ),
                );
                continue;
            }
            let Some((in_axis, out_axis)) = channel_axes(out, shape.len(), users, &consts, weights)
            else {
                skip(
                    report,
                    &name,
                    "its consumers disagree on the input/output channel axes".into(),
                );
                continue;
            };
            let data = read_value(val, weights)?;
            let new_name = match plan {
                Plan::Lut { .. } => format!("{name}_palettized"),
                Plan::Linear { .. } => format!("{name}_quantized"),
            };
            let built = match plan {
                Plan::Lut { nbits, group_size } => {
                    palettize_op(&data, nbits, group_size, out_axis, target, &new_name)
                }
                Plan::Linear { bits, block_size } => quantize_op(
                    &data, bits, block_size, in_axis, out_axis, target, &new_name,
                ),
            }
            .map_err(|e| Error::Op {
                op: name.clone(),
                op_type: op.r#type.clone(),
                reason: format!("cannot compress this weight: {e}"),
            })?;
            match built {
                Built::Op { op: new_op, exact } => {
                    report.compressed += 1;
                    if exact {
                        report.exact_kmeans += 1;
                    }
                    replacements.push(Replacement {
                        index,
                        op: new_op,
                        old: out.to_string(),
                        new: new_name,
                    });
                }
                Built::Skip(reason) => skip(report, &name, reason),
            }
        }
    }
    let mut renames = HashMap::new();
    for r in replacements {
        block.operations[r.index] = r.op;
        renames.insert(r.old, r.new);
    }
    rename_uses(block, &renames);
    Ok(())
}

fn skip(report: &mut CompressReport, name: &str, reason: String) {
    report.kept += 1;
    report.skipped.push(Skipped {
        weight: name.to_string(),
        reason,
    });
}

fn nested_uses<'a>(block: &'a Block, used: &mut Vec<&'a str>) {
    for op in &block.operations {
        used.extend(input_var_names(op));
        for inner in &op.blocks {
            nested_uses(inner, used);
        }
    }
    used.extend(block.outputs.iter().map(|s| s.as_str()));
}

fn rename_uses(block: &mut Block, renames: &HashMap<String, String>) {
    if renames.is_empty() {
        return;
    }
    for op in &mut block.operations {
        for arg in op.inputs.values_mut() {
            for b in &mut arg.arguments {
                if let Some(Binding::Name(n)) = &mut b.binding {
                    if let Some(new) = renames.get(n.as_str()) {
                        *n = new.clone();
                    }
                }
            }
        }
        for inner in &mut op.blocks {
            rename_uses(inner, renames);
            for o in &mut inner.outputs {
                if let Some(new) = renames.get(o.as_str()) {
                    *o = new.clone();
                }
            }
        }
    }
}

/// The (input, output) channel axes of a weight, as `select_input_output_channel_axis` picks
/// them from its consumers: conv_transpose [Cin, Cout, ..], matmul by its transpose flags, every
/// other op [Cout, Cin, ..]. None when the consumers disagree.
fn channel_axes(
    var: &str,
    rank: usize,
    users: &[&Operation],
    consts: &HashMap<&str, &Operation>,
    weights: Option<&BlobFile>,
) -> Option<(usize, usize)> {
    let flag = |op: &Operation, param: &str| -> bool {
        let v = match input_arg(op, param) {
            Some(Arg::Value(v)) => read_value(v, weights).ok(),
            Some(Arg::Var(n)) => consts
                .get(n)
                .and_then(|c| const_val(c))
                .and_then(|v| read_value(v, weights).ok()),
            None => None,
        };
        matches!(v.map(|t| t.values), Some(Values::Bool(b)) if b.first() == Some(&true))
    };
    let is_var =
        |op: &Operation, param: &str| matches!(input_arg(op, param), Some(Arg::Var(n)) if n == var);
    let r = rank as i64;
    let mut axes: HashSet<(i64, i64)> = HashSet::new();
    for op in users {
        let (out, inp) = match op.r#type.as_str() {
            "conv_transpose" => (1, 0),
            "matmul" if is_var(op, "y") => match flag(op, "transpose_y") {
                true => (-2, -1),
                false => (-1, -2),
            },
            "matmul" => match flag(op, "transpose_x") {
                true => (-1, -2),
                false => (-2, -1),
            },
            _ => (0, 1),
        };
        let norm = |a: i64| if a < 0 { a + r } else { a };
        axes.insert((norm(inp), norm(out)));
    }
    if axes.len() != 1 {
        return None;
    }
    let (inp, out) = axes.into_iter().next()?;
    Some((usize::try_from(inp).ok()?, usize::try_from(out).ok()?))
}

pub(super) enum Built {
    Op { op: Operation, exact: bool },
    Skip(String),
}

fn string_value(s: &str) -> Result<Value> {
    immediate_value(&TensorData {
        dtype: DataType::String,
        shape: vec![],
        values: Values::Str(vec![s.to_string()]),
    })
}

pub(super) fn new_op(
    op_type: &str,
    name: &str,
    dtype: DataType,
    shape: &[usize],
    attributes: Vec<(&str, TensorData)>,
    inputs: Vec<(&str, TensorData)>,
) -> Result<Operation> {
    let mut attrs = HashMap::new();
    attrs.insert("name".to_string(), string_value(name)?);
    for (k, v) in attributes {
        attrs.insert(k.to_string(), immediate_value(&v)?);
    }
    let mut ins = HashMap::new();
    for (k, v) in inputs {
        ins.insert(
            k.to_string(),
            Argument {
                arguments: vec![ArgBinding {
                    binding: Some(Binding::Value(immediate_value(&v)?)),
                }],
            },
        );
    }
    Ok(Operation {
        r#type: op_type.to_string(),
        inputs: ins,
        outputs: vec![NamedValueType {
            name: name.to_string(),
            r#type: Some(make_tensor_type(dtype, shape)),
        }],
        blocks: vec![],
        attributes: attrs,
    })
}

/// Strides of a C-order shape.
pub(super) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Bytes of the constants a block stores (const values and constexpr operands, sub-byte types
/// packed), names and other string attributes aside.
fn block_bytes(block: &Block) -> u64 {
    let size = |v: &Value| -> u64 {
        match v.r#type.as_ref().and_then(tensor_type) {
            Some((DataType::String, _)) | None => 0,
            Some((dtype, shape)) => {
                let n: u64 = shape.iter().map(|&d| d as u64).product();
                (n * dtype_bits(dtype) as u64).div_ceil(8)
            }
        }
    };
    let mut total = 0u64;
    for op in &block.operations {
        if op.r#type == "const" {
            if let Some(v) = const_val(op) {
                total += size(v);
            }
        } else if is_constexpr(op) {
            for (k, v) in &op.attributes {
                if k != "name" {
                    total += size(v);
                }
            }
            for arg in op.inputs.values() {
                for b in &arg.arguments {
                    if let Some(Binding::Value(v)) = &b.binding {
                        total += size(v);
                    }
                }
            }
        }
    }
    total
}
