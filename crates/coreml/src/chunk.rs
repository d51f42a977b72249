//! Splitting an ML program into chunks the way coremltools' `models.utils.bisect_model` splits a
//! too-big UNet into `UnetChunk1`/`UnetChunk2`: the incision op is found by dense-weight size
//! (`_get_op_idx_split_location`), the tensors crossing the cut (`_get_first_chunk_outputs`) become
//! fp32 outputs of one chunk (`_add_fp32_casts`) and fp32 inputs, cast back to fp16, of the next
//! (`_make_second_chunk_prog`), and each chunk is pruned as `common::dead_code_elimination` prunes.
//!
//! Two chunks are exactly coremltools' split. N chunks use N-1 incisions chosen by the same rule at
//! k/N of the weight total (k = 1..N-1), so the two-chunk case is unchanged; a var produced in one
//! chunk and read several chunks later is an output of the chunk that produces it and an input of
//! every later chunk that reads it (it is not forwarded through the chunks in between).
//!
//! Where the result is not fixed by coremltools' algorithm but by its Python data structures, this
//! module picks a deterministic equivalent and says so: cut tensors are ordered by where they are
//! defined (coremltools iterates a Python `set`), and the op `name` of a new `cast` is `cast_<k>`
//! (coremltools numbers them from a process-wide counter). The model metadata, the input and output
//! descriptions of the original model and the program attributes are kept (coremltools' re-conversion
//! drops them); the function's opset key is the source's, which is what coremltools writes as well
//! (it derives the key from the specification version, not from the iOS16 opset it forces on
//! chunk 2's pymil function).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use coreml_proto::proto::mil_spec::{
    argument::binding::Binding, Block, DataType, NamedValueType, Operation, Value,
};
use coreml_proto::proto::{
    array_feature_type::ArrayDataType, feature_type, ArrayFeatureType, FeatureDescription,
    FeatureType, Model,
};

use crate::error::{io, Error, Result};
use crate::package::{program_of, program_of_mut, write_package, MlPackage};
use crate::program::{main_block, op_name};
use crate::value::{
    dtype_itemsize, dtype_name, immediate_value, make_tensor_type, read_value, tensor_type,
    TensorData, Values,
};

/// How to chunk. `chunks` and `max_chunk_bytes` both `None` means coremltools' two chunks.
#[derive(Clone, Debug)]
pub struct ChunkOptions {
    /// Number of chunks.
    pub chunks: Option<usize>,
    /// Largest dense-weight size a chunk may have; picks the smallest number of chunks that fits
    /// (with `chunks` also given, that number is checked against it instead).
    pub max_chunk_bytes: Option<u64>,
    /// Package names: `<prefix>1.mlpackage`, `<prefix>2.mlpackage`, ...
    pub prefix: String,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            chunks: None,
            max_chunk_bytes: None,
            prefix: "UnetChunk".into(),
        }
    }
}

/// The last op of a chunk (coremltools' "incision op"), as coremltools reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incision {
    /// The op's name (its `name` attribute).
    pub name: String,
    pub op_type: String,
    /// Its index in the main block's op list as pymil holds it (see [`OpList`]).
    pub index: usize,
    /// Ops in that list.
    pub n_ops: usize,
}

/// One written chunk.
#[derive(Clone, Debug)]
pub struct ChunkSummary {
    pub path: PathBuf,
    /// Dense weight bytes of the chunk ([`const_bytes`]).
    pub const_bytes: u64,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A var crossing a cut: name, MIL dtype name (`fp16`, ...) and shape.
pub type CutTensor = (String, String, Vec<usize>);

#[derive(Clone, Debug)]
pub struct ChunkReport {
    pub incisions: Vec<Incision>,
    /// Per incision, the vars crossing it (in definition order).
    pub cut_tensors: Vec<Vec<CutTensor>>,
    pub chunks: Vec<ChunkSummary>,
}

/// The chunks of a model, not yet written.
#[derive(Clone, Debug)]
pub struct ChunkedModel {
    pub incisions: Vec<Incision>,
    pub cut_tensors: Vec<Vec<CutTensor>>,
    pub models: Vec<Model>,
    pub const_bytes: Vec<u64>,
}

/// The main block's ops as pymil's milproto loader creates them: every proto op, each preceded by
/// one `const` op per value it is loaded with (see `extra_consts`), and what pymil derives from
/// them (consumers, inferred values).
pub struct OpList<'a> {
    block: &'a Block,
    /// Per entry: the proto op it is or belongs to, and its dense bytes.
    entries: Vec<(usize, u64)>,
    /// Per proto op: its entry.
    entry_of: Vec<usize>,
    /// Per var: the top-level proto ops reading it, once per binding (pymil's `child_ops`).
    consumers: HashMap<&'a str, Vec<usize>>,
    producer: HashMap<&'a str, usize>,
    /// Vars pymil gives a value at load time (`var.val is not None`).
    valued: HashSet<&'a str>,
    /// Function inputs, in declaration order.
    inputs: Vec<&'a str>,
}

