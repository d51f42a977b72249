// The one translation unit of sdrs' CUDA kernels (build.rs compiles it into a single fatbin):
// every kernel file, each also compilable on its own.

#include "conv2d.cu"
#include "flash_attention.cu"
#include "geglu.cu"
#include "group_norm.cu"
