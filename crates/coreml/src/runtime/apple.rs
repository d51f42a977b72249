//! Core ML itself (Apple platforms only), through `objc2-core-ml`: a model of a resources folder
//! loaded as Apple's `ManagedMLModel` loads it (`MLModel(contentsOf:configuration:)` with the
//! chosen `computeUnits`; a `.mlpackage` compiled once with `MLModel.compileModel(at:)` and the
//! result cached), predictions over `MLMultiArray`s in the declared dtypes, outputs read through
//! their `strides` (Core ML may return non-contiguous arrays).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use half::f16;
use objc2::rc::Retained;
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::AnyThread;
use objc2_core_ml::{
    MLComputeUnits, MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLModel,
    MLModelConfiguration, MLMultiArray, MLMultiArrayDataType,
};
use objc2_foundation::{NSArray, NSError, NSNumber, NSString, NSURL};

use super::features::{ArrayData, ArrayDtype, FeatureInfo, MultiArray};
use super::resources::{ModelFile, ModelFormat};
use super::{ComputeUnits, CoreMlModel};
use crate::error::{io, model as model_error};
use crate::Result;

/// An `MLModel` behind a lock: Objective-C objects are reference counted atomically and may move
/// between threads, but one `MLModel` is driven by one prediction at a time here.
struct Handle(Retained<MLModel>);

// SAFETY: the model is only touched through the `Mutex` in `AppleModel`, so never from two
// threads at once; Core ML objects are not tied to the thread that created them.
unsafe impl Send for Handle {}

/// A Core ML model of a resources folder.
pub struct AppleModel {
    name: String,
    inputs: Vec<FeatureInfo>,
    outputs: Vec<FeatureInfo>,
    model: Mutex<Handle>,
}

fn ns_error(model: &str, what: &str, error: &NSError) -> crate::Error {
    model_error(
        model,
        format!("{what}: {} (Core ML)", error.localizedDescription()),
    )
}

fn url(model: &str, path: &Path) -> Result<Retained<NSURL>> {
    NSURL::from_directory_path(path).ok_or_else(|| {
        model_error(
            model,
            format!("{} is not an absolute file path", path.display()),
        )
    })
}

fn units(units: ComputeUnits) -> MLComputeUnits {
    match units {
        ComputeUnits::All => MLComputeUnits::All,
        ComputeUnits::CpuAndNeuralEngine => MLComputeUnits::CPUAndNeuralEngine,
        ComputeUnits::CpuAndGpu => MLComputeUnits::CPUAndGPU,
        ComputeUnits::CpuOnly => MLComputeUnits::CPUOnly,
    }
}

fn core_ml_dtype(dtype: ArrayDtype) -> MLMultiArrayDataType {
    match dtype {
        ArrayDtype::F16 => MLMultiArrayDataType::Float16,
        ArrayDtype::F32 => MLMultiArrayDataType::Float32,
        ArrayDtype::F64 => MLMultiArrayDataType::Float64,
        ArrayDtype::I32 => MLMultiArrayDataType::Int32,
    }
}

fn our_dtype(dtype: MLMultiArrayDataType) -> Option<ArrayDtype> {
    Some(if dtype == MLMultiArrayDataType::Float16 {
        ArrayDtype::F16
    } else if dtype == MLMultiArrayDataType::Float32 {
        ArrayDtype::F32
    } else if dtype == MLMultiArrayDataType::Float64 {
        ArrayDtype::F64
    } else if dtype == MLMultiArrayDataType::Int32 {
        ArrayDtype::I32
    } else {
        return None;
    })
}

/// A stable 64-bit FNV-1a hash (the cache key must not change between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Where compiled packages are kept: `$SDRS_COREML_CACHE`, else `~/Library/Caches/sdrs/coreml`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SDRS_COREML_CACHE") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("Library/Caches/sdrs/coreml")
}