fn is_const_type(op: &Operation) -> bool {
    op.r#type.starts_with("const")
}

/// Bytes of a value as pymil holds it if it is a numpy array (a tensor of rank >= 1): elements x
/// numpy item size. Scalars, lists and dictionaries are not arrays there and count 0.
fn ndarray_bytes(v: &Value) -> u64 {
    let Some((dtype, shape)) = v.r#type.as_ref().and_then(tensor_type) else {
        return 0;
    };
    if shape.is_empty() {
        return 0;
    }
    let numel = shape.iter().map(|&d| d as u64).product::<u64>();
    if dtype == DataType::String {
        // numpy holds strings as fixed-width UTF-32: 4 bytes per char of the longest one.
        let longest = match read_value(v, None) {
            Ok(TensorData {
                values: Values::Str(s),
                ..
            }) => s.iter().map(|s| s.chars().count()).max().unwrap_or(0),
            _ => 0,
        };
        return numel * 4 * longest as u64;
    }
    numel * dtype_itemsize(dtype) as u64
}

/// Var names an op reads, once per binding, nested blocks' ops included; with `outputs`, also the
/// vars its nested blocks return (dead code elimination follows those, pymil's `child_ops` not).
fn reads<'a>(op: &'a Operation, outputs: bool, out: &mut Vec<&'a str>) {
    let mut params: Vec<_> = op.inputs.iter().collect();
    params.sort_by(|a, b| a.0.cmp(b.0));
    for (_, arg) in params {
        for b in &arg.arguments {
            if let Some(Binding::Name(n)) = &b.binding {
                out.push(n);
            }
        }
    }
    for inner in &op.blocks {
        for o in &inner.operations {
            reads(o, outputs, out);
        }
        if outputs {
            out.extend(inner.outputs.iter().map(|n| n.as_str()));
        }
    }
}

/// The values pymil's loader turns into `const` ops of their own, placed before `op`: its
/// arguments bound to literals and, for `constexpr_*` ops, their attributes (the builder makes a
/// const of every non-var input). A `const` op's `val` is the op itself.
fn extra_consts(op: &Operation) -> Vec<&Value> {
    if op.r#type == "const" {
        return Vec::new();
    }
    let mut out: Vec<&Value> = op
        .inputs
        .values()
        .flat_map(|a| a.arguments.iter())
        .filter_map(|b| match &b.binding {
            Some(Binding::Value(v)) => Some(v),
            _ => None,
        })
        .collect();
    if is_const_type(op) {
        out.extend(
            op.attributes
                .iter()
                .filter(|(k, _)| k.as_str() != "name")
                .map(|(_, v)| v),
        );
    }
    out
}

/// Dense bytes pymil counts for an op: its `const` value, or the consts it is loaded with.
fn op_bytes(op: &Operation) -> u64 {
    own_bytes(op) + extra_consts(op).into_iter().map(ndarray_bytes).sum::<u64>()
}

fn own_bytes(op: &Operation) -> u64 {
    match op.attributes.get("val") {
        Some(v) if op.r#type == "const" => ndarray_bytes(v),
        _ => 0,
    }
}

impl<'a> OpList<'a> {
    pub fn new(block: &'a Block, function_inputs: &'a [NamedValueType]) -> Self {
        let mut entries = Vec::new();
        let mut entry_of = Vec::with_capacity(block.operations.len());
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut producer = HashMap::new();
        let mut valued = HashSet::new();
        for (i, op) in block.operations.iter().enumerate() {
            let constant = is_const_type(op);
            for v in extra_consts(op) {
                entries.push((i, ndarray_bytes(v)));
            }
            entry_of.push(entries.len());
            entries.push((i, own_bytes(op)));
            let mut r = Vec::new();
            reads(op, false, &mut r);
            // pymil infers a value when every input has one and the op can be evaluated; the
            // converted programs have no such op left (coremltools' const_elimination folded
            // them), so only the plain all-inputs-constant case is followed here.
            let has_value = op.r#type == "const"
                || (!constant
                    && !op.r#type.starts_with("random")
                    && op.blocks.is_empty()
                    && !op.inputs.is_empty()
                    && r.iter().all(|n| valued.contains(n)));
            for n in r {
                consumers.entry(n).or_default().push(i);
            }
            for o in &op.outputs {
                producer.insert(o.name.as_str(), i);
                if has_value {
                    valued.insert(o.name.as_str());
                }
            }
        }
        Self {
            block,
            entries,
            entry_of,
            consumers,
            producer,
            valued,
            inputs: function_inputs.iter().map(|i| i.name.as_str()).collect(),
        }
    }

