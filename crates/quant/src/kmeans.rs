//! Exact weighted 1-D k-means (Grønlund et al., "Fast Exact k-Means, k-Medians and Bregman
//! Divergence Clustering in 1D", 2017, section 2.2: a dynamic program over sorted values whose
//! rows are minimised by SMAWK) with the float operations, order of summation and tie-breaking of
//! kmeans1d's `cluster_with_weights` as coremltools 9.0 vendors it (`deps/kmeans1d`), and
//! [`palettize_f16`], coremltools' k-means lookup table for a float16 tensor
//! (`quantization_utils._get_kmeans_lookup_table_and_weight`).

use half::f16;

use crate::{Error, Result};

/// Prefix sums over the sorted values (weights, weighted values, weighted squares), so that a
/// cluster's cost is O(1). The sums run left to right in f64 as kmeans1d's
/// `WeightedCostCalculator` does: the DP's ties (and so the clusters) depend on these roundings.
struct Costs {
    cumw: Vec<f64>,
    cumsum: Vec<f64>,
    cumsum2: Vec<f64>,
}

impl Costs {
    fn new(values: &[f64], weights: &[f64]) -> Self {
        let n = values.len();
        let mut cumw = Vec::with_capacity(n + 1);
        let mut cumsum = Vec::with_capacity(n + 1);
        let mut cumsum2 = Vec::with_capacity(n + 1);
        let (mut w_acc, mut s_acc, mut s2_acc) = (0.0f64, 0.0f64, 0.0f64);
        cumw.push(w_acc);
        cumsum.push(s_acc);
        cumsum2.push(s2_acc);
        for (&x, &w) in values.iter().zip(weights) {
            w_acc += w;
            s_acc += w * x;
            s2_acc += w * x * x;
            cumw.push(w_acc);
            cumsum.push(s_acc);
            cumsum2.push(s2_acc);
        }
        Self {
            cumw,
            cumsum,
            cumsum2,
        }
    }

    /// Total weight of the values `i..=j` (0 when `j < i`).
    #[inline]
    fn weight(&self, i: usize, j: usize) -> f64 {
        if i <= j {
            self.cumw[j + 1] - self.cumw[i]
        } else {
            0.0
        }
    }

    /// Weighted squared distances of the values `i..=j` to their weighted mean (0 when `j < i`),
    /// expanded as `sum w x^2 + W mu^2 - 2 mu sum w x` in that order, as kmeans1d computes it.
    #[inline]
    fn cost(&self, i: usize, j: usize) -> f64 {
        if j < i {
            return 0.0;
        }
        let w = self.weight(i, j);
        let sum = self.cumsum[j + 1] - self.cumsum[i];
        let mu = sum / w;
        let mut result = self.cumsum2[j + 1] - self.cumsum2[i];
        result += w * (mu * mu);
        result -= (2.0 * mu) * sum;
        result
    }
}

/// Row minima of the implicit totally monotone matrix `lookup(row, col)` over `rows` x `cols`
/// (SMAWK), written into `result[row]`. Ties keep the leftmost surviving column, as kmeans1d's
/// `_smawk`: the reduce step drops a column only when the new one is strictly smaller, the
/// interpolation step moves only on a strictly smaller value. `col_pos` is scratch indexed by
/// column (one slot per column of the whole matrix).
fn smawk<F: Fn(usize, usize) -> f64>(
    rows: &[usize],
    cols: &[usize],
    lookup: &F,
    result: &mut [usize],
    col_pos: &mut [usize],
) {
    if rows.is_empty() || cols.is_empty() {
        return;
    }

    // Reduce: keep at most one candidate column per row.
    let mut kept: Vec<usize> = Vec::with_capacity(rows.len().min(cols.len()));
    for &col in cols {
        while let Some(&last) = kept.last() {
            let row = rows[kept.len() - 1];
            if lookup(row, col) >= lookup(row, last) {
                break;
            }
            kept.pop();
        }
        if kept.len() < rows.len() {
            kept.push(col);
        }
    }

    let odd_rows: Vec<usize> = rows.iter().skip(1).step_by(2).copied().collect();
    smawk(&odd_rows, &kept, lookup, result, col_pos);

    // The recursion is done with `col_pos`: this level's positions can overwrite its entries.
    for (pos, &col) in kept.iter().enumerate() {
        col_pos[col] = pos;
    }

    // Interpolate the even rows between their odd neighbours' minima.
    let mut start = 0;
    for r in (0..rows.len()).step_by(2) {
        let row = rows[r];
        let stop = if r + 1 < rows.len() {
            col_pos[result[rows[r + 1]]]
        } else {
            kept.len() - 1
        };
        let mut argmin = kept[start];
        let mut min = lookup(row, argmin);
        if stop > start {
            for &col in &kept[start + 1..=stop] {
                let value = lookup(row, col);
                if value < min {
                    argmin = col;
                    min = value;
                }
            }
        }
        result[row] = argmin;
        start = stop;
    }
}

