"""Prints the Markdown table of `run.sh` from its JSON files: per part and dtype, sdrs' and
PyTorch's median seconds and their ratio, then per part sdrs' faster dtype against PyTorch's."""
import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", default="")
    parser.add_argument("--isa", default="")
    parser.add_argument("--cores", default="")
    parser.add_argument("work")
    parser.add_argument("dtypes", nargs="+")
    args = parser.parse_args()
    runs = {}
    for dtype in args.dtypes:
        for side in ("sdrs", "torch"):
            with open(os.path.join(args.work, f"{side}-{dtype}.json")) as file:
                runs[side, dtype] = json.load(file)
    first = runs["sdrs", args.dtypes[0]]
    torch_runtime = runs["torch", args.dtypes[0]]["runtime"]
    print(f"{first['model']} at {first['size']}x{first['size']} on {args.cpu or 'this CPU'} "
          f"({args.isa}, {args.cores} cores), {first['threads']} threads, one run; "
          f"sdrs kernels: {first['kernels']}; PyTorch: {torch_runtime}")
    print()
    print("| part | dtype | sdrs median s | PyTorch median s | sdrs / PyTorch | sdrs GFLOP/s | PyTorch GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    best = {}
    for dtype in args.dtypes:
        ours = {r["part"]: r for r in runs["sdrs", dtype]["results"]}
        theirs = {r["part"]: r for r in runs["torch", dtype]["results"]}
        for part, mine in ours.items():
            other = theirs.get(part)
            if other is None:
                continue
            ratio = mine["median_s"] / other["median_s"]
            gflops = mine.get("gflop_per_s")
            print(f"| {part} | {dtype} | {mine['median_s']:.2f} | {other['median_s']:.2f} | {ratio:.2f} | "
                  f"{gflops:.0f} | {other['gflop_per_s']:.0f} |" if gflops else
                  f"| {part} | {dtype} | {mine['median_s']:.2f} | {other['median_s']:.2f} | {ratio:.2f} | | "
                  f"{other['gflop_per_s']:.0f} |")
            entry = best.setdefault(part, {})
            for side, record in (("sdrs", mine), ("torch", other)):
                if side not in entry or record["median_s"] < entry[side][1]:
                    entry[side] = (dtype, record["median_s"])
    print()
    for part, entry in best.items():
        (our_dtype, ours), (their_dtype, theirs) = entry["sdrs"], entry["torch"]
        print(f"- {part}: sdrs {ours:.2f} s ({our_dtype}) vs PyTorch's faster {theirs:.2f} s "
              f"({their_dtype}): **{ours / theirs:.2f}x** (target <= 0.80x)")


if __name__ == "__main__":
    main()