    /// Ops in pymil's list.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Dense weight bytes of the whole block.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.1).sum()
    }

    fn incision(&self, i: usize) -> Incision {
        let op = &self.block.operations[i];
        Incision {
            name: op_name(op).to_string(),
            op_type: op.r#type.clone(),
            index: self.entry_of[i],
            n_ops: self.entries.len(),
        }
    }

    /// The first op, in pymil's order, where the cumulative dense bytes reach `k/n` of the total,
    /// that is neither `const` nor `constexpr_*`, has one output and that output one consumer.
    fn split_op(&self, k: u64, n: u64) -> Option<usize> {
        let total = self.total_bytes() as u128;
        let mut cumulative: u128 = 0;
        for (e, &(i, bytes)) in self.entries.iter().enumerate() {
            cumulative += bytes as u128;
            let op = &self.block.operations[i];
            // Literal consts share their op's proto index; only the op itself is a candidate.
            if e == self.entry_of[i]
                && cumulative * n as u128 >= total * k as u128
                && !is_const_type(op)
                && op.outputs.len() == 1
                && self
                    .consumers
                    .get(op.outputs[0].name.as_str())
                    .is_some_and(|c| c.len() == 1)
            {
                return Some(i);
            }
        }
        None
    }

    /// Proto indices of the N-1 incision ops for `n` chunks.
    fn split_ops(&self, n: usize) -> Result<Vec<usize>> {
        let mut out: Vec<usize> = Vec::with_capacity(n.saturating_sub(1));
        for k in 1..n {
            let i = self
                .split_op(k as u64, n as u64)
                .ok_or_else(|| Error::Unsupported {
                    what: "program".into(),
                    reason: format!(
                        "no op to cut at {k}/{n} of the weights (an op that is not const, with one \
                         output read by one op, once the weights before it reach that share)"
                    ),
                })?;
            if out.last().is_some_and(|&p| p >= i) {
                return Err(Error::InvalidParameter {
                    name: "chunks",
                    value: n.to_string(),
                    expected: format!(
                        "a number of chunks whose cuts fall on different ops (cuts {} and {k} of \
                         {n} both land on op {})",
                        k - 1,
                        op_name(&self.block.operations[i])
                    ),
                });
            }
            out.push(i);
        }
        Ok(out)
    }

    /// Vars defined by non-constant ops at or before proto op `at` (pymil: `var.val is None`) and
    /// read by an op after it, in definition order.
    fn crossing(&self, at: usize) -> Vec<&'a str> {
        let mut out = Vec::new();
        for op in &self.block.operations[..=at] {
            if is_const_type(op) {
                continue;
            }
            for o in &op.outputs {
                let name = o.name.as_str();
                if self.valued.contains(name) {
                    continue;
                }
                if self
                    .consumers
                    .get(name)
                    .is_some_and(|c| c.iter().any(|&c| c > at))
                {
                    out.push(name);
                }
            }
        }
        out
    }

    fn var_type(&self, name: &str) -> Option<(DataType, Vec<usize>)> {
        let op = &self.block.operations[*self.producer.get(name)?];
        op.outputs
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.r#type.as_ref())
            .and_then(tensor_type)
    }
}

/// Dense weight bytes of a block as coremltools sums them to bisect: every `const` whose value is a
/// tensor of rank >= 1 (elements x numpy item size), literal arguments included; `constexpr_*`
/// ops and scalars do not count.
pub fn const_bytes(block: &Block) -> u64 {
    OpList::new(block, &[]).total_bytes()
}

fn main_parts(model: &Model) -> Result<(&[NamedValueType], &Block)> {
    let program = program_of(model).ok_or_else(|| Error::Unsupported {
        what: "model".into(),
        reason: "only ML programs can be chunked".into(),
    })?;
    if program.functions.len() != 1 {
        return Err(Error::Unsupported {
            what: "program".into(),
            reason: format!(
                "{} functions: only a program with a single `main` function can be chunked",
                program.functions.len()
            ),
        });
    }
    let (f, _, block) = main_block(program)?;
    Ok((&f.inputs, block))
}

/// coremltools' incision op for two chunks.
pub fn bisect_point(block: &Block) -> Result<Incision> {
    let list = OpList::new(block, &[]);
    let i = list.split_ops(2)?;
    Ok(list.incision(i[0]))
}

/// The incision ops for `n` chunks (k/n of the weights, k = 1..n-1).
pub fn incision_points(block: &Block, n: usize) -> Result<Vec<Incision>> {
    check_n(n)?;
    let list = OpList::new(block, &[]);
    Ok(list
        .split_ops(n)?
        .into_iter()
        .map(|i| list.incision(i))
        .collect())
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidParameter {
            name: "chunks",
            value: "0".into(),
            expected: "at least 1".into(),
        });
    }
    Ok(())
}

/// Which ops, inputs and outputs one chunk has.
struct Plan<'a> {
    ops: Vec<usize>,
    /// Original function inputs read (all of them for the first chunk), in their order.
    original_inputs: Vec<&'a str>,
    /// Vars of earlier chunks read, in definition order.
    cut_inputs: Vec<&'a str>,
    /// Vars handed to later chunks (empty for the last chunk, which has the original outputs).
    outputs: Vec<&'a str>,
    last: bool,
    const_bytes: u64,
}

