"""Loads the packages sdrs wrote with coremltools (the tool they must interoperate with) and checks
them against the fixture packages coremltools wrote for the same operation.

Usage: check_with_coremltools.py CASES.tsv
CASES.tsv: one case per line, tab-separated: name, our package, coremltools' package (or empty),
and what to compare ("io", "values", or "load" when there is no package to compare with).
- every package loads (`MLModel(skip_model_load=True)`, the MIL program with its weights);
- "io": the same inputs and outputs (names, types, shapes) as "theirs", and the same op counts;
- "values": additionally every constexpr op's materialised value equal to the op of the same
  output name in "theirs" (for k-means only where coremltools' exact path applies: >= 10,000
  elements), and every const value equal.
Prints one line per case and "N passed, N failed".
"""

import sys
from collections import Counter

import numpy as np
import coremltools as ct
from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
from coremltools.models.utils import _try_get_weights_dir_path


def load(path):
    model = ct.models.MLModel(path, skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_load(spec, spec.specificationVersion, _try_get_weights_dir_path(path))
    return spec, prog


def io(spec):
    def feats(lst):
        out = []
        for f in lst:
            t = f.type.WhichOneof("Type")
            shape = list(f.type.multiArrayType.shape) if t == "multiArrayType" else []
            dtype = f.type.multiArrayType.dataType if t == "multiArrayType" else None
            out.append((f.name, t, dtype, tuple(shape)))
        return sorted(out)

    return feats(spec.description.input), feats(spec.description.output)


def ops_of(prog):
    return list(prog.functions["main"].operations)


def values(prog):
    """Name -> (value, deterministic) for every const op and constexpr op: the materialised
    value of each constexpr op under its output name and its operands as "<output>.<param>"
    (the loader names the consts it makes for literal operands with a process-wide counter, so
    those names differ between two loads). coremltools' result is deterministic everywhere except
    k-means on tables of fewer than 10,000 values (its scikit-learn path starts from a random
    initialisation)."""
    out = {}
    feeding = set()
    for op in ops_of(prog):
        if op.op_type.startswith("constexpr_"):
            val = op.materialized_val_inference()
            exact = True
            if op.op_type == "constexpr_lut_to_dense":
                lut = op.lut.val
                tables = int(np.prod(lut.shape[:-2])) if lut.ndim > 2 else 1
                exact = val.size // tables >= 10000
            name = op.outputs[0].name
            out[name] = (val, exact)
            for param, var in op.inputs.items():
                feeding.add(var.name)
                if param != "name":
                    out[f"{name}.{param}"] = (var.val, exact)
    for op in ops_of(prog):
        if op.op_type == "const" and op.outputs[0].name not in feeding:
            out[op.outputs[0].name] = (op.outputs[0].val, True)
    return out


def check(case):
    spec, prog = load(case["ours"])
    problems = []
    if case.get("theirs"):
        tspec, tprog = load(case["theirs"])
        if io(spec) != io(tspec):
            problems.append(f"inputs/outputs differ: {io(spec)} vs {io(tspec)}")
        ours_ops = Counter(op.op_type for op in ops_of(prog))
        theirs_ops = Counter(op.op_type for op in ops_of(tprog))
        if ours_ops != theirs_ops:
            diff = {k: (ours_ops[k], theirs_ops[k]) for k in set(ours_ops) | set(theirs_ops) if ours_ops[k] != theirs_ops[k]}
            problems.append(f"op counts differ (ours, theirs): {diff}")
        if case.get("compare") == "values":
            ov, tv = values(prog), values(tprog)
            compared = 0
            for name, (t, exact) in tv.items():
                if name not in ov:
                    problems.append(f"{name} missing")
                    continue
                o = ov[name][0]
                if not isinstance(t, np.ndarray) or not exact:
                    continue
                compared += 1
                if o.shape != t.shape or o.dtype != t.dtype or not np.array_equal(o, t):
                    problems.append(f"{name}: values differ")
            if compared == 0:
                problems.append("no values compared")
    else:
        # No package of coremltools' to compare with: every constexpr must materialise.
        for op in ops_of(prog):
            if op.op_type.startswith("constexpr_"):
                op.materialized_val_inference()
    return problems


def main():
    cases = []
    for line in open(sys.argv[1]):
        name, ours, theirs, compare = line.rstrip("\n").split("\t")
        cases.append({"name": name, "ours": ours, "theirs": theirs or None, "compare": compare})
    passed = failed = 0
    for case in cases:
        try:
            problems = check(case)
        except Exception as e:  # a package coremltools cannot load at all
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            failed += 1
            print(f"{case['name']}: FAIL")
            for p in problems[:10]:
                print(f"    {p}")
        else:
            passed += 1
            print(f"{case['name']}: pass")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