/// The cached compilation of `package`: keyed by its path and its spec's and weights'
/// modification times, so an edited package compiles again.
fn compiled_path(file: &ModelFile, cache: &Path) -> Result<PathBuf> {
    let mut key = file.path.display().to_string();
    for part in [
        "Manifest.json",
        "Data/com.apple.CoreML/model.mlmodel",
        "Data/com.apple.CoreML/weights/weight.bin",
    ] {
        let path = file.path.join(part);
        if let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) {
            let since = modified
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            key.push_str(&format!("|{part}:{since}"));
        }
    }
    let dir = cache.join(format!("{}-{:016x}", file.name, fnv1a(key.as_bytes())));
    let compiled = dir.join(format!("{}.mlmodelc", file.name));
    if compiled.is_dir() {
        return Ok(compiled);
    }
    let source = url(&file.name, &file.path)?;
    // The synchronous form: loading waits for the compiled model anyway.
    #[allow(deprecated)]
    // SAFETY: a valid file URL; Core ML writes the result into a temporary folder it owns.
    let temp = unsafe { MLModel::compileModelAtURL_error(&source) }
        .map_err(|e| ns_error(&file.name, "compiling the package", &e))?;
    let temp = temp
        .to_file_path()
        .ok_or_else(|| model_error(&file.name, "Core ML compiled the package to a non-file URL"))?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Core ML's temporary folder may be on another volume: copy when a rename cannot move it.
    let staging = dir.join(format!("{}.partial", file.name));
    let _ = std::fs::remove_dir_all(&staging);
    if std::fs::rename(&temp, &staging).is_err() {
        copy_dir(&temp, &staging)?;
    }
    std::fs::rename(&staging, &compiled).map_err(io(&compiled))?;
    Ok(compiled)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&src))?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

impl AppleModel {
    /// Loads `file` (compiling a package into `cache` first, once) for `compute_units`. Its
    /// declared features are read from the files, as on every platform.
    pub fn load(file: &ModelFile, compute_units: ComputeUnits, cache: &Path) -> Result<Self> {
        let description = file.describe()?;
        let compiled = match file.format {
            ModelFormat::Compiled => file.path.clone(),
            ModelFormat::Package => compiled_path(file, cache)?,
        };
        let location = url(&file.name, &compiled)?;
        // SAFETY: plain Objective-C object construction and property setting.
        let model = unsafe {
            let configuration = MLModelConfiguration::new();
            configuration.setComputeUnits(units(compute_units));
            MLModel::modelWithContentsOfURL_configuration_error(&location, &configuration)
        }
        .map_err(|e| ns_error(&file.name, "loading the model", &e))?;
        Ok(Self {
            name: file.name.clone(),
            inputs: description.inputs,
            outputs: description.outputs,
            model: Mutex::new(Handle(model)),
        })
    }

    fn write_ml(
        &self,
        feature: &FeatureInfo,
        array: &MultiArray,
    ) -> Result<Retained<MLMultiArray>> {
        let array = array.to_dtype(feature.dtype);
        let shape: Vec<Retained<NSNumber>> = array
            .shape
            .iter()
            .map(|&d| NSNumber::numberWithInteger(d as isize))
            .collect();
        let shape = NSArray::from_retained_slice(&shape);
        // SAFETY: a fresh array of the given shape and type; it is written below within the
        // extent its own strides give.
        let ml = unsafe {
            MLMultiArray::initWithShape_dataType_error(
                MLMultiArray::alloc(),
                &shape,
                core_ml_dtype(feature.dtype),
            )
        }
        .map_err(|e| ns_error(&self.name, &format!("creating input {}", feature.name), &e))?;
        let strides = self.strides(&ml, &array.shape, &feature.name)?;
        #[allow(deprecated)]
        // SAFETY: the pointer addresses the array's elements of its declared type.
        let base = unsafe { ml.dataPointer() };
        let item = feature.dtype.itemsize();
        let bytes = array.to_le_bytes();
        for (index, chunk) in bytes.chunks_exact(item).enumerate() {
            let offset = element_offset(index, &array.shape, &strides) * item;
            // SAFETY: `offset` lies within the array: every index is below its shape.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    chunk.as_ptr(),
                    base.as_ptr().cast::<u8>().add(offset),
                    item,
                );
            }
        }
        Ok(ml)
    }

    fn strides(&self, ml: &MLMultiArray, shape: &[usize], name: &str) -> Result<Vec<usize>> {
        // SAFETY: read-only properties.
        let (got_shape, strides) = unsafe { (ml.shape(), ml.strides()) };
        let got_shape: Vec<usize> = got_shape
            .to_vec()
            .iter()
            .map(|n| n.integerValue().max(0) as usize)
            .collect();
        if got_shape != shape {
            return Err(model_error(
                &self.name,
                format!("{name}: Core ML's array has shape {got_shape:?}, expected {shape:?}"),
            ));
        }
        Ok(strides
            .to_vec()
            .iter()
            .map(|n| n.integerValue().max(0) as usize)
            .collect())
    }

    fn read_ml(&self, feature: &FeatureInfo, ml: &MLMultiArray) -> Result<MultiArray> {
        // SAFETY: read-only property.
        let dtype = our_dtype(unsafe { ml.dataType() }).ok_or_else(|| {
            model_error(
                &self.name,
                format!(
                    "output {} is of a type other than Float16/32/64 or Int32",
                    feature.name
                ),
            )
        })?;
        // SAFETY: read-only property.
        let shape: Vec<usize> = unsafe { ml.shape() }
            .to_vec()
            .iter()
            .map(|n| n.integerValue().max(0) as usize)
            .collect();
        let strides = self.strides(ml, &shape, &feature.name)?;
        #[allow(deprecated)]
        // SAFETY: the pointer addresses the array's elements of its type; read through strides.
        let base: NonNull<u8> = unsafe { ml.dataPointer() }.cast();
        let count: usize = shape.iter().product();
        let read = |index: usize, size: usize| -> &[u8] {
            let offset = element_offset(index, &shape, &strides) * size;
            // SAFETY: within the array's extent, as its strides describe it.
            unsafe { std::slice::from_raw_parts(base.as_ptr().add(offset), size) }
        };
        let data = match dtype {
            ArrayDtype::F16 => ArrayData::F16(
                (0..count)
                    .map(|i| {
                        let b = read(i, 2);
                        f16::from_le_bytes([b[0], b[1]])
                    })
                    .collect(),
            ),
            ArrayDtype::F32 => ArrayData::F32(
                (0..count)
                    .map(|i| {
                        let b = read(i, 4);
                        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    })
                    .collect(),
            ),
            ArrayDtype::F64 => ArrayData::F64(
                (0..count)
                    .map(|i| {
                        let b = read(i, 8);
                        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                    })
                    .collect(),
            ),
            ArrayDtype::I32 => ArrayData::I32(
                (0..count)
                    .map(|i| {
                        let b = read(i, 4);
                        i32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    })
                    .collect(),
            ),
        };
        Ok(MultiArray::new(&shape, data)?.to_dtype(feature.dtype))
    }
}