/// coremltools palettizes a float16 tensor with this exact k-means from this many elements on;
/// smaller ones go to scikit-learn's randomly initialised k-means, which sdrs does not reproduce
/// (it uses the exact k-means for every size).
pub const COREMLTOOLS_EXACT_MIN_ELEMENTS: usize = 10_000;

/// Optimal weighted k-means of the strictly ascending `values` (each with its positive
/// `weights` entry): the cluster of each value (`0..k`, ascending with the values) and the
/// centroids (weighted means, ascending), minimising the weighted sum of squared distances.
///
/// `k` larger than the number of values is lowered to it, as kmeans1d does. The result is the
/// one kmeans1d 0.5.0 / coremltools 9.0 return, bit for bit: the same O(k n) dynamic program
/// (SMAWK per cluster count), the same f64 prefix sums, the same tie-breaking, and the same
/// running-mean centroids. Memory: `k * n` 32-bit back-pointers.
pub fn cluster(values: &[f64], weights: &[f64], k: usize) -> Result<(Vec<usize>, Vec<f64>)> {
    let n = values.len();
    if n == 0 {
        return Err(Error::InvalidParameter {
            name: "values",
            value: "[] (no values)".into(),
            expected: "at least one value to cluster".into(),
        });
    }
    if weights.len() != n {
        return Err(Error::InvalidParameter {
            name: "weights",
            value: format!("{} weights", weights.len()),
            expected: format!("one weight per value ({n})"),
        });
    }
    if k == 0 {
        return Err(Error::InvalidParameter {
            name: "k",
            value: "0".into(),
            expected: "at least one cluster".into(),
        });
    }
    if u32::try_from(n).is_err() {
        return Err(Error::InvalidParameter {
            name: "values",
            value: format!("{n} values"),
            expected: format!("at most {} values", u32::MAX),
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidParameter {
            name: "values",
            value: format!("{} at index {i}", values[i]),
            expected: "finite values".into(),
        });
    }
    if let Some(i) = values.windows(2).position(|p| p[0] >= p[1]) {
        return Err(Error::InvalidParameter {
            name: "values",
            value: format!("{} at index {i} then {}", values[i], values[i + 1]),
            expected: "strictly ascending values (distinct, sorted)".into(),
        });
    }
    if let Some(i) = weights.iter().position(|w| !(w.is_finite() && *w > 0.0)) {
        return Err(Error::InvalidParameter {
            name: "weights",
            value: format!("{} at index {i}", weights[i]),
            expected: "finite positive weights".into(),
        });
    }
    let k = k.min(n);

    let costs = Costs::new(values, weights);
    // `prev[i]`: the least cost of the values 0..=i in (layer - 1) + 1 clusters.
    let mut prev: Vec<f64> = (0..n).map(|i| costs.cost(0, i)).collect();
    let mut cur = vec![0.0f64; n];
    // `starts[layer * n + i]`: where the last of layer + 1 clusters over 0..=i begins.
    let mut starts = vec![0u32; k * n];
    let all: Vec<usize> = (0..n).collect();
    let mut argmins = vec![0usize; n];
    let mut col_pos = vec![0usize; n];

    for layer in 1..k {
        // Row i, column j: the last cluster is j..=i after the best of the values before it.
        // For j == 0 kmeans1d's `j - 1` wraps around (unsigned), which picks `prev[i]`; for
        // j > i the cluster is empty. Both kept as they are: they take part in the ties.
        let lookup = |i: usize, j: usize| -> f64 {
            let col = if j == 0 { i } else { i.min(j - 1) };
            prev[col] + costs.cost(j, i)
        };
        smawk(&all, &all, &lookup, &mut argmins, &mut col_pos);
        let row_starts = &mut starts[layer * n..(layer + 1) * n];
        for (i, (&argmin, (d, t))) in argmins
            .iter()
            .zip(cur.iter_mut().zip(row_starts.iter_mut()))
            .enumerate()
        {
            *d = lookup(i, argmin);
            // `argmin < n <= u32::MAX`, checked above.
            *t = argmin as u32;
        }
        std::mem::swap(&mut prev, &mut cur);
    }

    // Walk the back-pointers from the last value; each centroid is a running weighted mean.
    let mut clusters = vec![0usize; n];
    let mut centroids = vec![0.0f64; k];
    let mut end = n;
    let mut last = n - 1;
    let mut layer = k - 1;
    loop {
        let start = starts[layer * n + last] as usize;
        let mut centroid = 0.0f64;
        for i in start..end {
            clusters[i] = layer;
            centroid += (values[i] - centroid) * costs.weight(i, i) / costs.weight(start, i);
        }
        centroids[layer] = centroid;
        if start == 0 || layer == 0 {
            break;
        }
        layer -= 1;
        last = start - 1;
        end = start;
    }
    Ok((clusters, centroids))
}

/// `x` rounded to the nearest float16 (ties to even) in one step, as numpy's
/// `astype(float16)` rounds a float64. (`half`'s `f16::from_f64` goes through f32 or drops the
/// low mantissa bits, so it can round twice.)
pub(crate) fn f16_from_f64(x: f64) -> f16 {
    if !x.is_finite() {
        return f16::from_f64(x);
    }
    let a = x.abs();
    // Spacing of the f16 values near `a`: 2^(e - 10) for a in [2^e, 2^(e+1)), and the
    // subnormal spacing 2^-24 below 2^-14.
    let exp = ((a.to_bits() >> 52) as i32 - 1023).max(-14);
    let ulp = f64::from_bits(((exp - 10 + 1023) as u64) << 52);
    // Scaling by a power of two is exact, so is the rounded quotient times it: `r` is an f16
    // value (or 65536, which converts to infinity as it should).
    let r = (a / ulp).round_ties_even() * ulp;
    f16::from_f64(r.copysign(x))
}

/// Bits of `v` with -0 folded into +0 (numpy's `unique` holds them equal).
#[inline]
fn canonical_bits(v: f16) -> u16 {
    match v.to_bits() {
        0x8000 => 0,
        b => b,
    }
}

/// The float64 lookup table (`2^nbits` entries, unused ones 0) and one index per element of the
/// k-means palettization of `w`: what [`palettize_f16`] returns before casting the table to
/// float16.
pub fn palettize_f16_centroids(w: &[f16], nbits: u32) -> Result<(Vec<f64>, Vec<u8>)> {
    if !(1..=8).contains(&nbits) {
        return Err(Error::InvalidParameter {
            name: "nbits",
            value: nbits.to_string(),
            expected: "1 to 8 bits per index".into(),
        });
    }
    if w.is_empty() {
        return Err(Error::InvalidParameter {
            name: "weight",
            value: "[] (no elements)".into(),
            expected: "at least one element to palettize".into(),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidParameter {
            name: "weight",
            value: format!("{} at element {i}", w[i]),
            expected: "finite values to palettize".into(),
        });
    }

    // np.unique(w, return_inverse=True, return_counts=True), over the 2^16 bit patterns.
    let mut counts = vec![0u64; 1 << 16];
    for &v in w {
        counts[canonical_bits(v) as usize] += 1;
    }
    let mut distinct: Vec<u16> = (0..=u16::MAX).filter(|&b| counts[b as usize] > 0).collect();
    distinct.sort_by(|&a, &b| {
        f16::from_bits(a)
            .to_f32()
            .total_cmp(&f16::from_bits(b).to_f32())
    });
    let values: Vec<f64> = distinct
        .iter()
        .map(|&b| f16::from_bits(b).to_f64())
        .collect();
    // Counts are exact in f64 (below 2^53), as numpy's int64 counts passed as C doubles.
    let weights: Vec<f64> = distinct
        .iter()
        .map(|&b| counts[b as usize] as f64)
        .collect();

    let lut_len = 1usize << nbits;
    let k = values.len().min(lut_len);
    let (clusters, centroids) = cluster(&values, &weights, k)?;

    let mut slot_cluster = vec![0u8; 1 << 16];
    for (&b, &c) in distinct.iter().zip(&clusters) {
        // `c < k <= 256`.
        slot_cluster[b as usize] = c as u8;
    }
    let indices = w
        .iter()
        .map(|&v| slot_cluster[canonical_bits(v) as usize])
        .collect();
    let mut lut = vec![0.0f64; lut_len];
    lut[..centroids.len()].copy_from_slice(&centroids);
    Ok((lut, indices))
}

/// coremltools 9.0's k-means palettization of a float16 tensor: a lookup table of `2^nbits`
/// float16 entries (the ascending centroids, unused entries 0) and one index per element.
///
/// As `_get_kmeans_lookup_table_and_weight` does for a float16 tensor of at least 10,000
/// elements: `np.unique` with counts, `k = min(#unique, 2^nbits)`, [`cluster`] on the unique
/// values weighted by their counts (kmeans1d), the table cast to float16 (rounded once from
/// float64), each element's index that of its unique value's cluster. Bit for bit identical to
/// coremltools there. coremltools clusters smaller tensors with scikit-learn's `KMeans`
/// (k-means++ from a fixed seed, 1 init, tol 1e-2, a local optimum whose centroids come out
/// unsorted); that is not reproduced: they get the same exact optimum, whose squared error is
/// never larger.
///
/// `-0` and `+0` are one value, as for `np.unique`. Errors on `nbits` outside 1..=8, an empty
/// tensor or a non-finite element.
pub fn palettize_f16(w: &[f16], nbits: u32) -> Result<(Vec<f16>, Vec<u8>)> {
    let (lut, indices) = palettize_f16_centroids(w, nbits)?;
    Ok((lut.into_iter().map(f16_from_f64).collect(), indices))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;

    /// `<fixtures>/<sub>` when it exists; `None` (after saying so) when it does not, except on CI
    /// (`CI=true`), where the fixtures must be present.
    pub(crate) fn fixture_dir(sub: &str) -> Option<PathBuf> {
        sdrs_fixtures::extended(sub)
    }

    /// A safetensors tensor's dtype, shape and bytes.
    pub(crate) type Raw = (safetensors::Dtype, Vec<usize>, Vec<u8>);

    /// Every tensor of a safetensors file.
    pub(crate) fn read_safetensors(path: &std::path::Path) -> HashMap<String, Raw> {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                let raw = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
                (name, raw)
            })
            .collect()
    }

    pub(crate) fn as_f16(raw: &Raw) -> Vec<f16> {
        assert_eq!(raw.0, safetensors::Dtype::F16);
        raw.2
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn as_f64(raw: &Raw) -> Vec<f64> {
        assert_eq!(raw.0, safetensors::Dtype::F64);
        raw.2
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    /// The kmeans fixture files, sorted by name (`t0_...` to `t5_...`).
    pub(crate) fn kmeans_fixtures() -> Vec<(String, HashMap<String, Raw>)> {
        let Some(dir) = fixture_dir("coreml/kmeans") else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("kmeans fixture folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        assert_eq!(files.len(), 6, "6 tensors in {}", dir.display());
        files
            .iter()
            .map(|p| {
                let name = p.file_stem().unwrap_or_default().to_string_lossy().into();
                (name, read_safetensors(p))
            })
            .collect()
    }

    pub(crate) const FIXTURE_NBITS: [u32; 5] = [1, 2, 4, 6, 8];

    /// Weighted cost of a clustering.
    fn sse(values: &[f64], weights: &[f64], clusters: &[usize], centroids: &[f64]) -> f64 {
        values
            .iter()
            .zip(weights)
            .zip(clusters)
            .map(|((x, w), &c)| w * (x - centroids[c]).powi(2))
            .sum()
    }

    #[test]
    fn fixtures_of_at_least_10000_elements_are_identical_to_coremltools() {
        let fixtures = kmeans_fixtures();
        let mut checked = 0;
        for (name, tensors) in &fixtures {
            let w = as_f16(&tensors["weight"]);
            if w.len() < 10_000 {
                continue;
            }
            for nbits in FIXTURE_NBITS {
                let (lut64, indices) = palettize_f16_centroids(&w, nbits).expect("palettize");
                // palettize_f16's cast of the table.
                let lut: Vec<f16> = lut64.iter().map(|&c| f16_from_f64(c)).collect();
                let want_lut = as_f16(&tensors[&format!("lut{nbits}")]);
                let want_lut64 = as_f64(&tensors[&format!("lut{nbits}_f64")]);
                let want_indices = &tensors[&format!("indices{nbits}")].2;
                // Exact: the same float16 bits.
                let got_bits: Vec<u16> = lut.iter().map(|v| v.to_bits()).collect();
                let want_bits: Vec<u16> = want_lut.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got_bits, want_bits, "{name} nbits {nbits}: lut");
                // Within 1e-12 relative (they come out equal).
                for (i, (g, e)) in lut64.iter().zip(&want_lut64).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-12 * e.abs(),
                        "{name} nbits {nbits}: centroid {i} {g} vs {e}"
                    );
                }
                let exact = lut64.iter().zip(&want_lut64).all(|(g, e)| g == e);
                let same = indices.iter().zip(want_indices).filter(|(a, b)| a == b);
                assert_eq!(same.count(), w.len(), "{name} nbits {nbits}: indices");
                println!(
                    "{name} nbits {nbits}: lut and {} indices identical, f64 centroids {}",
                    w.len(),
                    if exact {
                        "bit-identical"
                    } else {
                        "within 1e-12"
                    }
                );
                checked += 1;
            }
        }
        if !fixtures.is_empty() {
            assert_eq!(checked, 15, "3 tensors x 5 nbits");
        }
    }

    #[test]
    fn small_fixtures_are_valid_optima_and_never_worse_than_scikit_learn() {
        for (name, tensors) in &kmeans_fixtures() {
            let w = as_f16(&tensors["weight"]);
            if w.len() >= 10_000 {
                continue;
            }
            let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
            for nbits in FIXTURE_NBITS {
                let (lut64, indices) = palettize_f16_centroids(&w, nbits).expect("palettize");
                let lut: Vec<f16> = lut64.iter().map(|&c| f16_from_f64(c)).collect();
                // Each element sits at its nearest centroid (ties within 1e-12 allowed).
                for (x, &i) in wf.iter().zip(&indices) {
                    let own = (x - lut64[i as usize]).abs();
                    let k = lut64.len().min(w.len());
                    let best = lut64[..k]
                        .iter()
                        .map(|c| (x - c).abs())
                        .fold(f64::INFINITY, f64::min);
                    assert!(own <= best + 1e-12, "{name} nbits {nbits}: {x} not nearest");
                }
                let err = |lut: &[f64], idx: &[u8]| -> f64 {
                    wf.iter()
                        .zip(idx)
                        .map(|(x, &i)| (x - lut[i as usize]).powi(2))
                        .sum()
                };
                let ours: Vec<f64> = lut.iter().map(|v| v.to_f64()).collect();
                let theirs: Vec<f64> = as_f16(&tensors[&format!("lut{nbits}")])
                    .iter()
                    .map(|v| v.to_f64())
                    .collect();
                let their_idx = &tensors[&format!("indices{nbits}")].2;
                let (e_ours, e_theirs) = (err(&ours, &indices), err(&theirs, their_idx));
                let same_values = indices
                    .iter()
                    .zip(their_idx)
                    .filter(|(a, b)| ours[**a as usize] == theirs[**b as usize])
                    .count();
                // The fp16 tables can add a rounding's worth to the f64 optimum: 1e-3 relative.
                assert!(
                    e_ours <= e_theirs * (1.0 + 1e-3),
                    "{name} nbits {nbits}: ours {e_ours} vs sklearn {e_theirs}"
                );
                println!(
                    "{name} ({} elements) nbits {nbits}: squared error ours {e_ours:.6e} vs \
                     scikit-learn {e_theirs:.6e} (ratio {:.4}), same reconstruction for {:.1}%",
                    w.len(),
                    e_ours / e_theirs,
                    100.0 * same_values as f64 / w.len() as f64
                );
            }
        }
    }

    /// The least cost of `values` split into at most `k` contiguous non-empty clusters, by trying
    /// every split.
    fn brute_force(values: &[f64], weights: &[f64], k: usize) -> f64 {
        let n = values.len();
        let cost = |a: usize, b: usize| -> f64 {
            let w: f64 = weights[a..b].iter().sum();
            let mean = values[a..b]
                .iter()
                .zip(&weights[a..b])
                .map(|(x, w)| x * w)
                .sum::<f64>()
                / w;
            values[a..b]
                .iter()
                .zip(&weights[a..b])
                .map(|(x, w)| w * (x - mean).powi(2))
                .sum()
        };
        let mut best = f64::INFINITY;
        // Each of the n - 1 gaps is a cut or not.
        for mask in 0u32..(1 << (n - 1)) {
            if mask.count_ones() as usize + 1 > k {
                continue;
            }
            let mut total = 0.0;
            let mut start = 0;
            for gap in 0..n - 1 {
                if mask & (1 << gap) != 0 {
                    total += cost(start, gap + 1);
                    start = gap + 1;
                }
            }
            total += cost(start, n);
            best = best.min(total);
        }
        best
    }

    /// A small deterministic generator (xorshift) for test data.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn dp_matches_exhaustive_search_on_small_sets() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for trial in 0..200 {
            let n = 1 + trial % 10;
            let mut values: Vec<f64> = (0..n).map(|_| rng.next_f64() * 4.0 - 2.0).collect();
            values.sort_by(f64::total_cmp);
            values.dedup();
            let weights: Vec<f64> = (0..values.len())
                .map(|_| (1.0 + (rng.next_f64() * 5.0).floor()).max(1.0))
                .collect();
            // nbits 3 is k = 8; smaller k too.
            for k in [1, 2, 3, 8] {
                let (clusters, centroids) = cluster(&values, &weights, k).expect("cluster");
                assert_eq!(centroids.len(), k.min(values.len()));
                assert!(clusters.windows(2).all(|p| p[0] <= p[1]), "contiguous");
                assert!(centroids.windows(2).all(|p| p[0] <= p[1]), "ascending");
                let got = sse(&values, &weights, &clusters, &centroids);
                let want = brute_force(&values, &weights, k);
                assert!(
                    (got - want).abs() <= 1e-12 + 1e-9 * want,
                    "trial {trial} k {k}: dp {got} vs brute force {want}"
                );
            }
        }
    }

    #[test]
    fn three_bits_is_an_optimal_clustering() {
        // 10 distinct f16 values with repeats: palettize to 8 entries and compare with the
        // exhaustive optimum over the unique values.
        let raw = [
            -0.75f32, -0.5, -0.5, -0.25, 0.0, -0.0, 0.125, 0.5, 0.5, 0.5, 1.0, 1.5, 2.0, 3.0,
        ];
        let w: Vec<f16> = raw.iter().map(|&v| f16::from_f32(v)).collect();
        let (lut64, indices) = palettize_f16_centroids(&w, 3).expect("palettize");
        assert_eq!(lut64.len(), 8);
        let (lut, indices16) = palettize_f16(&w, 3).expect("palettize");
        assert_eq!(indices, indices16);
        assert_eq!(lut.len(), 8);
        let mut unique: Vec<f64> = raw.iter().map(|&v| v as f64 + 0.0).collect();
        unique.sort_by(f64::total_cmp);
        unique.dedup();
        let weights: Vec<f64> = unique
            .iter()
            .map(|u| raw.iter().filter(|&&v| v as f64 == *u).count() as f64)
            .collect();
        let want = brute_force(&unique, &weights, 8);
        let got: f64 = raw
            .iter()
            .zip(&indices)
            .map(|(&x, &i)| (x as f64 - lut64[i as usize]).powi(2))
            .sum();
        assert!((got - want).abs() <= 1e-12, "{got} vs {want}");
        // -0 and +0 are one value.
        assert_eq!(indices[4], indices[5]);
    }

    #[test]
    fn fewer_values_than_entries_fill_the_rest_with_zeros() {
        let w: Vec<f16> = [0.5f32, 0.25, 0.5, 0.75]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let (lut, indices) = palettize_f16(&w, 4).expect("palettize");
        assert_eq!(lut.len(), 16);
        assert_eq!(
            lut[..3].iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            [0.25, 0.5, 0.75]
        );
        assert!(lut[3..].iter().all(|v| v.to_bits() == 0));
        assert_eq!(indices, [1, 0, 1, 2]);
    }

    #[test]
    fn f16_rounding_from_f64_is_single() {
        // 1 + 2^-11 + 2^-40 is just above the tie between 1 and 1 + 2^-10: rounds up. Through
        // f32 it would become the tie and round to even (down).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(f16_from_f64(x).to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(f16_from_f64(1.0 + 2f64.powi(-11)).to_f64(), 1.0);
        assert_eq!(
            f16_from_f64(-3.0e-6).to_f64(),
            f16::from_f32(-3.0e-6).to_f64()
        );
        assert_eq!(f16_from_f64(65520.0), f16::INFINITY);
        assert_eq!(f16_from_f64(65519.0).to_f64(), 65504.0);
        assert_eq!(f16_from_f64(-0.0).to_bits(), 0x8000);
        // Subnormals: 2^-25 is a tie between 0 and 2^-24 (to even: 0), just above rounds up.
        assert_eq!(f16_from_f64(2f64.powi(-25)).to_bits(), 0);
        assert_eq!(f16_from_f64(2f64.powi(-25) * 1.5).to_bits(), 1);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        assert!(cluster(&[], &[], 2).is_err());
        assert!(cluster(&[1.0, 2.0], &[1.0], 2).is_err());
        assert!(cluster(&[1.0, 2.0], &[1.0, 1.0], 0).is_err());
        assert!(cluster(&[2.0, 1.0], &[1.0, 1.0], 2).is_err());
        assert!(cluster(&[1.0, 1.0], &[1.0, 1.0], 2).is_err());
        assert!(cluster(&[1.0, 2.0], &[1.0, 0.0], 2).is_err());
        let err = palettize_f16(&[f16::ONE], 9).expect_err("nbits 9");
        assert!(err.to_string().contains("nbits = 9"), "{err}");
        assert!(palettize_f16(&[], 4).is_err());
        assert!(palettize_f16(&[f16::ONE, f16::NAN], 4).is_err());
        assert!(palettize_f16(&[f16::INFINITY], 4).is_err());
    }

    #[test]
    fn k_is_lowered_to_the_number_of_values() {
        let (clusters, centroids) = cluster(&[1.0, 2.0, 4.0], &[1.0, 2.0, 1.0], 5).expect("ok");
        assert_eq!(clusters, [0, 1, 2]);
        assert_eq!(centroids, [1.0, 2.0, 4.0]);
        let (clusters, centroids) = cluster(&[1.0, 2.0, 4.0], &[1.0, 2.0, 1.0], 1).expect("ok");
        assert_eq!(clusters, [0, 0, 0]);
        assert!((centroids[0] - 2.25).abs() < 1e-15, "{centroids:?}");
    }
}