fn plan<'a>(list: &OpList<'a>, cuts: &[usize]) -> Result<Vec<Plan<'a>>> {
    let block = list.block;
    let n_ops = block.operations.len();
    if n_ops == 0 {
        return Err(Error::Unsupported {
            what: "program".into(),
            reason: "its main block has no ops".into(),
        });
    }
    let mut plans = Vec::with_capacity(cuts.len() + 1);
    let mut lo: Option<usize> = None;
    for j in 0..=cuts.len() {
        let last = j == cuts.len();
        let hi = if last {
            n_ops.saturating_sub(1)
        } else {
            cuts[j]
        };
        let crossing_in = lo.map(|lo| list.crossing(lo)).unwrap_or_default();
        let cut_set: HashSet<&str> = crossing_in.iter().copied().collect();
        let outputs: Vec<&str> = if last {
            Vec::new()
        } else {
            let from = lo.map_or(0, |l| l + 1);
            list.crossing(hi)
                .into_iter()
                .filter(|v| list.producer.get(v).is_some_and(|&p| p >= from))
                .collect()
        };
        let mut roots: Vec<&str> = if last {
            block.outputs.iter().map(|s| s.as_str()).collect()
        } else {
            outputs.clone()
        };
        if !last && roots.is_empty() {
            return Err(Error::Unsupported {
                what: "program".into(),
                reason: format!(
                    "nothing crosses the cut after op {}: the ops before it do not feed the rest",
                    op_name(&block.operations[hi])
                ),
            });
        }
        // State updates are kept by coremltools' dead code elimination whether read or not.
        let from = lo.map_or(0, |l| l + 1);
        for op in &block.operations[from..=hi] {
            if op.r#type == "coreml_update_state" {
                roots.extend(op.outputs.iter().map(|o| o.name.as_str()));
            }
        }
        for r in &roots {
            if last && cut_set.contains(r) {
                return Err(Error::Unsupported {
                    what: "program".into(),
                    reason: format!(
                        "output {r} of the program is made before the last cut and read after it"
                    ),
                });
            }
        }
        let mut keep = vec![false; n_ops];
        let mut used_inputs: HashSet<&str> = HashSet::new();
        let mut used_cut: HashSet<&str> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut work = roots;
        while let Some(v) = work.pop() {
            if !seen.insert(v) {
                continue;
            }
            if cut_set.contains(v) {
                used_cut.insert(v);
                continue;
            }
            if list.inputs.contains(&v) {
                used_inputs.insert(v);
                continue;
            }
            let Some(&p) = list.producer.get(v) else {
                continue;
            };
            if p > hi {
                return Err(Error::Op {
                    op: op_name(&block.operations[p]).to_string(),
                    op_type: block.operations[p].r#type.clone(),
                    reason: format!("its output {v} is read before this op runs"),
                });
            }
            if !keep[p] {
                keep[p] = true;
                let mut r = Vec::new();
                reads(&block.operations[p], true, &mut r);
                work.extend(r);
            }
        }
        let ops: Vec<usize> = (0..n_ops).filter(|&i| keep[i]).collect();
        let own = |i: &usize| lo.is_none_or(|lo| *i > lo) && !is_const_type(&block.operations[*i]);
        if !ops.iter().any(own) {
            return Err(Error::Unsupported {
                what: "program".into(),
                reason: format!("chunk {} would have no op of its own", j + 1),
            });
        }
        let const_bytes = ops.iter().map(|&i| op_bytes(&block.operations[i])).sum();
        let original_inputs = list
            .inputs
            .iter()
            .copied()
            .filter(|n| lo.is_none() || used_inputs.contains(n))
            .collect();
        let cut_inputs = crossing_in
            .into_iter()
            .filter(|v| used_cut.contains(v))
            .collect();
        plans.push(Plan {
            ops,
            original_inputs,
            cut_inputs,
            outputs,
            last,
            const_bytes,
        });
        lo = Some(hi);
    }
    Ok(plans)
}

fn string_const(name: &str, s: &str) -> Result<Operation> {
    let val = immediate_value(&TensorData {
        dtype: DataType::String,
        shape: vec![],
        values: Values::Str(vec![s.to_string()]),
    })?;
    let name_val = name_value(name)?;
    let mut op = Operation {
        r#type: "const".into(),
        ..Default::default()
    };
    op.outputs.push(NamedValueType {
        name: name.to_string(),
        r#type: Some(make_tensor_type(DataType::String, &[])),
    });
    op.attributes.insert("val".into(), val);
    op.attributes.insert("name".into(), name_val);
    Ok(op)
}

fn name_value(name: &str) -> Result<Value> {
    immediate_value(&TensorData {
        dtype: DataType::String,
        shape: vec![],
        values: Values::Str(vec![name.to_string()]),
    })
}