/// The element offset of C-order index `index` of `shape` in an array with `strides`.
fn element_offset(mut index: usize, shape: &[usize], strides: &[usize]) -> usize {
    let mut offset = 0;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim > 0 {
            offset += (index % dim) * stride;
            index /= dim;
        }
    }
    offset
}

impl CoreMlModel for AppleModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn inputs(&self) -> &[FeatureInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[FeatureInfo] {
        &self.outputs
    }

    fn predict(&self, inputs: &HashMap<String, MultiArray>) -> Result<HashMap<String, MultiArray>> {
        let mut keys = Vec::new();
        let mut values: Vec<Retained<AnyObject>> = Vec::new();
        for feature in &self.inputs {
            let array = inputs.get(&feature.name).ok_or_else(|| {
                model_error(&self.name, format!("input {} is missing", feature.name))
            })?;
            feature.check_shape(&self.name, array)?;
            let ml = self.write_ml(feature, array)?;
            // SAFETY: wrapping a valid multi-array.
            let value = unsafe { MLFeatureValue::featureValueWithMultiArray(&ml) };
            keys.push(NSString::from_str(&feature.name));
            values.push(Retained::into_super(Retained::into_super(value)));
        }
        let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
        let dictionary = objc2_foundation::NSDictionary::from_retained_objects(&key_refs, &values);
        // SAFETY: every value is an MLFeatureValue, as the provider requires.
        let provider = unsafe {
            MLDictionaryFeatureProvider::initWithDictionary_error(
                MLDictionaryFeatureProvider::alloc(),
                &dictionary,
            )
        }
        .map_err(|e| ns_error(&self.name, "building the inputs", &e))?;
        let provider = ProtocolObject::<dyn MLFeatureProvider>::from_ref(&*provider);
        let handle = self
            .model
            .lock()
            .map_err(|_| model_error(&self.name, "a previous prediction panicked"))?;
        // SAFETY: a valid feature provider for this model's inputs.
        let result = unsafe { handle.0.predictionFromFeatures_error(provider) }
            .map_err(|e| ns_error(&self.name, "prediction", &e))?;
        let mut outputs = HashMap::new();
        for feature in &self.outputs {
            let name = NSString::from_str(&feature.name);
            // SAFETY: looking up a feature by name in the prediction's provider.
            let value = unsafe { result.featureValueForName(&name) }.ok_or_else(|| {
                model_error(
                    &self.name,
                    format!("the prediction has no output {}", feature.name),
                )
            })?;
            // SAFETY: reading the multi-array of a multi-array feature.
            let array = unsafe { value.multiArrayValue() }.ok_or_else(|| {
                model_error(
                    &self.name,
                    format!("output {} is not a multi-array", feature.name),
                )
            })?;
            outputs.insert(feature.name.clone(), self.read_ml(feature, &array)?);
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_offsets_follow_the_strides() {
        // A [2, 3] array stored transposed (strides [1, 2]).
        let offsets: Vec<usize> = (0..6)
            .map(|i| element_offset(i, &[2, 3], &[1, 2]))
            .collect();
        assert_eq!(offsets, [0, 2, 4, 1, 3, 5]);
    }
}
