//! Reading a MIL program: the `main` function's block, op names, inputs bound by name or by value,
//! attributes, and the constants behind a var.

use std::collections::HashMap;

use coreml_proto::proto::mil_spec::{
    argument::binding::Binding, Block, DataType, Function, Operation, Program, Value,
};

use crate::blob::BlobFile;
use crate::error::{Error, Result};
use crate::value::{read_value, tensor_type, TensorData, Values};

/// The `main` function, its opset (the key of its block specialization) and that block.
pub fn main_block(p: &Program) -> Result<(&Function, &str, &Block)> {
    let f = p.functions.get("main").ok_or_else(|| Error::Unsupported {
        what: "program".into(),
        reason: format!(
            "no `main` function (functions: {:?})",
            p.functions.keys().collect::<Vec<_>>()
        ),
    })?;
    let block = f
        .block_specializations
        .get(&f.opset)
        .ok_or_else(|| Error::Unsupported {
            what: "main function".into(),
            reason: format!("no block for its opset {}", f.opset),
        })?;
    Ok((f, f.opset.as_str(), block))
}

pub fn main_block_mut(p: &mut Program) -> Result<&mut Block> {
    let f = p
        .functions
        .get_mut("main")
        .ok_or_else(|| Error::Unsupported {
            what: "program".into(),
            reason: "no `main` function".into(),
        })?;
    let opset = f.opset.clone();
    f.block_specializations
        .get_mut(&opset)
        .ok_or_else(|| Error::Unsupported {
            what: "main function".into(),
            reason: format!("no block for its opset {opset}"),
        })
}

/// An op's `name` attribute (what coremltools calls `op.name`); falls back to its first output.
pub fn op_name(op: &Operation) -> &str {
    if let Some(v) = op.attributes.get("name") {
        if let Some(s) = string_value(v) {
            return s;
        }
    }
    op.outputs.first().map(|o| o.name.as_str()).unwrap_or("")
}

fn string_value(v: &Value) -> Option<&str> {
    use coreml_proto::proto::mil_spec::tensor_value::Value as Tv;
    use coreml_proto::proto::mil_spec::value::{immediate_value::Value as Iv, Value as V};
    match &v.value {
        Some(V::ImmediateValue(iv)) => match &iv.value {
            Some(Iv::Tensor(t)) => match &t.value {
                Some(Tv::Strings(s)) => s.values.first().map(|s| s.as_str()),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// The var names an op reads (bound by name), in argument order; parameters in name order.
pub fn input_var_names(op: &Operation) -> Vec<&str> {
    let mut params: Vec<_> = op.inputs.iter().collect();
    params.sort_by(|a, b| a.0.cmp(b.0));
    params
        .into_iter()
        .flat_map(|(_, arg)| arg.arguments.iter())
        .filter_map(|b| match &b.binding {
            Some(Binding::Name(n)) => Some(n.as_str()),
            _ => None,
        })
        .collect()
}

/// The single argument bound to parameter `param`: a var name or a literal value.
pub enum Arg<'a> {
    Var(&'a str),
    Value(&'a Value),
}

pub fn input_arg<'a>(op: &'a Operation, param: &str) -> Option<Arg<'a>> {
    let arg = op.inputs.get(param)?;
    match &arg.arguments.first()?.binding {
        Some(Binding::Name(n)) => Some(Arg::Var(n)),
        Some(Binding::Value(v)) => Some(Arg::Value(v)),
        None => None,
    }
}

/// The value of a `const` op (its `val` attribute).
pub fn const_val(op: &Operation) -> Option<&Value> {
    if op.r#type == "const" {
        op.attributes.get("val")
    } else {
        None
    }
}

/// Dtype and shape of an op's first output.
pub fn output_type(op: &Operation) -> Option<(DataType, Vec<usize>)> {
    op.outputs
        .first()
        .and_then(|o| o.r#type.as_ref())
        .and_then(tensor_type)
}

/// The `const` op producing each var of the block, by var name.
pub fn const_producers(block: &Block) -> HashMap<&str, &Operation> {
    let mut m = HashMap::new();
    for op in &block.operations {
        if op.r#type == "const" {
            for o in &op.outputs {
                m.insert(o.name.as_str(), op);
            }
        }
    }
    m
}

/// Reads the constant an op input is bound to, following a var to its `const` op.
pub fn const_input(
    op: &Operation,
    param: &str,
    consts: &HashMap<&str, &Operation>,
    blobs: Option<&BlobFile>,
) -> Result<TensorData> {
    let missing = |reason: String| Error::Op {
        op: op_name(op).to_string(),
        op_type: op.r#type.clone(),
        reason,
    };
    match input_arg(op, param) {
        Some(Arg::Value(v)) => read_value(v, blobs),
        Some(Arg::Var(name)) => {
            let c = consts
                .get(name)
                .and_then(|c| const_val(c))
                .ok_or_else(|| missing(format!("input {param} = {name} is not a constant")))?;
            read_value(c, blobs)
        }
        None => Err(missing(format!("no input {param}"))),
    }
}

/// Reads an attribute of an op as a constant (the iOS16 constexpr forms keep theirs there).
pub fn attribute(op: &Operation, key: &str, blobs: Option<&BlobFile>) -> Result<TensorData> {
    let v = op.attributes.get(key).ok_or_else(|| Error::Op {
        op: op_name(op).to_string(),
        op_type: op.r#type.clone(),
        reason: format!("no attribute {key}"),
    })?;
    read_value(v, blobs)
}

/// An integer scalar or the first element of an integer tensor.
pub fn as_int(t: &TensorData) -> Option<i64> {
    match &t.values {
        Values::Int(v) => v.first().copied(),
        _ => None,
    }
}

/// Calls `f` on every value stored in the block (op attributes, literal inputs), nested blocks
/// included.
pub fn for_each_value_mut(
    block: &mut Block,
    f: &mut dyn FnMut(&mut Value) -> Result<()>,
) -> Result<()> {
    for v in block.attributes.values_mut() {
        f(v)?;
    }
    for op in &mut block.operations {
        for v in op.attributes.values_mut() {
            f(v)?;
        }
        for arg in op.inputs.values_mut() {
            for b in &mut arg.arguments {
                if let Some(Binding::Value(v)) = &mut b.binding {
                    f(v)?;
                }
            }
        }
        for inner in &mut op.blocks {
            for_each_value_mut(inner, f)?;
        }
    }
    Ok(())
}