fn cast_op(
    op_name: &str,
    x: &str,
    dtype_var: &str,
    out: &str,
    dtype: DataType,
    shape: &[usize],
) -> Result<Operation> {
    use coreml_proto::proto::mil_spec::{argument, Argument};
    let arg = |n: &str| Argument {
        arguments: vec![argument::Binding {
            binding: Some(Binding::Name(n.to_string())),
        }],
    };
    let mut op = Operation {
        r#type: "cast".into(),
        ..Default::default()
    };
    op.inputs.insert("x".into(), arg(x));
    op.inputs.insert("dtype".into(), arg(dtype_var));
    op.outputs.push(NamedValueType {
        name: out.to_string(),
        r#type: Some(make_tensor_type(dtype, shape)),
    });
    op.attributes.insert("name".into(), name_value(op_name)?);
    Ok(op)
}

fn rename_reads(op: &mut Operation, map: &HashMap<String, String>) {
    for arg in op.inputs.values_mut() {
        for b in &mut arg.arguments {
            if let Some(Binding::Name(n)) = &mut b.binding {
                if let Some(new) = map.get(n.as_str()) {
                    *n = new.clone();
                }
            }
        }
    }
    for inner in &mut op.blocks {
        for o in &mut inner.operations {
            rename_reads(o, map);
        }
        for n in &mut inner.outputs {
            if let Some(new) = map.get(n.as_str()) {
                *n = new.clone();
            }
        }
    }
}

fn collect_names(block: &Block, names: &mut HashSet<String>) {
    for op in &block.operations {
        names.insert(op_name(op).to_string());
        for o in &op.outputs {
            names.insert(o.name.clone());
        }
        for inner in &op.blocks {
            collect_names(inner, names);
        }
    }
}

/// The first unused `<base>_<i>`, i = `from`, `from`+1, ... (coremltools' `dedup_op_and_var_names`
/// renames a clash `<name>_1`, `<name>_2`, ...; pymil names an op's literal argument
/// `<op>_<param>_0`).
fn fresh(names: &mut HashSet<String>, base: &str, from: usize) -> String {
    let mut i = from;
    loop {
        let name = format!("{base}_{i}");
        if names.insert(name.clone()) {
            return name;
        }
        i += 1;
    }
}

fn array_type(var: &str, dtype: DataType) -> Result<ArrayDataType> {
    Ok(match dtype {
        DataType::Float16 => ArrayDataType::Float16,
        DataType::Float32 => ArrayDataType::Float32,
        DataType::Float64 => ArrayDataType::Double,
        DataType::Int32 => ArrayDataType::Int32,
        DataType::Int8 => ArrayDataType::Int8,
        other => {
            return Err(Error::Unsupported {
                what: format!("cut tensor {var}"),
                reason: format!(
                    "{} cannot be a model input or output (fp16, fp32, fp64, int32, int8 can)",
                    dtype_name(other)
                ),
            })
        }
    })
}

fn feature(name: &str, dtype: DataType, shape: &[usize]) -> Result<FeatureDescription> {
    Ok(FeatureDescription {
        name: name.to_string(),
        short_description: String::new(),
        r#type: Some(FeatureType {
            is_optional: false,
            r#type: Some(feature_type::Type::MultiArrayType(ArrayFeatureType {
                shape: shape.iter().map(|&d| d as i64).collect(),
                data_type: array_type(name, dtype)? as i32,
                shape_flexibility: None,
                default_optional_value: None,
            })),
        }),
    })
}

/// The type a cut var has at the chunk boundary: fp16 travels as fp32 (coremltools casts it).
fn boundary_dtype(dtype: DataType) -> DataType {
    if dtype == DataType::Float16 {
        DataType::Float32
    } else {
        dtype
    }
}

fn build(model: &Model, list: &OpList, p: &Plan) -> Result<Model> {
    let block = list.block;
    let mut names = HashSet::new();
    collect_names(block, &mut names);
    for i in list.inputs.iter() {
        names.insert(i.to_string());
    }
    let typed = |v: &str| {
        list.var_type(v).ok_or_else(|| Error::Unsupported {
            what: format!("cut tensor {v}"),
            reason: "not a tensor of constant shape".into(),
        })
    };
    let mut counter = 0usize;
    let mut cast_name = |names: &mut HashSet<String>| loop {
        let n = format!("cast_{counter}");
        counter += 1;
        if !names.contains(&n) {
            names.insert(n.clone());
            return n;
        }
    };

    // Inputs from earlier chunks: fp32 function inputs cast back to fp16. coremltools inserts each
    // cast (and its dtype const) where the var's producer was and then moves the cast to just
    // before its first use (`common::topological_reorder`), so the const stays at the producer's
    // place among the kept ops.
    let mut head: Vec<(usize, Operation)> = Vec::new();
    let mut renames: HashMap<String, String> = HashMap::new();
    let mut input_casts: Vec<(String, Operation)> = Vec::new();
    let mut new_inputs = Vec::new();
    let mut in_features = Vec::new();
    for &v in &p.cut_inputs {
        let (dtype, shape) = typed(v)?;
        new_inputs.push(NamedValueType {
            name: v.to_string(),
            r#type: Some(make_tensor_type(boundary_dtype(dtype), &shape)),
        });
        in_features.push(feature(v, boundary_dtype(dtype), &shape)?);
        if dtype == DataType::Float16 {
            let c = cast_name(&mut names);
            let dtype_var = fresh(&mut names, &format!("{c}_dtype"), 0);
            let at = list.producer.get(v).copied().unwrap_or(0);
            head.push((at, string_const(&dtype_var, "fp16")?));
            input_casts.push((
                v.to_string(),
                cast_op(&c, v, &dtype_var, &c, DataType::Float16, &shape)?,
            ));
            renames.insert(v.to_string(), c);
        }
    }

    // Outputs to later chunks: fp16 vars cast to fp32 under their own name, the original renamed.
    let mut tail_consts = Vec::new();
    let mut tail_casts = Vec::new();
    let mut out_features = Vec::new();
    for &v in &p.outputs {
        let (dtype, shape) = typed(v)?;
        out_features.push(feature(v, boundary_dtype(dtype), &shape)?);
        if dtype == DataType::Float16 {
            let renamed = fresh(&mut names, v, 1);
            let dtype_var = fresh(&mut names, &format!("{v}_dtype"), 0);
            let c = cast_name(&mut names);
            tail_consts.push(string_const(&dtype_var, "fp32")?);
            tail_casts.push(cast_op(
                &c,
                &renamed,
                &dtype_var,
                v,
                DataType::Float32,
                &shape,
            )?);
            renames.insert(v.to_string(), renamed);
        }
    }
    tail_casts.reverse();

    let mut ops = Vec::with_capacity(p.ops.len() + 2 * (head.len() + tail_casts.len()));
    let mut head = head.into_iter().peekable();
    let mut pending = input_casts;
    for &i in &p.ops {
        while let Some((_, c)) = head.next_if(|(at, _)| *at < i) {
            ops.push(c);
        }
        let mut op = block.operations[i].clone();
        if !pending.is_empty() {
            let mut r = Vec::new();
            reads(&op, true, &mut r);
            let (now, later): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|(v, _)| r.contains(&v.as_str()));
            ops.extend(now.into_iter().map(|(_, c)| c));
            pending = later;
        }
        rename_reads(&mut op, &renames);
        for o in &mut op.outputs {
            if let Some(new) = renames.get(&o.name) {
                if p.outputs.contains(&o.name.as_str()) {
                    o.name = new.clone();
                }
            }
        }
        ops.push(op);
    }
    ops.extend(head.map(|(_, c)| c));
    ops.extend(pending.into_iter().map(|(_, c)| c));
    ops.extend(tail_consts);
    ops.extend(tail_casts);

    let mut out = model.clone();
    let orig_in = out
        .description
        .as_ref()
        .map(|d| d.input.clone())
        .unwrap_or_default();
    let program = program_of_mut(&mut out).ok_or_else(|| Error::Unsupported {
        what: "model".into(),
        reason: "only ML programs can be chunked".into(),
    })?;
    let f = program
        .functions
        .get_mut("main")
        .ok_or_else(|| Error::Unsupported {
            what: "program".into(),
            reason: "no `main` function".into(),
        })?;
    let kept: Vec<NamedValueType> = f
        .inputs
        .iter()
        .filter(|i| p.original_inputs.contains(&i.name.as_str()))
        .cloned()
        .collect();
    let mut fn_inputs = kept;
    fn_inputs.extend(new_inputs);
    f.inputs = fn_inputs;
    let opset = f.opset.clone();
    let b = f
        .block_specializations
        .get_mut(&opset)
        .ok_or_else(|| Error::Unsupported {
            what: "main function".into(),
            reason: format!("no block for its opset {opset}"),
        })?;
    b.operations = ops;
    b.outputs = if p.last {
        block.outputs.clone()
    } else {
        p.outputs.iter().map(|s| s.to_string()).collect()
    };

    let desc = out.description.get_or_insert_with(Default::default);
    let mut inputs: Vec<FeatureDescription> = Vec::new();
    for name in &p.original_inputs {
        match orig_in.iter().find(|d| d.name == *name) {
            Some(d) => inputs.push(d.clone()),
            None => {
                return Err(Error::Unsupported {
                    what: format!("input {name}"),
                    reason: "not described in the model description".into(),
                })
            }
        }
    }
    inputs.extend(in_features);
    desc.input = inputs;
    if !p.last {
        desc.output = out_features;
    }
    Ok(out)
}

fn plans_for<'a>(list: &OpList<'a>, n: usize) -> Result<(Vec<usize>, Vec<Plan<'a>>)> {
    let cuts = list.split_ops(n)?;
    let plans = plan(list, &cuts)?;
    Ok((cuts, plans))
}

fn max_bytes(plans: &[Plan]) -> u64 {
    plans.iter().map(|p| p.const_bytes).max().unwrap_or(0)
}

/// Splits a model into chunks (see the module doc), in memory.
pub fn chunk_model(model: &Model, opts: &ChunkOptions) -> Result<ChunkedModel> {
    let (fn_inputs, block) = main_parts(model)?;
    let list = OpList::new(block, fn_inputs);
    let (cuts, plans) = match (opts.chunks, opts.max_chunk_bytes) {
        (Some(n), limit) => {
            check_n(n)?;
            let (cuts, plans) = plans_for(&list, n)?;
            if let Some(b) = limit {
                let worst = max_bytes(&plans);
                if worst > b {
                    return Err(Error::InvalidParameter {
                        name: "max_chunk_bytes",
                        value: b.to_string(),
                        expected: format!(
                            "at least {worst} for {n} chunks (the largest chunk's weights)"
                        ),
                    });
                }
            }
            (cuts, plans)
        }
        (None, Some(b)) => {
            let largest = list.entries.iter().map(|e| e.1).max().unwrap_or(0);
            let mut best: Option<u64> = None;
            let mut found = None;
            if largest <= b {
                for n in 1..=list.len().max(1) {
                    let Ok((cuts, plans)) = plans_for(&list, n) else {
                        break;
                    };
                    let worst = max_bytes(&plans);
                    best = Some(best.map_or(worst, |x: u64| x.min(worst)));
                    if worst <= b {
                        found = Some((cuts, plans));
                        break;
                    }
                }
            }
            match found {
                Some(f) => f,
                None => {
                    return Err(Error::InvalidParameter {
                        name: "max_chunk_bytes",
                        value: b.to_string(),
                        expected: format!(
                            "at least {} (the smallest largest-chunk size this program can be \
                             split into; its largest single weight is {largest} bytes)",
                            best.unwrap_or(largest).max(largest)
                        ),
                    });
                }
            }
        }
        (None, None) => plans_for(&list, 2)?,
    };
    let incisions = cuts.iter().map(|&i| list.incision(i)).collect();
    let mut cut_tensors = Vec::with_capacity(cuts.len());
    for &c in &cuts {
        let mut v = Vec::new();
        for name in list.crossing(c) {
            let (dtype, shape) = list.var_type(name).ok_or_else(|| Error::Unsupported {
                what: format!("cut tensor {name}"),
                reason: "not a tensor of constant shape".into(),
            })?;
            v.push((name.to_string(), dtype_name(dtype).to_string(), shape));
        }
        cut_tensors.push(v);
    }
    let mut models = Vec::with_capacity(plans.len());
    for p in &plans {
        models.push(build(model, &list, p)?);
    }
    Ok(ChunkedModel {
        incisions,
        cut_tensors,
        models,
        const_bytes: plans.iter().map(|p| p.const_bytes).collect(),
    })
}

/// Chunks the package `src` into `<out_dir>/<prefix>1.mlpackage`, ... (weights copied). On a
/// failure nothing this call wrote is left behind.
pub fn chunk_package(src: &Path, out_dir: &Path, opts: &ChunkOptions) -> Result<ChunkReport> {
    if opts.prefix.is_empty()
        || opts.prefix.contains(['/', '\\'])
        || opts.prefix == "."
        || opts.prefix == ".."
    {
        return Err(Error::InvalidParameter {
            name: "prefix",
            value: opts.prefix.clone(),
            expected: "a non-empty file name without path separators".into(),
        });
    }
    let pkg = MlPackage::open(src)?;
    pkg.program()?;
    let chunked = chunk_model(&pkg.model, opts)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut written: Vec<PathBuf> = Vec::new();
    let mut chunks = Vec::new();
    let result = (|| -> Result<()> {
        for (k, mut m) in chunked.models.into_iter().enumerate() {
            let dest = out_dir.join(format!("{}{}.mlpackage", opts.prefix, k + 1));
            let desc = m.description.clone().unwrap_or_default();
            let path = write_package(&mut m, pkg.weights.as_ref(), &dest)?;
            written.push(path.clone());
            chunks.push(ChunkSummary {
                path,
                const_bytes: chunked.const_bytes[k],
                inputs: desc.input.iter().map(|d| d.name.clone()).collect(),
                outputs: desc.output.iter().map(|d| d.name.clone()).collect(),
            });
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in &written {
            let _ = std::fs::remove_dir_all(p);
        }
        return Err(e);
    }
    Ok(ChunkReport {
        incisions: chunked.incisions,
        cut_tensors: chunked.cut_tensors,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use coreml_proto::proto::mil_spec::{argument, Argument, Function, Program};
    use coreml_proto::proto::{model, ModelDescription};
    use half::f16;

    fn fp16(n: usize) -> TensorData {
        TensorData {
            dtype: DataType::Float16,
            shape: vec![n],
            values: Values::F16(vec![f16::from_f32(0.5); n]),
        }
    }

    enum A {
        Var(&'static str),
        Lit(TensorData),
    }

    fn op(ty: &str, out: &str, n: usize, args: &[(&str, A)]) -> Operation {
        let mut o = Operation {
            r#type: ty.into(),
            ..Default::default()
        };
        for (param, a) in args {
            let binding = match a {
                A::Var(name) => Binding::Name(name.to_string()),
                A::Lit(t) => Binding::Value(immediate_value(t).unwrap()),
            };
            o.inputs.insert(
                param.to_string(),
                Argument {
                    arguments: vec![argument::Binding {
                        binding: Some(binding),
                    }],
                },
            );
        }
        o.outputs.push(NamedValueType {
            name: out.into(),
            r#type: Some(make_tensor_type(DataType::Float16, &[n])),
        });
        o.attributes.insert("name".into(), name_value(out).unwrap());
        o
    }

    fn weight(out: &str, n: usize) -> Operation {
        let mut o = op("const", out, n, &[]);
        o.attributes
            .insert("val".into(), immediate_value(&fp16(n)).unwrap());
        o
    }

    /// x -> a = x + w1 -> b = a * a -> c = b + w2 -> d = c * literal -> e = d + c.
    fn model() -> Model {
        let n = 4;
        let ops = vec![
            weight("w1", 100),
            op("add", "a", n, &[("x", A::Var("x")), ("y", A::Var("w1"))]),
            op("mul", "b", n, &[("x", A::Var("a")), ("y", A::Var("a"))]),
            weight("w2", 100),
            op("add", "c", n, &[("x", A::Var("b")), ("y", A::Var("w2"))]),
            op(
                "mul",
                "d",
                n,
                &[("x", A::Var("c")), ("y", A::Lit(fp16(50)))],
            ),
            op("add", "e", n, &[("x", A::Var("d")), ("y", A::Var("c"))]),
        ];
        let block = Block {
            outputs: vec!["e".into()],
            operations: ops,
            ..Default::default()
        };
        let input = NamedValueType {
            name: "x".into(),
            r#type: Some(make_tensor_type(DataType::Float16, &[n])),
        };
        let f = Function {
            inputs: vec![input],
            opset: "CoreML6".into(),
            block_specializations: [("CoreML6".to_string(), block)].into_iter().collect(),
            ..Default::default()
        };
        let program = Program {
            version: 1,
            functions: [("main".to_string(), f)].into_iter().collect(),
            ..Default::default()
        };
        Model {
            specification_version: 7,
            description: Some(ModelDescription {
                input: vec![feature("x", DataType::Float16, &[n]).unwrap()],
                output: vec![feature("e", DataType::Float16, &[n]).unwrap()],
                ..Default::default()
            }),
            r#type: Some(model::Type::MlProgram(program)),
            ..Default::default()
        }
    }

    #[test]
    fn incision_counts_literals_as_consts_and_double_reads_as_two_consumers() {
        let m = model();
        let (_, block) = main_parts(&m).unwrap();
        // 200 + 200 weight bytes and a 100-byte literal: half is reached at w2, `c` has two
        // readers, the literal is an op of its own before `d`.
        assert_eq!(const_bytes(block), 500);
        let inc = bisect_point(block).unwrap();
        assert_eq!((inc.name.as_str(), inc.index, inc.n_ops), ("d", 6, 8));

        let chunked = chunk_model(&m, &ChunkOptions::default()).unwrap();
        let names: Vec<_> = chunked.cut_tensors[0]
            .iter()
            .map(|c| c.0.as_str())
            .collect();
        assert_eq!(names, ["c", "d"]);
        assert_eq!(chunked.const_bytes, vec![500, 0]);
        let (f1, b1) = main_parts(&chunked.models[0]).unwrap();
        let types: Vec<_> = b1.operations.iter().map(|o| o.r#type.as_str()).collect();
        assert_eq!(
            types,
            ["const", "add", "mul", "const", "add", "mul", "const", "const", "cast", "cast"]
        );
        assert_eq!(b1.outputs, ["c", "d"]);
        assert_eq!(f1[0].name, "x");
        let renamed: Vec<_> = b1
            .operations
            .iter()
            .map(|o| o.outputs[0].name.as_str())
            .collect();
        assert_eq!(&renamed[4..6], ["c_1", "d_1"]);
        let (f2, b2) = main_parts(&chunked.models[1]).unwrap();
        let inputs: Vec<_> = f2.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(inputs, ["c", "d"]);
        let types: Vec<_> = b2.operations.iter().map(|o| o.r#type.as_str()).collect();
        assert_eq!(types, ["const", "const", "cast", "cast", "add"]);
        assert_eq!(b2.outputs, ["e"]);
        let d = chunked.models[1].description.as_ref().unwrap();
        assert_eq!(d.input.len(), 2);
        assert_eq!(d.output[0].name, "e");
    }

    #[test]
    fn too_many_chunks_and_empty_programs_are_errors() {
        let m = model();
        let many = ChunkOptions {
            chunks: Some(6),
            ..Default::default()
        };
        assert!(chunk_model(&m, &many).is_err());
        assert!(bisect_point(&Block::default()).is_err());
        let one = ChunkOptions {
            chunks: Some(1),
            ..Default::default()
        };
        let whole = chunk_model(&m, &one).unwrap();
        assert_eq!(whole.models.len(), 1);
        assert_eq!(whole.const_bytes, vec![500]);
    }
}
